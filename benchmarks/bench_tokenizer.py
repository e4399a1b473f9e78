"""Tokenizer benchmark on the quickstart corpus (Python's documentation, `python-docs`).

gptsmith's tokenizer (byte-level BPE with GPT-4's split pattern, trained by `gptsmith.tokenizer.train_tokenizer`)
against GPT-2's byte-level BPE (`tokenizers.ByteLevelBPETokenizer`) trained with the same vocabulary on the same
text, in the same run. Bytes per token are measured on held-out documents (every 10th). Each case runs in its
own process so its peak RSS is its own (the pool row includes its workers).

    python benchmarks/bench_tokenizer.py                 # vocab 8192, corpus x5 for the encode timings
    python benchmarks/bench_tokenizer.py --quick         # vocab 2048, corpus x1: a check that it runs
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


def corpus() -> tuple[list[str], list[str]]:
    from gptsmith.data.clean import clean_text
    from gptsmith.data.embedded import python_docs

    docs = [t for t in (clean_text(d) for d in python_docs()) if t]
    return [d for i, d in enumerate(docs) if i % 10], [d for i, d in enumerate(docs) if i % 10 == 0]


def mb(texts: list[str]) -> float:
    return sum(len(t.encode("utf-8")) for t in texts) / 1e6


def peak_rss_mb(children: bool = False) -> float:
    who = resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF
    return resource.getrusage(who).ru_maxrss / 1024  # kilobytes on Linux


def encode_rate(encode_batch, texts: list[str], repeat: int) -> tuple[float, int]:
    t0 = time.perf_counter()
    n_tokens = 0
    for _ in range(repeat):
        for i in range(0, len(texts), 256):
            n_tokens += sum(len(e.ids) for e in encode_batch(texts[i:i + 256]))
    return mb(texts) * repeat / (time.perf_counter() - t0), n_tokens // repeat


def case_ours(args, work: Path) -> dict:
    from tokenizers import Tokenizer

    from gptsmith.tokenizer import train_tokenizer

    train, held = corpus()
    t0 = time.perf_counter()
    train_tokenizer(train, work / "ours", vocab_size=args.vocab_size)  # the pipeline rows reuse it
    train_s = time.perf_counter() - t0
    tok = Tokenizer.from_file(str(work / "ours" / "tokenizer.json"))
    _, held_tokens = encode_rate(lambda b: tok.encode_batch_fast(b, add_special_tokens=False), held, 1)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread: a per-core number
    rate, _ = encode_rate(lambda b: tok.encode_batch_fast(b, add_special_tokens=False), train + held, args.repeat)
    return {"train_s": train_s, "encode_mb_s": rate, "bytes_per_token": mb(held) * 1e6 / held_tokens,
            "rss_mb": peak_rss_mb()}


def case_pipeline(args, work: Path, workers: int) -> dict:
    """`gptsmith data tokenize`'s own path: JSONL in, packed shards out, with `workers` processes."""
    from gptsmith.data.shards import tokenize_split

    train, held = corpus()
    jsonl = work / f"corpus{workers}.jsonl"
    with open(jsonl, "w", encoding="utf-8") as f:
        for _ in range(args.repeat):
            for t in train + held:
                f.write(json.dumps({"text": t, "source": "python-docs"}, ensure_ascii=False) + "\n")
    out = work / f"shards{workers}"
    out.mkdir()
    t0 = time.perf_counter()
    info = tokenize_split(jsonl, out, "train", work / "ours" / "tokenizer.json", 0, args.vocab_size, workers, 10**9)
    seconds = time.perf_counter() - t0
    return {"encode_mb_s": info["bytes"] / 1e6 / seconds, "rss_mb": peak_rss_mb() + peak_rss_mb(children=True)}


