"""Every assistant setting a quickstart tried, scored on the HELD-OUT test questions (the quickstart itself scores
them on dev only, and the winner alone on test): is what the dev set chose also what the test set would choose?

    python benchmarks/bench_assistant_settings.py --quickstart OUT [--limit N]

Prints, per setting: held-out accuracy with its 95% interval, the paired difference against the pulled model as it
comes, mean prompt tokens and seconds. Load the model and the index once; every setting shares them.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import yaml


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quickstart", type=Path, required=True, help="a `gptsmith quickstart` output folder")
    ap.add_argument("--limit", type=int, default=None, help="score only the first N test questions")
    ap.add_argument("--json", type=Path, default=None, help="also write the table here")
    args = ap.parse_args()

    from gptsmith.engine import Engine
    from gptsmith.eval import stats
    from gptsmith.eval.suites import load_suite
    from gptsmith.eval.targets import Target
    from gptsmith.eval.tune import assistant_target, mean_prompt_tokens, score
    from gptsmith.rag.retrieve import Retriever

    out = args.quickstart
    test = out / "questions" / "test.jsonl"
    if args.limit:
        items = load_suite(test).items[:args.limit]
        test = out / "questions" / f"test-first-{args.limit}.jsonl"
        test.write_text("".join(json.dumps({k: v for k, v in it.items() if k != "line"}) + "\n" for it in items))
    items = load_suite(test).items
    engine = Engine.load(out / "model", device="cpu")
    retriever = Retriever.open(out / "index")
    t0 = time.perf_counter()
    plain = Target("model", "model", str(out / "model"), engine=engine)
    _, base_items = score(plain, test)
    base = [float(it["acc_norm"]) for it in base_items]
    rows = [{"setting": "pulled model as it comes", "acc": sum(base) / len(base), "ci": stats.mean_ci(base),
             "diff": None, "prompt_tokens": mean_prompt_tokens(plain, items), "seconds": time.perf_counter() - t0}]
    for path in sorted((out / "trials").glob("*.yaml")):
        label = path.read_text().split("\n", 1)[0].lstrip("# ").split(":")[0]
        profile = yaml.safe_load(path.read_text())
        t0 = time.perf_counter()
        target = assistant_target(engine, profile, retriever, retriever.embedder)
        _, scored = score(target, test)
        values = [float(it["acc_norm"]) for it in scored]
        rows.append({"setting": label, "acc": sum(values) / len(values), "ci": stats.mean_ci(values),
                     "diff": stats.paired_diff_ci(base, values), "prompt_tokens": mean_prompt_tokens(target, items),
                     "seconds": time.perf_counter() - t0})
    print(f"held-out test questions: {len(items)}")
    print(f"{'setting':32} {'acc [95%]':22} {'vs plain model [95%]':26} {'prompt tok':>10} {'s':>6}")
    for r in rows:
        d = "" if r["diff"] is None else "{:+.3f} [{:+.3f}, {:+.3f}]".format(*r["diff"])
        print(f"{r['setting']:32} {r['acc']:.3f} [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}]   {d:26} "
              f"{r['prompt_tokens']:10.0f} {r['seconds']:6.0f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1, default=list))


if __name__ == "__main__":
    main()
