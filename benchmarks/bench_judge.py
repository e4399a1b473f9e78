"""The offline judge's readings on obvious items: which ones prefer the right answer, by how many nats, and the
seconds a pair takes with the shipped one (reference-guided likelihood, gptsmith.eval.judge.LikelihoodJudge).

    GPTSMITH_SMOLLM_DIR=/tmp/smol python benchmarks/bench_judge.py [--model DIR] [--threads 2]

Baselines in the same run, from the same forward passes: log p(answer | question) alone, and PMI (Holtzman et al.
2021): minus log p(answer | a content-free question, "N/A"). The items are tests/test_pulled.py's OBVIOUS, plus
LONGER_RIGHT (the right answer is the longer one) to show the length bias.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

LONGER_RIGHT = [("What is the capital of France?", "The capital of France is Paris.", "Berlin."),
                ("What is 2+2?", "2+2 equals 4.", "5"),
                ("How many legs does a spider have?", "A spider has eight legs.", "Three."),
                ("What is the boiling point of water at sea level in Celsius?",
                 "Water boils at 100 degrees Celsius at sea level.", "10.")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=os.environ.get("GPTSMITH_SMOLLM_DIR", "/tmp/smol"),
                        help="the judge: a plain HF model folder (default $GPTSMITH_SMOLLM_DIR or /tmp/smol)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from test_pulled import OBVIOUS

    from gptsmith.eval.judge import TIE_MARGIN_NATS, LikelihoodJudge
    from gptsmith.eval.targets import open_target

    torch.set_num_threads(args.threads)
    judge = LikelihoodJudge(open_target(model=args.model, device="cpu"))
    for title, items in (("obvious items", OBVIOUS), ("right answer the longer one", LONGER_RIGHT)):
        questions = [q for q, _, _ in items]
        start = time.perf_counter()
        ab = judge.judge(questions, [g for _, g, _ in items], [b for _, _, b in items])
        ba = judge.judge(questions, [b for _, _, b in items], [g for _, g, _ in items])
        seconds = time.perf_counter() - start
        right = sum(x.verdict == "A" and y.verdict == "B" for x, y in zip(ab, ba))
        gaps = {"reference-guided (shipped)": [], "log p(answer | question)": [], "PMI vs 'N/A'": []}
        for q, good, bad in items:
            plain = [judge._score([{"role": "user", "content": q}], x) for x in (good, bad)]
            null = [judge._score([{"role": "user", "content": "N/A"}], x) for x in (good, bad)]
            gaps["reference-guided (shipped)"].append(judge.score(q, good) - judge.score(q, bad))
            gaps["log p(answer | question)"].append(plain[0] - plain[1])
            gaps["PMI vs 'N/A'"].append((plain[0] - null[0]) - (plain[1] - null[1]))
        print(f"\n{title}: {len(items)} pairs; shipped reading right in both orders: {right}/{len(items)} "
              f"(tie margin {TIE_MARGIN_NATS:.2f} nats), {seconds:.1f} s ({seconds / len(items):.1f} s a pair)")
        for name, values in gaps.items():
            ranked = sum(v > 0 for v in values)
            print(f"  {name:28s} right {ranked}/{len(values)}, smallest gap {min(values):7.2f} nats: "
                  + " ".join(f"{v:.2f}" for v in values))


if __name__ == "__main__":
    main()
