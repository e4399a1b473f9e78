"""Tokenize cleaned JSONL into packed token shards (the `gptsmith.tokens.v1` format, see `tokenize_split`).

Each document is written as [bos] + tokens, back to back, as a flat little-endian uint16/uint32 array with no
header, so `np.memmap(path, dtype, mode="r")` reads a shard. Worker processes each load the tokenizer once
and encode chunks of raw JSONL lines; the parent writes results in input order, so the shards are the same
for any number of workers.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

FORMAT = "gptsmith.tokens.v1"
CHUNK_BYTES = 1 << 20  # ~1 MB of JSONL per task: big enough to amortise IPC, small enough to stream

_worker: dict = {}


def dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


def _init_worker(tokenizer_json: str, bos_id: int, dtype: str) -> None:
    # One rayon thread per worker: the pool already uses every core, more threads would only fight over them.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer

    _worker.update(tok=Tokenizer.from_file(tokenizer_json), bos=bos_id, dtype=np.dtype(dtype))


def encode_chunk(lines: list[bytes]) -> tuple[np.ndarray, np.ndarray, int, int]:
    """JSONL lines -> ([bos] + ids per document, concatenated; each document's length in tokens;
    UTF-8 bytes of the texts; JSONL bytes read)."""
    texts = [json.loads(line)["text"] for line in lines]
    encs = _worker["tok"].encode_batch_fast(texts, add_special_tokens=False)
    bos, dtype = _worker["bos"], _worker["dtype"]
    lengths = np.fromiter((len(e.ids) + 1 for e in encs), dtype=np.int64, count=len(encs))
    out = np.empty(int(lengths.sum()), dtype=dtype)
    pos = 0
    for e, n in zip(encs, lengths):
        out[pos] = bos
        out[pos + 1: pos + n] = e.ids
        pos += n
    return out, lengths, sum(len(t.encode("utf-8")) for t in texts), sum(map(len, lines))


def _chunks(path: Path) -> Iterator[list[bytes]]:
    buf, size = [], 0
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                buf.append(line)
                size += len(line)
            if size >= CHUNK_BYTES:
                yield buf
                buf, size = [], 0
    if buf:
        yield buf


def _ordered_results(chunks: Iterator[list[bytes]], workers: int, initargs: tuple) -> Iterator[tuple]:
    """encode_chunk over `chunks`, in order, with at most a few chunks in flight per worker.

    Pool.imap would read the whole input ahead into its task queue (no back-pressure), which breaks the
    bounded-memory promise on a corpus larger than RAM; a bounded deque of async results doesn't.
    """
    if workers <= 1:
        _init_worker(*initargs)
        yield from map(encode_chunk, chunks)
        return
    # spawn, not fork: the parent may have used the tokenizers thread pool already (training), and a
    # forked Rust thread pool can deadlock.
    with mp.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=initargs) as pool:
        pending: deque = deque()
        for chunk in chunks:
            pending.append(pool.apply_async(encode_chunk, (chunk,)))
            if len(pending) >= 4 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def tokenize_split(jsonl: Path, out_dir: Path, split: str, tokenizer_json: Path, bos_id: int, vocab_size: int,
                   workers: int, shard_tokens: int) -> dict:
    """Write OUT_DIR/{split}_00000.bin, ... and return {"files", "tokens", "documents", "bytes"}."""
    dtype = dtype_for(vocab_size)
    # Starting a worker costs about a second (it imports and loads the tokenizer): no more workers than chunks.
    workers = min(workers, -(-jsonl.stat().st_size // CHUNK_BYTES))
    files, tokens, docs, nbytes = [], 0, 0, 0
    f, in_shard = None, 0
    bar = tqdm(total=jsonl.stat().st_size, unit="B", unit_scale=True, desc=f"tokenizing {split}",
               mininterval=0.5, dynamic_ncols=True)
    try:
        for arr, lengths, n_bytes, raw_bytes in _ordered_results(_chunks(jsonl), workers,
                                                                  (str(tokenizer_json), bos_id,
                                                                   dtype.name)):
            ends = np.cumsum(lengths)
            done_docs = 0
            while done_docs < len(lengths):
                start = int(ends[done_docs - 1]) if done_docs else 0
                # Whole documents only: as many as fit in the current shard (at least one in a fresh shard).
                fit = int(np.searchsorted(ends, start + shard_tokens - in_shard, side="right")) - done_docs
                if f is None or (fit == 0 and in_shard):
                    if f is not None:
                        f.close()
                    files.append(f"{split}_{len(files):05d}.bin")
                    f = open(out_dir / files[-1], "wb")
                    in_shard = 0
                    continue
                take = max(fit, 1)
                end = int(ends[done_docs + take - 1])
                arr[start:end].astype(dtype.newbyteorder("<"), copy=False).tofile(f)
                in_shard += end - start
                done_docs += take
            tokens += len(arr)
            docs += len(lengths)
            nbytes += n_bytes
            bar.update(raw_bytes)
            bar.set_postfix(tokens=f"{tokens:,}", refresh=False)
    finally:
        if f is not None:
            f.close()
        bar.close()
    return {"files": files, "tokens": tokens, "documents": docs, "bytes": nbytes}
