"""Serving throughput under concurrency: aggregate decode tokens/s with 1, 4 and 16 concurrent streaming clients
against a real `gptsmith serve` process, time to first token (p50/p95) and the server's peak RSS.

    python benchmarks/bench_serve.py                        # a random preset-tiny model, built on the fly
    python benchmarks/bench_serve.py --model runs/sft --max-tokens 128 --concurrency 1 4 16
    python benchmarks/bench_serve.py --torch-threads 2      # the server's torch CPU threads (default: auto)

The baseline is concurrency 1 in the same run; continuous batching should give aggregate(16)/aggregate(1) >= 4.
Requests are greedy so every answer runs to --max-tokens (a random model never says end-of-turn), which keeps
the token counts comparable across rows. "server CPU ms/tok" is the server process's CPU time (all threads) per
generated token: unlike tok/s it barely moves when other programs load the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx


def build_random_model(out: Path, preset: str) -> Path:
    from gptsmith.config import ModelConfig
    from gptsmith.model import build_model, llama_config, resolve_shape, save_model_dir
    from gptsmith.tokenizer import load_tokenizer, train_tokenizer

    import pydoc_data.topics
    texts = [t for t in pydoc_data.topics.topics.values() if len(t) > 200]
    train_tokenizer(texts, out / "tokenizer", vocab_size=2048)
    tok = load_tokenizer(out / "tokenizer")
    cfg = llama_config(resolve_shape(ModelConfig(preset=preset)), len(tok), tok.bos_token_id, tok.eos_token_id,
                       tok.pad_token_id)
    return save_model_dir(build_model(cfg, seed=0), tok, out / f"random-{preset}")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):  # the kernel's high-water mark of resident memory
            return int(line.split()[1]) / 1024
    return float("nan")


async def one_stream(client: httpx.AsyncClient, model: str, max_tokens: int, i: int) -> tuple[float, int]:
    body = {"model": model, "messages": [{"role": "user", "content": f"Question number {i}: what is Python?"}],
            "max_tokens": max_tokens, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    t0, ttft, tokens = time.perf_counter(), None, 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            obj = json.loads(line[6:])
            if obj.get("usage"):
                tokens = obj["usage"]["completion_tokens"]
            elif ttft is None and obj["choices"] and obj["choices"][0]["delta"].get("content"):
                ttft = time.perf_counter() - t0
    return (ttft if ttft is not None else time.perf_counter() - t0), tokens


async def run_level(url: str, model: str, concurrency: int, requests: int, max_tokens: int) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        t0 = time.perf_counter()
        results = []
        for r in range(requests):  # `requests` waves of `concurrency` simultaneous streams
            results += await asyncio.gather(*(one_stream(client, model, max_tokens, r * concurrency + i)
                                              for i in range(concurrency)))
        wall = time.perf_counter() - t0
    ttfts = sorted(t for t, _ in results)
    tokens = sum(n for _, n in results)
    return {"concurrency": concurrency, "streams": len(results), "tokens": tokens, "wall_s": wall,
            "agg_tok_s": tokens / wall, "per_stream_tok_s": tokens / wall / concurrency,
            "ttft_p50_ms": 1000 * statistics.median(ttfts),
            "ttft_p95_ms": 1000 * ttfts[min(len(ttfts) - 1, int(round(0.95 * (len(ttfts) - 1))))]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="model dir (default: a random model of --preset, built in a tmp dir)")
    ap.add_argument("--preset", default="tiny", help="preset of the random model")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--requests", type=int, default=2, help="waves of concurrent streams per level")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--torch-threads", type=int, default=0, help="serve.torch_threads of the server (0 = auto)")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    model = args.model or build_random_model(tmp, args.preset)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "gptsmith.cli", "serve", "--model", str(model), "--port", str(port),
           "--db", f"sqlite:///{tmp / 'bench.db'}", "--device", args.device, "--serve.rate_limit_per_minute", "0",
           "--serve.max_batch_size", str(max(args.concurrency)), "--serve.max_tokens_limit", str(args.max_tokens),
           "--serve.torch_threads", str(args.torch_threads)]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              env=os.environ | {"GPTSMITH_API_KEY": ""})
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"server did not start:\n{server.stderr.read().decode()[-3000:]}")
            time.sleep(0.2)
        name = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        asyncio.run(run_level(url, name, 1, 1, 8))  # warm-up: first-call allocations, lazy imports
        rows = []
        for c in args.concurrency:
            cpu0 = cpu_seconds(server.pid)
            rows.append(asyncio.run(run_level(url, name, c, args.requests, args.max_tokens)))
            rows[-1]["cpu_ms_tok"] = 1000 * (cpu_seconds(server.pid) - cpu0) / max(rows[-1]["tokens"], 1)
        rss = peak_rss_mb(server.pid)
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()

    print(f"\nmodel {model} | {args.max_tokens} tokens per answer, greedy | device {args.device} | torch threads "
          f"{args.torch_threads or 'auto'}")
    print(f"{'clients':>7} {'streams':>7} {'tokens':>7} {'wall s':>7} {'agg tok/s':>10} {'tok/s/stream':>12} "
          f"{'TTFT p50 ms':>11} {'TTFT p95 ms':>11} {'server CPU ms/tok':>17}")
    for r in rows:
        print(f"{r['concurrency']:>7} {r['streams']:>7} {r['tokens']:>7} {r['wall_s']:>7.2f} {r['agg_tok_s']:>10.1f} "
              f"{r['per_stream_tok_s']:>12.1f} {r['ttft_p50_ms']:>11.0f} {r['ttft_p95_ms']:>11.0f} "
              f"{r['cpu_ms_tok']:>17.2f}")
    base = rows[0]["agg_tok_s"]
    for r in rows[1:]:
        print(f"aggregate({r['concurrency']}) / aggregate({rows[0]['concurrency']}) = {r['agg_tok_s'] / base:.2f}x")
    print(f"server peak RSS: {rss:.0f} MB")


if __name__ == "__main__":
    main()
