"""Multiple-choice scoring: gptsmith's scorer (gptsmith.eval.suites.score_multiple_choice) against
lm-evaluation-harness's HFLM, same model, same items, same token inputs, in one run.

    python benchmarks/bench_eval.py                      # 200 python-docs items, preset small (6 x 384), 2 repeats
    python benchmarks/bench_eval.py --items 40 --repeats 1 --preset tiny    # a check that it runs

The model is a randomly initialised Llama of preset `small` (6 layers x 384, 8192-token vocabulary trained on
Python's docs here) saved without a chat template, so both sides score the plain-text prompt
"Question: ...\\nAnswer:" followed by " choice" (lm-eval's default format, which gptsmith uses for a base model).
gptsmith starts every context with the document separator (the BOS token) that pretraining puts before each
document; the lm-eval task's doc_to_text starts with the BOS token's text, which the tokenizer maps to the same
id, so both score exactly the same token sequences and should pick the same answers (the agreement printed).

Each measurement runs in a fresh process (`--worker`), which loads the model, loads the items, then times the
scoring: for gptsmith `load_suite` + `score_multiple_choice`; for lm-eval task loading (its TaskManager over a
folder with the task YAML, the JSONL through `datasets`) + `evaluate` through gptsmith's bridge
(gptsmith.eval.lmeval.run_tasks, which calls lm_eval.evaluator.evaluate on HFLM over the same loaded model).
Workers alternate (gptsmith, lm-eval, gptsmith, ...) and the best of --repeats is kept for each, so load from
other processes hits both alike. Peak memory: the worker's RSS high-water mark, and how far it rose above the RSS
right after the model was loaded (what scoring itself added); on a GPU, torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TASK_YAML = """task: bench_python_docs
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{bos}Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
metadata:
  version: 1.0
