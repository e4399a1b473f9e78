"""DPO: precomputed reference log-probs against a live reference model, in one run: steps/s and peak memory.

Same model (a randomly initialised preset with a tokenizer trained on Python's docs), same data (pairs made from the
embedded chatterbot dialogs: a dialog's own answer is chosen, the answer of another dialog rejected), same batch,
length cap, learning rate and number of steps (one epoch by default); `gptsmith dpo` runs with `precompute_ref` off (TRL keeps a frozen
copy of the starting model and runs it forward on every batch) and on (TRL runs the starting model over the training
set once before the first step and keeps no reference model). With `--lora`, the LoRA cases run too, whose live
reference is the same weights with the adapter disabled (no copy). Each case runs in its own process, so its peak
memory is its own: RSS on CPU, torch.cuda.max_memory_allocated on a GPU; `run own MB` is the peak above what the
process held after importing torch/transformers/TRL (on CPU ~0.8 GB of RSS is those imports, the same in every case).
`cpu s` is the process CPU time of the training loop, steadier than wall time on a busy machine. `setup s` is everything before the first
step (loading, tokenising, and for precompute the reference pass over the data); `steps/s` is the training loop alone.
Cases are interleaved `--repeats` times and the fastest run of each is shown (a loaded machine only slows runs down).

    python benchmarks/bench_dpo.py                          # preset small, 30 steps x 4 pairs, cap 256
    python benchmarks/bench_dpo.py --preset gpt2-small --steps 10 --lora
    python benchmarks/bench_dpo.py --threads 1                  # a shared/busy CPU: see docs/benchmarks.md
    python benchmarks/bench_dpo.py --quick                  # preset tiny, 5 steps: a check that it runs
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASES = {"live": "full, live reference model", "precompute": "full, --precompute-ref",
         "lora-live": "LoRA, reference = adapter disabled", "lora-precompute": "LoRA, --precompute-ref"}


def peak_memory_mb() -> float:
    import torch
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_model(workdir: Path, preset: str) -> Path:
    import pydoc_data.topics

    from gptsmith.config import ModelConfig
    from gptsmith.model import build_model, llama_config, resolve_shape, save_model_dir
    from gptsmith.tokenizer import load_tokenizer, train_tokenizer

    train_tokenizer(list(pydoc_data.topics.topics.values()), workdir / "tok", vocab_size=2048)
    tok = load_tokenizer(workdir / "tok")
    cfg = llama_config(resolve_shape(ModelConfig(preset=preset)), len(tok), tok.bos_token_id, tok.eos_token_id,
                       tok.pad_token_id)
    save_model_dir(build_model(cfg, seed=0), tok, workdir / "model")
    return workdir / "model"


def make_pairs(path: Path, limit: int) -> int:
    """chosen = a dialog's own first answer, rejected = the first answer of a random other dialog; `limit` pairs."""
    from gptsmith.data.chat_formats import chatterbot_conversations

    convs = [c for c in chatterbot_conversations() if len(c) >= 2]
    rng = random.Random(0)
    rows = []
    for c in convs:
        other = rng.choice(convs)[1]["content"]
        if other != c[1]["content"]:
            rows.append({"prompt": [c[0]], "chosen": [c[1]], "rejected": [{"role": "assistant", "content": other}]})
    rows = rows[:limit]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return len(rows)


