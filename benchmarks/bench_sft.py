"""SFT throughput: gptsmith's TRL-based `sft` trainer against a minimal plain-PyTorch loop, in one run.

Same model (a randomly initialised `tiny` preset with a tokenizer trained on Python's docs), same data (the
embedded chatterbot conversations), same micro-batch size, sequence cap, optimizer (AdamW) and number of steps;
loss on assistant tokens only in both. The plain loop pads each batch to its longest conversation and groups
conversations by length, like `sft` without packing. Each case runs in its own process so its peak RSS is its own.
Assistant tokens/s counts the tokens that carry loss in the batches each case drew; padding is not counted.
`cpu s` is the process CPU time of the training loop, steadier than wall time on a busy machine. A third case runs
`sft` with TRL's stock fused LM head instead of gptsmith's CPU one (`use_compact_lm_head`): what that head costs.
Cases are interleaved `--repeats` times and the fastest of each is shown (a loaded machine only slows runs down).

    python benchmarks/bench_sft.py                        # 100 steps, batch 16
    python benchmarks/bench_sft.py --threads 1 --repeats 3
    python benchmarks/bench_sft.py --quick                # 15 steps: a check that it runs
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


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_model(workdir: Path) -> Path:
    import pydoc_data.topics

    from gptsmith.config import ModelConfig
    from gptsmith.model import build_model, llama_config, resolve_shape, save_model_dir
    from gptsmith.tokenizer import load_tokenizer, train_tokenizer

    train_tokenizer(list(pydoc_data.topics.topics.values()), workdir / "tok", vocab_size=2048)
    tok = load_tokenizer(workdir / "tok")
    cfg = llama_config(resolve_shape(ModelConfig(preset="tiny")), len(tok), tok.bos_token_id, tok.eos_token_id,
                       tok.pad_token_id)
    save_model_dir(build_model(cfg, seed=0), tok, workdir / "model")
    return workdir / "model"


def run_trl(model_dir: Path, steps: int, batch: int, seq: int, packing: bool, out: Path, trl_head: bool) -> dict:
    import gptsmith.train.sft as sft_module
    from gptsmith.config import load_config
    from gptsmith.train.sft import sft

    if trl_head:  # keep the head TRL installed
        sft_module.use_compact_lm_head = lambda model: False
    seen = count_assistant_tokens()

    cfg = load_config(None, {"sft.max_steps": steps, "sft.batch_size": batch, "sft.max_seq_len": seq,
                             "sft.packing": packing, "sft.val_fraction": 0.0, "sft.save_every": 10**6,
                             "sft.log_every": 10**6, "sft.device": "cpu", "sft.lr": 1e-3})
    t0 = time.perf_counter()
    m = sft(str(model_dir), "chatterbot", out, cfg)
    total = time.perf_counter() - t0
    return {"train_s": m["train_seconds"], "cpu_s": m["train_cpu_seconds"], "total_s": total, "loss": m["train_loss"],
            "tokens": seen[0]}


def count_assistant_tokens() -> list[int]:
    """Count the tokens that carry loss in the batches SFTTrainer trains on (its sampler draws other batches than
    the plain loop, so each case is credited with what it actually trained)."""
    from trl import SFTTrainer

    seen = [0]
    compute_loss = SFTTrainer.compute_loss

    def counting(self, model, inputs, *args, **kwargs):
        if model.training:
            seen[0] += int((inputs["labels"][:, 1:] != -100).sum())
        return compute_loss(self, model, inputs, *args, **kwargs)

    SFTTrainer.compute_loss = counting
    return seen


def run_plain(model_dir: Path, steps: int, batch: int, seq: int) -> dict:
    import torch

    from gptsmith.data.chat_formats import chatterbot_conversations
    from gptsmith.model import load_model
    from gptsmith.tokenizer import load_tokenizer

    torch.manual_seed(42)
    t0 = time.perf_counter()
    tok = load_tokenizer(model_dir)
    model = load_model(model_dir)
    rows = []
    for conv in chatterbot_conversations():
        enc = tok.apply_chat_template(conv, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        ids, mask = enc["input_ids"][:seq], enc["assistant_masks"][:seq]
        rows.append((ids, [t if m else -100 for t, m in zip(ids, mask)]))
    rows.sort(key=lambda r: len(r[0]))  # length-grouped batches, shuffled batch order
    batches = [rows[i:i + batch] for i in range(0, len(rows), batch)]
    order = torch.randperm(len(batches)).tolist()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    model.train()
    t1, c1 = time.perf_counter(), time.process_time()
    losses, seen = [], 0
    for step in range(steps):
        b = batches[order[step % len(batches)]]
        width = max(len(r[0]) for r in b)
        ids = torch.tensor([r[0] + [tok.pad_token_id] * (width - len(r[0])) for r in b])
        att = torch.tensor([[1] * len(r[0]) + [0] * (width - len(r[0])) for r in b])
        lab = torch.tensor([r[1] + [-100] * (width - len(r[1])) for r in b])
        seen += int((lab[:, 1:] != -100).sum())
        loss = model(input_ids=ids, attention_mask=att, labels=lab).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return {"train_s": time.perf_counter() - t1, "cpu_s": time.process_time() - c1, "total_s": time.perf_counter() - t0,
            "loss": sum(losses) / len(losses), "tokens": seen}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=0, help="torch threads per case; 0 = torch's default")
    ap.add_argument("--repeats", type=int, default=1, help="run the cases this many times, interleaved; keep the best")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--case", choices=["plain", "trl", "trl-head", "trl-packing"], help=argparse.SUPPRESS)
    ap.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.steps = 15
    if args.case:  # child process: one case, JSON on the last line
        if args.threads:
            import torch
            torch.set_num_threads(args.threads)
        if args.case == "plain":
            r = run_plain(args.model, args.steps, args.batch_size, args.seq_len)
        else:
            r = run_trl(args.model, args.steps, args.batch_size, args.seq_len, args.case == "trl-packing", args.out,
                        trl_head=args.case == "trl-head")
        r["rss_mb"] = peak_rss_mb()
        print(json.dumps(r))
        return

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = make_model(tmp)
        results: dict[str, dict] = {}
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        if args.threads:
            env["OMP_NUM_THREADS"] = str(args.threads)
        for repeat in range(args.repeats):
            for case in ("plain", "trl", "trl-head"):  # a fresh OUT per run: sft refuses an earlier run's checkpoints
                cmd = [sys.executable, __file__, "--case", case, "--model", str(model_dir),
                       "--out", str(tmp / f"{case}-{repeat}"),
                       "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
                       "--threads", str(args.threads)]
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if proc.returncode:
                    sys.exit(f"{case} failed:\n{proc.stderr[-3000:]}")
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                if case not in results or r["train_s"] < results[case]["train_s"]:
                    results[case] = r
    base = results["plain"]
    print(f"\nSFT, tiny preset, chatterbot, {args.steps} steps x batch {args.batch_size}, cap {args.seq_len} tokens, "
          f"{args.threads or 'default'} torch threads on {os.cpu_count()} CPUs, best of {args.repeats}")
    print(f"{'case':<34}{'asst tokens':>12}{'train s':>9}{'cpu s':>8}{'asst tok/s':>12}{'vs plain':>10}"
          f"{'cpu vs plain':>14}{'total s':>9}{'peak RSS MB':>13}{'mean loss':>11}")
    names = {"plain": "plain PyTorch loop", "trl": "gptsmith sft (TRL)", "trl-head": "gptsmith sft, TRL's own LM head"}
    for case, r in results.items():
        speed, cpu_speed = r["tokens"] / r["train_s"], r["tokens"] / r["cpu_s"]
        print(f"{names[case]:<34}{r['tokens']:>12,}{r['train_s']:>9.2f}{r['cpu_s']:>8.2f}{speed:>12.0f}"
              f"{speed / (base['tokens'] / base['train_s']):>10.2f}{cpu_speed / (base['tokens'] / base['cpu_s']):>14.2f}"
              f"{r['total_s']:>9.2f}{r['rss_mb']:>13.0f}{r['loss']:>11.3f}")


if __name__ == "__main__":
    main()