def case_gpt2(args, work: Path) -> dict:
    from tokenizers import ByteLevelBPETokenizer

    from gptsmith.tokenizer import SPECIAL_TOKENS

    train, held = corpus()
    tok = ByteLevelBPETokenizer()
    t0 = time.perf_counter()
    tok.train_from_iterator(train, vocab_size=args.vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
                            show_progress=False)
    train_s = time.perf_counter() - t0
    _, held_tokens = encode_rate(lambda b: tok.encode_batch(b, add_special_tokens=False), held, 1)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    rate, _ = encode_rate(lambda b: tok.encode_batch(b, add_special_tokens=False), train + held, args.repeat)
    return {"train_s": train_s, "encode_mb_s": rate, "bytes_per_token": mb(held) * 1e6 / held_tokens,
            "rss_mb": peak_rss_mb()}


def run_case(name: str, args) -> dict:
    cmd = [sys.executable, __file__, "--case", name, "--vocab-size", str(args.vocab_size), "--repeat",
           str(args.repeat), "--workers", str(args.workers), "--work", args.work]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"case {name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--repeat", type=int, default=5, help="passes over the corpus for the encode timings")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="worker processes for the pool row")
    p.add_argument("--quick", action="store_true", help="vocab 2048, one pass: check that it runs")
    p.add_argument("--case", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        args.vocab_size, args.repeat = 2048, 1
    if args.case:
        work = Path(args.work)
        if args.case == "ours":
            res = case_ours(args, work)
        elif args.case == "gpt2":
            res = case_gpt2(args, work)
        else:
            res = case_pipeline(args, work, int(args.case.split("-")[1]))
        print(json.dumps(res))
        return

    train, held = corpus()
    print(f"corpus: python-docs, {len(train) + len(held)} documents, {mb(train + held):.2f} MB "
          f"(bytes/token on {len(held)} held-out documents); vocab {args.vocab_size}; "
          f"encode timings over {args.repeat} pass(es); {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory() as tmp:
        args.work = tmp
        ours, gpt2 = run_case("ours", args), run_case("gpt2", args)
        pipe1, pipen = run_case("pipeline-1", args), run_case(f"pipeline-{args.workers}", args)
    rows = [
        ("gptsmith BPE: train", f"{ours['train_s']:.2f} s", ours["rss_mb"], gpt2["train_s"] / ours["train_s"]),
        ("gptsmith BPE: encode, 1 thread", f"{ours['encode_mb_s']:.2f} MB/s", ours["rss_mb"],
         ours["encode_mb_s"] / gpt2["encode_mb_s"]),
        ("gptsmith tokenize: 1 process (JSONL -> shards)", f"{pipe1['encode_mb_s']:.2f} MB/s", pipe1["rss_mb"],
         pipe1["encode_mb_s"] / gpt2["encode_mb_s"]),
        (f"gptsmith tokenize: {args.workers} workers (JSONL -> shards)", f"{pipen['encode_mb_s']:.2f} MB/s",
         pipen["rss_mb"], pipen["encode_mb_s"] / gpt2["encode_mb_s"]),
        ("gptsmith BPE: bytes/token (held out)", f"{ours['bytes_per_token']:.3f}", ours["rss_mb"],
         ours["bytes_per_token"] / gpt2["bytes_per_token"]),
        ("baseline GPT-2 ByteLevelBPE: train", f"{gpt2['train_s']:.2f} s", gpt2["rss_mb"], 1.0),
        ("baseline GPT-2 ByteLevelBPE: encode, 1 thread", f"{gpt2['encode_mb_s']:.2f} MB/s", gpt2["rss_mb"], 1.0),
        ("baseline GPT-2 ByteLevelBPE: bytes/token (held out)", f"{gpt2['bytes_per_token']:.3f}", gpt2["rss_mb"], 1.0),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"\n{'measure':<{width}}  {'value':>12}  {'peak RSS':>9}  {'vs GPT-2 (higher = better)':>26}")
    for name, value, rss, ratio in rows:
        print(f"{name:<{width}}  {value:>12}  {rss:>6.0f} MB  {ratio:>25.2f}x")


if __name__ == "__main__":
    main()
