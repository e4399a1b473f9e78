"""Bits-per-byte and perplexity of a local model on text files: how well it predicts text it was not tuned on.

Every document is scored whole with the standard sliding-window method: windows of the model's full context, each
starting `stride` tokens after the one before, and each window scores only the tokens no earlier window scored, so
every token is predicted exactly once and, after the first window, with at least `context - stride` tokens of
history. A document starts with the tokenizer's document separator (BOS, as in pretraining), so its first token is
predicted too and every byte of the text counts.

bpb = total negative log-likelihood in bits / UTF-8 bytes of the text itself. The bytes do not depend on the
tokenizer, so bpb compares models with different tokenizers fairly. ppl = exp(nats per token) is token perplexity:
it depends on how the tokenizer splits the text, so compare it only between models that share a tokenizer; bpb is
the number to compare.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from gptsmith.errors import InputError
from gptsmith.files import iter_jsonl

# Files a folder contributes (anything else in it, e.g. images, is left out); a file named on its own is read
# as text whatever its suffix.
TEXT_SUFFIXES = {".txt", ".md", ".markdown", ".rst", ".py", ".pyi", ".tex", ".html", ".htm", ".xml", ".c", ".h",
                 ".cpp", ".hpp", ".js", ".ts", ".java", ".go", ".rs", ".sh", ".toml", ".yaml", ".yml", ".cfg",
                 ".ini", ".csv", ".jsonl"}
LOGITS_BUDGET = 1 << 27  # logits elements (batch x positions x vocabulary) per forward pass: ~0.5 GB in float32


@dataclass
class Document:
    id: str  # the file (relative to the folder), or FILE:LINE for a .jsonl record; pairs documents across runs
    text: str


def _read_text_file(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not valid UTF-8 (byte {e.start}); save the file as UTF-8 or leave it out") from None


def _read_jsonl(path: Path, shown: str) -> list[Document]:
    docs = []
    for lineno, record in iter_jsonl(path, '{"text": "..."}'):
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise InputError(f'{path}:{lineno}: no "text" string; each line of a text .jsonl must be '
                             '{"text": "..."}')
        if record["text"]:
            docs.append(Document(f"{shown}:{lineno}", record["text"]))
    return docs


def _read_file(path: Path, shown: str) -> list[Document]:
    if path.suffix == ".jsonl":
        return _read_jsonl(path, shown)
    text = _read_text_file(path)
    return [Document(shown, text)] if text else []


def read_documents(path: str | Path, limit: int | None = None) -> list[Document]:
    """The documents of a text file, a .jsonl with a "text" field (one document a line) or a folder (every text
    file in it, recursively, hidden ones left out, in name order; empty files are skipped)."""
    path = Path(path)
    if path.is_file():
        docs = _read_file(path, path.name)
        if not docs:
            raise InputError(f"{path}: the file has no text to score; give a file with text in it")
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        docs = [d for f in files for d in _read_file(f, f.relative_to(path).as_posix())]
        if not docs:
            raise InputError(f"{path}: no text found (files ending in {', '.join(sorted(TEXT_SUFFIXES))}, "
                             "not empty); point at a folder or file with text")
    else:
        raise InputError(f"{path}: no such file or folder")
    return docs[:limit] if limit else docs


@dataclass
class Window:
    doc: int  # index of the document
    ids: list[int]  # the tokens fed to the model
    first: int  # position in `ids` of the first token this window scores (it is predicted by position first - 1)


def document_windows(ids: list[int], context: int, stride: int, doc: int = 0) -> list[Window]:
    """Sliding windows over one document's tokens (ids[0] is the separator, never scored): windows of `context`
    tokens, `stride` apart; each scores the tokens after the previous window's end."""
    windows, scored_to = [], 1  # ids[0] has no prediction
    begin = 0
    while scored_to < len(ids):
        end = min(begin + context, len(ids))
        windows.append(Window(doc, ids[begin:end], scored_to - begin))
        scored_to = end
        begin += stride
    return windows


