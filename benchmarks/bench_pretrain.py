"""Pretraining speed: gptsmith's loop vs a minimal plain-PyTorch loop vs Hugging Face Trainer, in one run.

Same model shape, same optimizer settings, same batches (drawn by gptsmith's sampler from one WORKDIR):

    (a) gptsmith   `gptsmith.train.pretrain.pretrain()`, the real command (logging, checkpoint at the end)
    (b) minimal    a hand-written Llama (RMSNorm, rotary, GQA via F.scaled_dot_product_attention, SwiGLU,
                   tied embeddings) with a bare AdamW loop: the floor any trainer's overhead is measured against
    (c) trainer    transformers.Trainer on gptsmith's LlamaForCausalLM

Each runs in its own process (so peak RSS is its own). Steady-state tokens/s is measured after --warmup steps.

    python benchmarks/bench_pretrain.py                       # preset tiny, seq 256, batch 8, 60 steps
    python benchmarks/bench_pretrain.py --preset small --steps 100 --device cuda
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# ---------------------------------------------------------------------------------------------- shared setup

def make_workdir(root: Path, vocab_size: int) -> Path:
    """A WORKDIR per the `prepare` contract, from Python's own docs (no network)."""
    import pydoc_data.topics

    from gptsmith.tokenizer import train_tokenizer

    texts = [t for t in pydoc_data.topics.topics.values() if len(t) > 200]
    tok = train_tokenizer(texts, root / "tokenizer", vocab_size=vocab_size)
    (root / "tokens").mkdir(parents=True)
    splits = {}
    for name, docs in (("train", [t for i, t in enumerate(texts) if i % 20]), ("val", texts[::20])):
        ids = []
        for t in docs:
            ids += [tok.bos_token_id] + tok.encode(t, add_special_tokens=False)
        np.array(ids, dtype=np.uint16).tofile(root / "tokens" / f"{name}_00000.bin")
        splits[name] = {"files": [f"{name}_00000.bin"], "tokens": len(ids), "documents": len(docs),
                        "bytes": sum(len(t.encode()) for t in docs)}
    (root / "tokens" / "manifest.json").write_text(json.dumps(
        {"format": "gptsmith.tokens.v1", "dtype": "uint16", "vocab_size": len(tok), "bos_token_id": 0,
         "tokenizer": "tokenizer", "splits": splits}))
    return root


def project_config(args):
    from gptsmith.config import ProjectConfig

    return ProjectConfig.model_validate({
        "model": {"preset": args.preset},
        "pretrain": {"seq_len": args.seq_len, "batch_size": args.batch_size, "max_steps": args.steps,
                     "eval_every": 10 ** 9, "save_every": 10 ** 9, "eval_batches": 1, "warmup_steps": 10,
                     "device": args.device, "compile": args.compile}})


def batches(work: Path, cfg):
    """Exactly the batches gptsmith's loop draws, step by step."""
    from gptsmith.data.shards import TokenShards, read_manifest
    from gptsmith.train.pretrain import batch_rng

    data = TokenShards.open(work, read_manifest(work), "train")
    pc = cfg.pretrain
    return [data.random_batch(pc.seq_len, pc.batch_size, batch_rng(pc.seed, s, 0)) for s in range(pc.max_steps)]


def hf_model(work: Path, cfg):
    from gptsmith.model import build_model, llama_config, resolve_shape
    from gptsmith.tokenizer import load_tokenizer

    tok = load_tokenizer(work / "tokenizer")
    config = llama_config(resolve_shape(cfg.model), len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    config._attn_implementation = "sdpa"
    return build_model(config, seed=cfg.pretrain.seed)


def steady_tokens_per_s(step_times: list[float], tokens_per_step: int, warmup: int) -> float:
    """step_times[i] = wall clock when step i+1 finished. The median step after `warmup`: on a shared machine
    the mean mostly measures the neighbours' load spikes."""
    t = np.diff(np.array(step_times[warmup - 1:]))
    return tokens_per_step / float(np.median(t))


# ---------------------------------------------------------------------------------------------- (a) gptsmith

def run_gptsmith(work: Path, cfg, args) -> float:
    from gptsmith.train.pretrain import pretrain

    out = Path(tempfile.mkdtemp()) / "model"
    times: list[float] = []
    # time every optimizer step by wrapping the loop's one-step function
    import gptsmith.train.pretrain as loop
    orig = loop.train_step

    def timed_step(run):
        r = orig(run)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter())
        return r

    loop.train_step = timed_step
    try:
        pretrain(work, out, cfg)
    finally:
        loop.train_step = orig
    return steady_tokens_per_s(times, cfg.pretrain.batch_size * cfg.pretrain.seq_len, args.warmup)


