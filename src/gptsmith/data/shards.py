"""The packed token-shard format `gptsmith.tokens.v1`: its writer (`tokenize_split`), its reader
(`TokenShards`) and the manifest check (`read_manifest`), so the format is defined in this one module.

WORKDIR/tokens/manifest.json lists each split's shard files, token/document/byte counts, the dtype, the
vocabulary size and the document separator (`bos_token_id`). Each document is written as [separator] +
tokens, back to back, as a flat little-endian uint16/uint32 array with no header, so
`np.memmap(path, dtype, mode="r")` reads a shard. Worker processes each load the tokenizer once
and encode chunks of raw JSONL lines; the parent writes results in input order, so the shards are the same
for any number of workers.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from gptsmith.errors import InputError
from gptsmith.files import read_json

if TYPE_CHECKING:
    import torch

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


def separator_id(tokenizer, where: str | os.PathLike = "tokenizer") -> int:
    """The token written before every document: the tokenizer's bos (`<|endoftext|>` in ours, `<s>` in
    Llama's, `<|endoftext|>` in GPT-2's), else its eos, so any causal LM's tokenizer can pack a corpus.
    `tokenizer` is a transformers tokenizer; `where` names it in the error."""
    for name in ("bos_token_id", "eos_token_id"):
        tid = getattr(tokenizer, name, None)
        if tid is not None:
            return int(tid)
    raise InputError(f"{where}: the tokenizer has neither a bos nor an eos token, so documents cannot be "
                     f"separated; set bos_token or eos_token in its tokenizer_config.json")


# ---------------------------------------------------------------------------------------------- reader

def corpus_counts(manifest: dict) -> dict:
    """The counts of a prepared corpus, from its manifest: what `gptsmith prepare` prints and the report card
    shows, so the two never disagree. One rule: a document is a text as written to a split (after cleaning and
    de-duplication; a long one cut into pieces counts each piece it became), so the splits' documents add up to
    "kept" and to the sources' documents; tokens are the text's own, without the separator the shards put before
    each document. "read" (documents read from the inputs) is None for manifests older than this rule."""
    splits = manifest.get("splits") if isinstance(manifest.get("splits"), dict) else {}
    rows = {}
    for name, s in splits.items():
        if not isinstance(s, dict):
            continue
        docs, toks = s.get("documents"), s.get("tokens")
        rows[name] = {"documents": docs, "bytes": s.get("bytes"),
                      "tokens": toks - docs if isinstance(toks, int) and isinstance(docs, int) else toks}
    counted = manifest.get("documents") if isinstance(manifest.get("documents"), dict) else {}
    kept = sum(r["documents"] for r in rows.values() if isinstance(r["documents"], int))
    return {"splits": rows, "kept": kept, "read": counted.get("read"),
            "tokens": sum(r["tokens"] for r in rows.values() if isinstance(r["tokens"], int))}


def read_manifest(data_dir: str | Path) -> dict:
    data_dir = Path(data_dir)
    path = data_dir / "tokens" / "manifest.json"
    if not data_dir.is_dir():
        raise InputError(f"{data_dir}: data directory not found; create it with "
                         f"`gptsmith prepare INPUTS --out {data_dir}`")
    if not path.is_file():
        raise InputError(f"{path}: not found, so {data_dir} is not a prepared WORKDIR; run "
                         f"`gptsmith prepare INPUTS --out {data_dir}` (or `gptsmith data tokenize {data_dir}`)")
    try:
        manifest = read_json(path)
    except ValueError as e:
        raise InputError(f"{path}: not valid JSON ({e}); re-run `gptsmith data tokenize {data_dir}`") from None
    if manifest.get("format") != FORMAT:
        raise InputError(f"{path}: field 'format' is {manifest.get('format')!r}, expected '{FORMAT}'; "
                         f"re-run `gptsmith data tokenize {data_dir}` with this gptsmith version")
    for key in ("dtype", "vocab_size", "splits"):
        if key not in manifest:
            raise InputError(f"{path}: missing field '{key}'; re-run `gptsmith data tokenize {data_dir}`")
    return manifest


@dataclass
class TokenShards:
    """One split's shards, memory-mapped: nothing is read until a window is asked for."""

    arrays: list[np.ndarray]
    tokens: int
    bytes: int
    name: str
    # number of valid window starts per shard and their running sum, for uniform sampling over all shards
    counts: np.ndarray | None = field(default=None, repr=False)
    cum: np.ndarray | None = field(default=None, repr=False)
    indexed_seq_len: int = field(default=0, repr=False)

    @classmethod
    def open(cls, data_dir: str | Path, manifest: dict, split: str) -> "TokenShards":
        tok_dir = Path(data_dir) / "tokens"
        info = manifest["splits"].get(split)
        if not info or not info.get("files"):
            raise InputError(f"{tok_dir / 'manifest.json'}: no '{split}' split; re-run `gptsmith prepare` "
                             f"(data.val_fraction must be > 0 for a validation split)")
        dtype = np.dtype(manifest["dtype"])
        arrays = []
        for name in info["files"]:
            path = tok_dir / name
            if not path.is_file():
                raise InputError(f"{path}: listed in manifest.json but missing; re-run `gptsmith data tokenize`")
            if path.stat().st_size % dtype.itemsize:
                raise InputError(f"{path}: size is not a multiple of {dtype.itemsize} bytes ({dtype}); "
                                 f"the file is truncated; re-run `gptsmith data tokenize`")
            if path.stat().st_size:
                arrays.append(np.memmap(path, dtype=dtype, mode="r"))
        tokens = sum(len(a) for a in arrays)
        return cls(arrays, tokens, int(info.get("bytes", 0)), split)

    def _index(self, seq_len: int) -> None:
        if self.counts is None or self.indexed_seq_len != seq_len:
            self.counts = np.array([max(0, len(a) - seq_len) for a in self.arrays], dtype=np.int64)
            self.cum = np.cumsum(self.counts)
            self.indexed_seq_len = seq_len
        if not len(self.cum) or self.cum[-1] == 0:
            raise InputError(f"the '{self.name}' split has no shard longer than seq_len + 1 = {seq_len + 1} tokens; "
                             f"lower --pretrain.seq_len or add data")

    def random_batch(self, seq_len: int, batch_size: int, rng: np.random.Generator) -> "torch.Tensor":
        """batch_size windows of seq_len + 1 tokens, uniform over every valid start in every shard."""
        import torch  # here, not at the top: tokenizer worker processes import this module and need no torch

        self._index(seq_len)
        idx = rng.integers(0, self.cum[-1], size=batch_size)
        shard = np.searchsorted(self.cum, idx, side="right")
        start = idx - (self.cum[shard] - self.counts[shard])
        rows = [self.arrays[s][o:o + seq_len + 1] for s, o in zip(shard, start)]
        return torch.from_numpy(np.stack(rows).astype(np.int64))

    def fixed_windows(self, seq_len: int, n: int) -> list[np.ndarray]:
        """The first n non-overlapping windows: the same validation tokens every time, for comparable losses."""
        out = []
        for a in self.arrays:
            for start in range(0, len(a) - seq_len, seq_len):
                if len(out) == n:
                    return out
                out.append(a[start:start + seq_len + 1])
        if not out:
            raise InputError(f"the '{self.name}' split has fewer than seq_len + 1 = {seq_len + 1} tokens in every "
                             f"shard; lower --pretrain.seq_len or give more validation data (data.val_fraction)")
        return out