def _batches(windows: list[Window], vocab: int, batch_size: int | None):
    """Windows grouped for one forward pass each, longest first so a batch pads little."""
    order = sorted(windows, key=lambda w: -len(w.ids))
    i = 0
    while i < len(order):
        width = len(order[i].ids)
        n = batch_size or max(1, LOGITS_BUDGET // (width * vocab))
        yield order[i:i + n]
        i += n


def _forward_nll(model, batch: list[Window], pad: int, device, keep_ok: bool) -> list[tuple[float, int]]:
    """(sum of nats, tokens) over each window's scored tokens, from one forward pass of the right-padded batch.
    No attention mask is needed: padding only follows a window's tokens, and a causal model never looks ahead.
    Logits are made only from the first position that predicts a scored token on (logits_to_keep): a window
    after the first scores just its last `stride` tokens."""
    width = max(len(w.ids) for w in batch)
    ids = torch.tensor([w.ids + [pad] * (width - len(w.ids)) for w in batch], device=device)
    offset = min(w.first for w in batch) - 1 if keep_ok else 0
    kwargs = {"logits_to_keep": width - offset} if keep_ok else {}
    logits = model(input_ids=ids, use_cache=False, **kwargs).logits
    rows = torch.cat([torch.full((len(w.ids) - w.first,), r, dtype=torch.long) for r, w in enumerate(batch)])
    cols = torch.cat([torch.arange(w.first, len(w.ids)) for w in batch])
    rows, cols = rows.to(device), cols.to(device)
    nll = torch.nn.functional.cross_entropy(logits[rows, cols - 1 - offset].float(), ids[rows, cols],
                                            reduction="none")
    sums = torch.zeros(len(batch), dtype=torch.float64, device=device).index_add_(0, rows, nll.double())
    return [(s, len(w.ids) - w.first) for s, w in zip(sums.tolist(), batch)]


def keeps_logits(model) -> bool:
    """Whether the model's forward takes logits_to_keep (transformers' causal LMs do): logits only where needed."""
    import inspect

    return "logits_to_keep" in inspect.signature(model.forward).parameters


def separator(tokenizer) -> int:
    from gptsmith.data.shards import separator_id

    return separator_id(tokenizer)


def score_documents(engine, docs: list[Document], stride: int | None = None, batch_size: int | None = None,
                    desc: str = "bpb") -> list[dict]:
    """Per-document {"id", "nll_bits", "bytes", "tokens"}: the document's negative log-likelihood in bits, its
    UTF-8 bytes and the tokens scored (its tokens, without the separator)."""
    from tqdm.auto import tqdm

    from gptsmith.tokenizer import encode_text

    context = engine.max_context
    stride = stride or max(1, context // 2)
    if not 0 < stride < context:  # a window must keep one token of history to predict its first new token
        raise InputError(f"stride {stride} must be between 1 and the model's context - 1 ({context - 1})")
    sep = separator(engine.tokenizer)
    windows = []
    for i, doc in enumerate(docs):
        windows += document_windows([sep] + encode_text(engine.tokenizer, doc.text), context, stride, i)
    vocab = engine.model.get_output_embeddings().weight.shape[0]
    keep_ok = keeps_logits(engine.model)
    nats = [0.0] * len(docs)
    tokens = [0] * len(docs)
    pad = engine.tokenizer.pad_token_id if engine.tokenizer.pad_token_id is not None else sep
    with torch.inference_mode(), tqdm(total=sum(len(w.ids) - w.first for w in windows), desc=desc, unit="tok",
                                      unit_scale=True, leave=False) as bar:
        for batch in _batches(windows, vocab, batch_size):
            for w, (nll, n) in zip(batch, _forward_nll(engine.model, batch, pad, engine.device, keep_ok)):
                nats[w.doc] += nll
                tokens[w.doc] += n
                bar.update(n)
    return [{"id": d.id, "nll_bits": nats[i] / math.log(2), "bytes": len(d.text.encode("utf-8")),
             "tokens": tokens[i]} for i, d in enumerate(docs)]


def text_metrics(items: list[dict]) -> dict:
    """Suite metrics: bpb = bits / bytes over all documents; ppl = exp(nats / tokens), token perplexity
    (tokenizer-dependent: compare bpb across tokenizers)."""
    bits = sum(i["nll_bits"] for i in items)
    n_bytes = sum(i["bytes"] for i in items)
    tokens = sum(i["tokens"] for i in items)
    return {"bpb": bits / n_bytes if n_bytes else float("nan"),
            "ppl": math.exp(bits * math.log(2) / tokens) if tokens else float("nan"),
            "tokens": tokens, "bytes": n_bytes}