def run_case(case: str, model_dir: Path, data: Path, out: Path, steps: int, batch: int, seq: int, device: str) -> dict:
    from gptsmith.config import load_config
    from gptsmith.train.dpo import dpo

    cfg = load_config(None, {"dpo.max_steps": steps, "dpo.batch_size": batch, "dpo.max_length": seq,
                             "dpo.precompute_ref": case.endswith("precompute"), "dpo.lora": case.startswith("lora"),
                             "dpo.val_fraction": 0.0, "dpo.save_every": 10**6, "dpo.log_every": 10**6,
                             "dpo.device": device, "dpo.lr": 1e-4 if case.startswith("lora") else 1e-5})
    t0 = time.perf_counter()
    m = dpo(str(model_dir), data, out, cfg)
    total = time.perf_counter() - t0
    setup = total - m["train_seconds"]  # loading, tokenising, (precompute); saving the model is after the loop
    return {"train_s": m["train_seconds"], "cpu_s": m["train_cpu_seconds"], "steps": m["steps"], "total_s": total,
            "setup_s": setup, "loss": m["train_loss"], "params": m["total_params"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small", help="model size (model.preset)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=4, help="pairs per step")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--pairs", type=int, default=0, help="pairs in the data; 0 = steps x batch size (one epoch, so "
                    "the precompute pass scores exactly what training sees)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per case; 0 = torch's default")
    ap.add_argument("--lora", action="store_true", help="also run the LoRA cases")
    ap.add_argument("--repeats", type=int, default=1, help="run the cases this many times, interleaved; keep the best")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--case", choices=list(CASES), help=argparse.SUPPRESS)
    ap.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.preset, args.steps = "tiny", 5
    if args.case:  # child process: one case, JSON on the last line
        if args.threads:
            import torch
            torch.set_num_threads(args.threads)
        from trl import DPOTrainer  # noqa: F401  (imports before the baseline: RSS above it is the run's own)
        import gptsmith.train.dpo  # noqa: F401
        base_mb = peak_memory_mb()
        r = run_case(args.case, args.model, args.data, args.out, args.steps, args.batch_size, args.max_length,
                     args.device)
        r["peak_mb"] = peak_memory_mb()
        r["own_mb"] = r["peak_mb"] - base_mb
        print(json.dumps(r))
        return

    cases = ["live", "precompute"] + (["lora-live", "lora-precompute"] if args.lora else [])
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = make_model(tmp, args.preset)
        n_pairs = make_pairs(tmp / "pairs.jsonl", args.pairs or args.steps * args.batch_size)
        results: dict[str, dict] = {}
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
        if args.threads:
            env["OMP_NUM_THREADS"] = str(args.threads)
        for repeat in range(args.repeats):
            for case in cases:
                cmd = [sys.executable, __file__, "--case", case, "--model", str(model_dir), "--data",
                       str(tmp / "pairs.jsonl"), "--out", str(tmp / f"{case}-{repeat}"), "--steps", str(args.steps),
                       "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
                       "--device", args.device, "--threads", str(args.threads)]
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if proc.returncode:
                    sys.exit(f"{case} failed:\n{proc.stderr[-3000:]}")
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                if case not in results or r["train_s"] < results[case]["train_s"]:
                    results[case] = r
    import torch
    gpu = torch.cuda.is_available() and args.device != "cpu"
    where = torch.cuda.get_device_name() if gpu else f"CPU ({os.cpu_count()} cores)"
    memory = "peak CUDA MB" if gpu else "peak RSS MB"
    base = results["live"]
    print(f"\nDPO, preset {args.preset} ({base['params'] / 1e6:.1f}M parameters), {n_pairs} chatterbot pairs, "
          f"{args.steps} steps x {args.batch_size} pairs, cap {args.max_length} tokens, on {where}, "
          f"{args.threads or 'default'} torch threads, best of {args.repeats}")
    print(f"{'case':<36}{'setup s':>9}{'train s':>9}{'cpu s':>8}{'steps/s':>9}{'vs live':>9}{'cpu vs live':>13}"
          f"{memory:>14}{'run own MB':>12}{'vs live':>9}{'mean loss':>11}")
    for case, r in results.items():
        sps, cps = r["steps"] / r["train_s"], r["steps"] / r["cpu_s"]
        print(f"{CASES[case]:<36}{r['setup_s']:>9.2f}{r['train_s']:>9.2f}{r['cpu_s']:>8.2f}{sps:>9.3f}"
              f"{sps / (base['steps'] / base['train_s']):>9.2f}{cps / (base['steps'] / base['cpu_s']):>13.2f}"
              f"{r['peak_mb']:>14.0f}{r['own_mb']:>12.0f}{r['own_mb'] / base['own_mb']:>9.2f}{r['loss']:>11.4f}")

if __name__ == "__main__":
    main()
