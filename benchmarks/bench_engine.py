"""Decode speed of the gptsmith engine against `transformers` `model.generate()`, same model, same prompt,
same sampling settings, in one run.

    python benchmarks/bench_engine.py                       # presets tiny and small, 8192 vocab
    python benchmarks/bench_engine.py --presets tiny --new-tokens 64 --repeats 1   # quick check
    python benchmarks/bench_engine.py --threads 1 2          # one table per torch thread count

Models are randomly initialised (speed does not depend on the weights) and end-of-sequence is switched off
for both, so every run generates exactly --new-tokens tokens. Decode tokens/s excludes the prompt:
(N - 1) / (time for N tokens - time for 1 token), per sequence times the batch size.
HF and the engine are timed interleaved (HF N, engine N, HF 1, engine 1, repeated), and each rate uses the
median of the repeats, so load from other processes hits both alike. The rate is given on wall time and on
CPU time (process_time: all threads of this process), and the ratio on both.
Peak RSS is the process's high-water mark after the row (so it only grows down the table).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

PROMPT = ("Python is a programming language that lets you work quickly and integrate systems more effectively. "
          "The standard library offers a wide range of facilities, including modules for")


def build(preset: str, tok_dir: Path, out: Path) -> Path:
    from gptsmith.config import ModelConfig
    from gptsmith.model import build_model, llama_config, resolve_shape, save_model_dir
    from gptsmith.tokenizer import load_tokenizer

    tok = load_tokenizer(tok_dir)
    cfg = llama_config(resolve_shape(ModelConfig(preset=preset)), len(tok), tok.bos_token_id, tok.eos_token_id,
                       tok.pad_token_id)
    return save_model_dir(build_model(cfg, seed=0), tok, out / preset)


def timed(fn) -> tuple[float, float]:
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def decode_rates(runs: dict, n: int, batch: int, repeats: int) -> dict:
    """{name: (wall tok/s, cpu tok/s)} for each `run(n_tokens)` in runs, timed interleaved."""
    for run in runs.values():
        run(2)  # warm-up
    times = {(name, k): [] for name in runs for k in (n, 1)}
    for _ in range(repeats):
        for k in (n, 1):
            for name, run in runs.items():
                times[(name, k)].append(timed(lambda: run(k)))
    out = {}
    for name in runs:
        rate = []
        for j in (0, 1):  # wall, cpu
            t_n = statistics.median(t[j] for t in times[(name, n)])
            t_1 = statistics.median(t[j] for t in times[(name, 1)])
            rate.append(batch * (n - 1) / max(t_n - t_1, 1e-9))
        out[name] = tuple(rate)
    return out


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["tiny", "small"])
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=5, help="median of N interleaved timings")
    ap.add_argument("--threads", type=int, nargs="+", default=[0],
                    help="torch thread counts to measure (both HF and the engine); 0 = torch's default")
    args = ap.parse_args()
    threads = [t or torch.get_num_threads() for t in args.threads]

    from gptsmith.engine import Engine, SamplingParams
    from gptsmith.tokenizer import train_tokenizer

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import python_doc_texts

    tmp = Path(tempfile.mkdtemp(prefix="bench_engine_"))
    print(f"training a {args.vocab_size}-token tokenizer on Python's docs ...", file=sys.stderr)
    train_tokenizer(python_doc_texts(), tmp / "tok", vocab_size=args.vocab_size)
    settings = {
        "greedy": dict(temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0),
        "sampled": dict(temperature=0.8, top_k=50, top_p=0.95, repetition_penalty=1.1),
    }
    rows = []
    for preset in args.presets:
        engine = Engine.load(build(preset, tmp / "tok", tmp), device="cpu")
        engine.stop_ids = set()  # no early stop: every run makes exactly N tokens
        model = engine.model
        model.generation_config.eos_token_id = None
        ids = engine.encode(PROMPT)
        for batch in args.batches:
            for name, s in settings.items():
                params = SamplingParams(max_new_tokens=args.new_tokens, seed=0, **s)

                def ours(n, params=params, batch=batch):
                    p = SamplingParams(**{**params.__dict__, "max_new_tokens": n})
                    engine.generate([ids] * batch, p)

                def hf(n, s=s, batch=batch):
                    kw = dict(do_sample=True, temperature=s["temperature"], top_k=s["top_k"], top_p=s["top_p"]) \
                        if s["temperature"] > 0 else dict(do_sample=False)
                    with torch.inference_mode():
                        model.generate(torch.tensor([ids] * batch), max_new_tokens=n, min_new_tokens=0,
                                       repetition_penalty=s["repetition_penalty"], pad_token_id=1, **kw)

                for th in threads:
                    torch.set_num_threads(th)
                    r = decode_rates({"hf": hf, "engine": ours}, args.new_tokens, batch, args.repeats)
                    rows.append((preset, batch, name, th, r["hf"], r["engine"], peak_rss_mb()))
                    print(f"  {preset} batch {batch} {name} threads {th}: hf {r['hf'][0]:.0f} tok/s, "
                          f"engine {r['engine'][0]:.0f} tok/s (wall)", file=sys.stderr)

    print(f"\nDecode tokens/s, {args.new_tokens} new tokens after a {len(ids)}-token prompt, vocab "
          f"{args.vocab_size}, median of {args.repeats} interleaved runs; wall time and CPU time\n")
    head = f"{'model':<7} {'batch':>5} {'sampling':<8} {'threads':>7} {'HF wall':>8} {'engine wall':>11} " \
           f"{'ratio':>6} {'HF cpu':>7} {'engine cpu':>10} {'ratio':>6} {'peak RSS MB':>11}"
    print(head)
    print("-" * len(head))
    for preset, batch, name, th, (hw, hc), (ew, ec), rss in rows:
        print(f"{preset:<7} {batch:>5} {name:<8} {th:>7} {hw:>8.0f} {ew:>11.0f} {ew / hw:>5.2f}x {hc:>7.0f} "
              f"{ec:>10.0f} {ec / hc:>5.2f}x {rss:>11.0f}")


if __name__ == "__main__":
    main()