# ---------------------------------------------------------------------------------------------- (b) minimal

class RMSNorm(nn.Module):
    def __init__(self, d, eps=1e-5):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(d))

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)).to(dtype) * self.weight


def rope(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Block(nn.Module):
    def __init__(self, d, n_head, n_kv, d_ff):
        super().__init__()
        self.n_head, self.n_kv, self.hd = n_head, n_kv, d // n_head
        self.ln1, self.ln2 = RMSNorm(d), RMSNorm(d)
        self.q = nn.Linear(d, d, bias=False)
        self.k = nn.Linear(d, n_kv * self.hd, bias=False)
        self.v = nn.Linear(d, n_kv * self.hd, bias=False)
        self.o = nn.Linear(d, d, bias=False)
        self.gate = nn.Linear(d, d_ff, bias=False)
        self.up = nn.Linear(d, d_ff, bias=False)
        self.down = nn.Linear(d_ff, d, bias=False)

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        h = self.ln1(x)
        q = self.q(h).view(B, T, self.n_head, self.hd).transpose(1, 2)
        k = self.k(h).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        v = self.v(h).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        x = x + self.o(a.transpose(1, 2).reshape(B, T, -1))
        h = self.ln2(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class MinimalLlama(nn.Module):
    def __init__(self, vocab, shape):
        super().__init__()
        self.embed = nn.Embedding(vocab, shape.d_model)
        self.blocks = nn.ModuleList(Block(shape.d_model, shape.n_head, shape.n_kv_head, shape.d_ff)
                                    for _ in range(shape.n_layer))
        self.norm = RMSNorm(shape.d_model)
        self.head = nn.Linear(shape.d_model, vocab, bias=False)
        self.head.weight = self.embed.weight
        hd = shape.d_model // shape.n_head
        inv = 1.0 / (shape.rope_theta ** (torch.arange(0, hd, 2).float() / hd))
        freqs = torch.outer(torch.arange(shape.max_seq_len).float(), inv)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)

    def forward(self, idx):
        T = idx.shape[1]
        x = self.embed(idx)
        cos, sin = self.cos[:T], self.sin[:T]
        for b in self.blocks:
            x = b(x, cos, sin)
        return self.head(self.norm(x))


def run_minimal(work: Path, cfg, args) -> float:
    from gptsmith.model import resolve_shape
    from gptsmith.tokenizer import load_tokenizer
    from gptsmith.train.common import lr_multiplier, param_groups

    pc, dev = cfg.pretrain, torch.device(args.device)
    data = batches(work, cfg)
    torch.manual_seed(pc.seed)
    model = MinimalLlama(len(load_tokenizer(work / "tokenizer")), resolve_shape(cfg.model)).to(dev)
    opt = torch.optim.AdamW(param_groups(model, pc.weight_decay), lr=pc.lr, betas=(pc.beta1, pc.beta2),
                            fused=True)  # the same optimizer kernel in all three loops
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_multiplier(s, pc.max_steps, pc.warmup_steps))
    fwd = torch.compile(model) if dev.type == "cuda" and args.compile != "off" else model
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else torch.autocast("cpu", enabled=False)
    times = []
    for batch in data:
        batch = batch.to(dev, non_blocking=True)
        with amp:
            logits = fwd(batch[:, :-1])
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), batch[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), pc.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter())
    return steady_tokens_per_s(times, pc.batch_size * pc.seq_len, args.warmup)


# ---------------------------------------------------------------------------------------------- (c) Trainer