"""


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def build(out: Path, preset: str, vocab: int) -> tuple[Path, Path]:
    """A tokenizer trained on Python's docs and a random-init model without a chat template (a base model);
    the python-docs items as a JSONL."""
    import pydoc_data.topics

    from gptsmith.config import ModelConfig
    from gptsmith.eval.builtin import resolve
    from gptsmith.model import build_model, llama_config, resolve_shape, save_model_dir
    from gptsmith.tokenizer import load_tokenizer, train_tokenizer

    train_tokenizer(list(pydoc_data.topics.topics.values()), out / "tokenizer", vocab_size=vocab)
    tok = load_tokenizer(out / "tokenizer")
    tok.chat_template = None
    cfg = llama_config(resolve_shape(ModelConfig(preset=preset)), len(tok), tok.bos_token_id, tok.eos_token_id,
                       tok.pad_token_id)
    model_dir = out / "model"
    save_model_dir(build_model(cfg, seed=0), tok, model_dir)
    (model_dir / "chat_template.jinja").unlink(missing_ok=True)
    return model_dir, resolve("python-docs")


def worker(args) -> dict:
    """One timed run in this process: {"side", "seconds", "items_per_s" (wall), "cpu_items_per_s" (CPU time of
    all this process's threads), "acc", "rss_loaded", "peak_rss", "cuda_peak", "preds"}."""
    import torch

    from gptsmith.eval.targets import open_target

    target = open_target(model=args.model, device=args.device)
    assert not target.is_chat, "the benchmark model must be a base model (no chat template)"
    lines = Path(args.items_file).read_text(encoding="utf-8").splitlines()[:args.items]
    folder = Path(args.scratch) / f"items-{args.items}"
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "items.jsonl"
    data.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    cuda = target.engine.device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    rss_loaded = rss_mb()
    t0, c0 = time.perf_counter(), time.process_time()
    if args.worker == "gptsmith":
        from gptsmith.eval.suites import load_suite, score_multiple_choice

        items = load_suite(data).items
        scored = score_multiple_choice(target, items, k_shot=0, seed=0, batch_size=args.batch_size)
        preds = [(s["pred"], s["pred_norm"]) for s in scored]
        acc = sum(s["acc"] for s in scored) / len(scored)
    else:
        from gptsmith.eval.lmeval import run_tasks

        tasks = folder / "tasks"
        tasks.mkdir(exist_ok=True)
        bos = target.engine.tokenizer.bos_token
        (tasks / "bench_python_docs.yaml").write_text(TASK_YAML.format(data=data, bos=bos), encoding="utf-8")
        [suite] = run_tasks(target, ["bench_python_docs"], include_path=tasks, batch_size=args.batch_size)
        preds = [(s["pred"], s["pred_norm"]) for s in suite["items"]]
        acc = suite["metrics"]["acc"]
    if cuda:
        torch.cuda.synchronize()
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    return {"side": args.worker, "seconds": seconds, "items_per_s": len(preds) / seconds,
            "cpu_items_per_s": len(preds) / cpu_seconds, "acc": acc,
            "rss_loaded": rss_loaded, "peak_rss": peak_rss_mb(),
            "cuda_peak": torch.cuda.max_memory_allocated() / 2**20 if cuda else None, "preds": preds}


def run_worker(side: str, args, model: Path, items: Path, scratch: Path) -> dict:
    out = scratch / f"{side}.json"
    cmd = [sys.executable, __file__, "--worker", side, "--model", str(model), "--items-file", str(items),
           "--items", str(args.items), "--batch-size", str(args.batch_size), "--device", args.device,
           "--scratch", str(scratch), "--out", str(out)] + (["--threads", str(args.threads)] if args.threads else [])
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--items", type=int, default=200, help="python-docs items scored")
    p.add_argument("--preset", default="small", help="model preset (small = 6 layers x 384)")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batch-size", type=int, default=32, help="requests per forward pass, both sides")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    # worker mode (internal)
    p.add_argument("--worker", choices=["gptsmith", "lm-eval"])
    p.add_argument("--model")
    p.add_argument("--items-file")
    p.add_argument("--scratch")
    p.add_argument("--out")
    args = p.parse_args()
    if args.worker:
        Path(args.out).write_text(json.dumps(worker(args)))
        return

    import lm_eval
    import torch
    import transformers

    with tempfile.TemporaryDirectory(prefix="bench_eval_") as tmp:
        scratch = Path(tmp)
        model, items = build(scratch, args.preset, args.vocab)
        best: dict[str, dict] = {}
        for r in range(args.repeats):
            for side in ("gptsmith", "lm-eval"):
                res = run_worker(side, args, model, items, scratch)
                print(f"repeat {r + 1} {side:8}: {res['seconds']:.2f} s, {res['items_per_s']:.2f} items/s, "
                      f"{res['cpu_items_per_s']:.2f} items per CPU-second", flush=True)
                if side not in best or res["seconds"] < best[side]["seconds"]:
                    best[side] = res
    g, lm = best["gptsmith"], best["lm-eval"]
    n = len(g["preds"])
    same = sum(a[0] == b[0] for a, b in zip(g["preds"], lm["preds"]))
    same_norm = sum(a[1] == b[1] for a, b in zip(g["preds"], lm["preds"]))
    print(f"\nmodel preset {args.preset}, vocab {args.vocab}, {n} python-docs items (4 choices), "
          f"batch {args.batch_size}, "
          f"device {args.device}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"lm_eval {lm_eval.__version__}, best of {args.repeats}")
    print("| scorer | items/s (wall) | items per CPU-second | seconds | acc | peak RSS | RSS added by scoring | "
          "CUDA peak |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, res in (("gptsmith `score_multiple_choice`", g), ("lm-eval HFLM (`evaluate`)", lm)):
        cuda = f"{res['cuda_peak']:,.0f} MB" if res["cuda_peak"] is not None else "-"
        print(f"| {name} | {res['items_per_s']:.2f} | {res['cpu_items_per_s']:.2f} | {res['seconds']:.2f} | "
              f"{res['acc']:.3f} | "
              f"{res['peak_rss']:,.0f} MB | {res['peak_rss'] - res['rss_loaded']:,.0f} MB | {cuda} |")
    print(f"\ngptsmith / lm-eval items/s = {g['items_per_s'] / lm['items_per_s']:.2f}x (wall), "
          f"{g['cpu_items_per_s'] / lm['cpu_items_per_s']:.2f}x (CPU time)")
    print(f"same answer picked: {same}/{n} ({same / n:.1%}) by log-likelihood (acc), "
          f"{same_norm}/{n} ({same_norm / n:.1%}) per length (acc_norm; gptsmith divides by UTF-8 bytes, "
          "lm-eval by characters)")


if __name__ == "__main__":
    main()