def run_trainer(work: Path, cfg, args) -> float:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    pc = cfg.pretrain
    # input_ids = labels = the first seq_len tokens: the model shifts labels itself, so the forward pass has
    # exactly gptsmith's shape (seq_len positions, vocab-wide logits)
    rows = [w[:-1] for b in batches(work, cfg) for w in b]
    dataset = [{"input_ids": r, "labels": r} for r in rows]
    times = []

    class Timer(TrainerCallback):
        def on_step_end(self, targs, state, control, **kw):
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter())

    targs = TrainingArguments(
        output_dir=tempfile.mkdtemp(), max_steps=pc.max_steps, per_device_train_batch_size=pc.batch_size,
        learning_rate=pc.lr, weight_decay=pc.weight_decay, adam_beta1=pc.beta1, adam_beta2=pc.beta2,
        max_grad_norm=pc.grad_clip, warmup_steps=pc.warmup_steps, lr_scheduler_type="cosine",
        train_sampling_strategy="sequential", save_strategy="no", report_to=[], logging_steps=10 ** 9,
        dataloader_num_workers=0, use_cpu=args.device == "cpu", bf16=args.device.startswith("cuda"),
        torch_compile=args.device.startswith("cuda") and args.compile != "off", disable_tqdm=True, seed=pc.seed,
        optim="adamw_torch_fused")
    Trainer(model=hf_model(work, cfg), args=targs, train_dataset=dataset, callbacks=[Timer()]).train()
    return steady_tokens_per_s(times, pc.batch_size * pc.seq_len, args.warmup)


# ---------------------------------------------------------------------------------------------- driver

PHASES = {"gptsmith": run_gptsmith, "minimal": run_minimal, "trainer": run_trainer}


def child(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = project_config(args)
    tok_s = PHASES[args.phase](Path(args.work), cfg, args)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps({"tokens_per_s": tok_s, "peak_rss_mb": rss_mb}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=10, help="steps left out of the tokens/s figure")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off"], help="torch.compile (auto = CUDA)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--phases", default="gptsmith,minimal,trainer")
    p.add_argument("--repeats", type=int, default=1, help="run the phases round-robin this many times, keep the best")
    p.add_argument("--phase", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.phase:
        return child(args)

    from gptsmith.model import flops_per_token
    from gptsmith.train.common import measure_matmul_flops

    with tempfile.TemporaryDirectory() as tmp:
        work = make_workdir(Path(tmp) / "work", args.vocab_size)
        cfg = project_config(args)
        model = hf_model(work, cfg)
        fpt = flops_per_token(model, args.seq_len)
        dev = torch.device(args.device)
        if args.threads:
            torch.set_num_threads(args.threads)
        peak = measure_matmul_flops(dev, torch.bfloat16 if dev.type == "cuda" else torch.float32)
        print(f"preset {args.preset}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, seq {args.seq_len}, "
              f"batch {args.batch_size}, {args.steps} steps ({args.warmup} warm-up), device {args.device}, "
              f"threads {args.threads or torch.get_num_threads()}, measured matmul peak {peak / 1e12:.3f} TFLOP/s")
        results: dict[str, dict] = {}
        for _ in range(args.repeats):
            for phase in args.phases.split(","):
                cmd = [sys.executable, __file__, "--phase", phase, "--work", str(work)] + sys.argv[1:]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
                if proc.returncode or not lines:
                    print(f"{phase} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
                    continue
                r = json.loads(lines[-1][7:])
                if phase not in results or r["tokens_per_s"] > results[phase]["tokens_per_s"]:
                    results[phase] = r
        print(f"\n{'loop':<10} {'tokens/s':>12} {'MFU':>8} {'peak RSS MB':>12}")
        for phase, r in results.items():
            print(f"{phase:<10} {r['tokens_per_s']:>12,.0f} {fpt * r['tokens_per_s'] / peak:>8.2%} "
                  f"{r['peak_rss_mb']:>12,.0f}")
        g = results.get("gptsmith", {}).get("tokens_per_s", math.nan)
        for base in ("minimal", "trainer"):
            if base in results:
                print(f"gptsmith / {base}: {g / results[base]['tokens_per_s']:.3f}x")


if __name__ == "__main__":
    main()
