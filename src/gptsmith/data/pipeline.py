"""`gptsmith prepare` = clean -> tokenizer -> tokenize, each also a command of its own.

    WORKDIR/clean/{train,val}.jsonl, clean/report.json   data clean
    WORKDIR/tokenizer/                                    tokenizer train
    WORKDIR/tokens/{train,val}_NNNNN.bin, manifest.json   data tokenize

Every stage writes into a temp directory and swaps it in at the end, so a rerun replaces the old output
cleanly and a killed run leaves the previous complete output (or none), never half of one.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from gptsmith.config import ProjectConfig, save_config
from gptsmith.data.clean import (
    SPLIT_PIECE_CHARS, SeenDigests, assign_split, clean_text, digest, split_long, split_pieces,
)
from gptsmith.data.readers import ReadContext, describe_ignored, read_source, resolve_inputs
from gptsmith.errors import InputError
from gptsmith.files import atomic_write_json, iter_lines, read_json, replace_dir

SPLITS = ("train", "val")


def _tmp_dir(final: Path) -> Path:
    # Leftovers of a killed run (any pid) are incomplete by definition: remove them.
    if final.parent.exists():
        for stale in final.parent.glob(f".{final.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    tmp.mkdir(parents=True)
    return tmp


def iter_texts(jsonl: str | os.PathLike) -> Iterator[str]:
    """The texts of a cleaned split, streamed."""
    for _, line in iter_lines(jsonl):
        if line.strip():
            yield json.loads(line)["text"]


def _fmt(counts: dict) -> str:
    return ", ".join(f"{k.replace('_', ' ')} {v:,}" for k, v in counts.items() if v) or "none"


def _empty_corpus(read: int, dropped: Counter, skipped: Counter, cfg: ProjectConfig) -> InputError:
    why = []
    if dropped["too_short"]:
        why.append(f"{dropped['too_short']:,} shorter than data.min_chars={cfg.data.min_chars} "
                   f"(lower it with --data.min_chars N)")
    if dropped["duplicate"]:
        why.append(f"{dropped['duplicate']:,} exact duplicates")
    if sum(skipped.values()):
        why.append(f"{sum(skipped.values()):,} bad inputs skipped ({_fmt(skipped)})")
    return InputError(f"no documents left after cleaning: read {read:,}, dropped {read:,}"
                      + (f": {'; '.join(why)}" if why else " (the inputs hold no text)"))


@dataclass
class _Closest:
    """The train piece the hash ranks closest to validation, moved there if validation would be empty."""
    score: float
    line: str  # the train.jsonl line that holds it
    pieces: list[str]  # that line's pieces
    index: int
    source: str


def _runs(pieces: list[str], val_fraction: float, seed: int) -> list[tuple[str, list[str], list[float]]]:
    """Each piece's split by its own content hash; neighbours on the same side stay joined as one document."""
    runs: list[tuple[str, list[str], list[float]]] = []
    for piece in pieces:
        split, score = assign_split(digest(piece), val_fraction, seed)
        if runs and runs[-1][0] == split:
            runs[-1][1].append(piece)
            runs[-1][2].append(score)
        else:
            runs.append((split, [piece], [score]))
    return runs


def _joined(pieces: list[str]) -> str:
    return "".join(pieces).lstrip("\n").rstrip()


def _line(text: str, source: str) -> str:
    return json.dumps({"text": text, "source": source}, ensure_ascii=False) + "\n"


class _SplitWriter:
    """Writes kept documents to DIR/{train,val}.jsonl by the content-hash split, piece by piece for long ones,
    counting documents and bytes per split."""

    def __init__(self, out_dir: Path, val_fraction: float, seed: int):
        self.out_dir, self.val_fraction, self.seed = out_dir, val_fraction, seed
        self.files = {split: open(out_dir / f"{split}.jsonl", "w", encoding="utf-8", newline="\n")
                      for split in SPLITS}
        self.docs, self.bytes = Counter(train=0, val=0), Counter(train=0, val=0)
        self.cut = 0  # documents split into pieces
        self.closest: _Closest | None = None

    def write(self, text: str, source: str) -> int:
        """Returns how many documents the text became (a long one: one per run of pieces on one side)."""
        pieces = split_pieces(text)
        self.cut += len(pieces) > 1
        runs = _runs(pieces, self.val_fraction, self.seed)
        for split, run, scores in runs:
            joined = _joined(run)
            line = _line(joined, source)
            self.files[split].write(line)
            self.docs[split] += 1
            self.bytes[split] += len(joined.encode("utf-8"))
            low = min(range(len(scores)), key=scores.__getitem__)
            if split == "train" and (self.closest is None or scores[low] < self.closest.score):
                self.closest = _Closest(scores[low], line, run, low, source)
        return len(runs)

    def close(self) -> None:
        for f in self.files.values():
            f.close()

    def ensure_validation(self) -> tuple[str, int] | None:
        """Validation must never be empty: move the train piece the hash ranks closest to val, which is as
        order-independent as the split itself (when there are two documents or pieces to choose from).
        Returns (the moved piece's source, documents added by the move) for the source's count, or None."""
        c = self.closest
        if self.docs["val"] or c is None or (self.docs["train"] < 2 and len(c.pieces) < 2):
            return None
        kept, moved = _move_piece(self.out_dir / "train.jsonl", self.out_dir / "val.jsonl", c)
        self.docs.update(train=len(kept) - 1, val=1)
        self.bytes.update(val=len(moved.encode("utf-8")), train=sum(len(t.encode("utf-8")) for t in kept)
                          - len(_joined(c.pieces).encode("utf-8")))
        return c.source, len(kept)


def clean(inputs: list[str], out: str | os.PathLike, cfg: ProjectConfig) -> dict:
    """Read, clean, filter, de-duplicate and split `inputs` into OUT/clean/{train,val}.jsonl.
    A document longer than SPLIT_PIECE_CHARS is split piece by piece, so one long text still gets validation."""
    d = cfg.data
    out = Path(out)
    ignored: Counter = Counter()
    sources = resolve_inputs(inputs, ignored)
    ctx = ReadContext(text_field=d.text_field, on_error=d.on_error, hub_split=d.hub_split, hub_config=d.hub_config)
    final = out / "clean"
    tmp = _tmp_dir(final)
    seen = SeenDigests()
    read, dropped = 0, Counter(too_short=0, duplicate=0)
    splits = _SplitWriter(tmp, d.val_fraction, d.seed)
    docs = splits.docs
    try:
        with tqdm(desc="reading", unit="char", unit_scale=True, mininterval=0.5, dynamic_ncols=True) as bar:
            for src in sources:
                if d.max_documents and docs.total() >= d.max_documents:
                    break
                bar.set_postfix_str(Path(src.path).name[-30:], refresh=False)
                for raw in read_source(src, ctx):
                    if d.max_documents and docs.total() >= d.max_documents:
                        break  # leaving the generator closes a streamed hub dataset too
                    read += 1
                    bar.update(len(raw))
                    for text in split_long(clean_text(raw), d.max_chars):
                        if len(text) < d.min_chars:
                            dropped["too_short"] += 1
                        elif d.dedup and not seen.add(digest(text)):
                            dropped["duplicate"] += 1
                        else:
                            # a source's documents are counted as the splits count them (corpus_counts)
                            src.documents += splits.write(text, src.path)
        splits.close()
        if docs.total() == 0:
            raise _empty_corpus(read, dropped, ctx.skipped, cfg)
        moved = splits.ensure_validation()
        if moved:  # one train document became its kept parts in train plus the moved piece in val
            next(src for src in sources if src.path == moved[0]).documents += moved[1]
        report = {
            "inputs": [str(i) for i in inputs],
            "documents": {"read": read, "kept": docs.total(), **docs},
            "bytes": dict(splits.bytes),
            "dropped": dict(dropped),
            "skipped": dict(ctx.skipped),
            "ignored_files": dict(ignored),
            "split": {"piece_chars": SPLIT_PIECE_CHARS, "documents_split_in_pieces": splits.cut},
            "sources": [s.record() for s in sources],
            "config": d.model_dump(mode="json"),
        }
        atomic_write_json(tmp / "report.json", report)
        replace_dir(tmp, final)
    finally:
        splits.close()
        shutil.rmtree(tmp, ignore_errors=True)
    save_config(cfg, out)
    print(f"clean: read {read:,} documents, kept {docs.total():,} (train {docs['train']:,}, val {docs['val']:,}); "
          f"dropped: {_fmt(dropped)}; skipped: {_fmt(ctx.skipped)}; files not read: {describe_ignored(ignored)} "
          f"-> {final}")
    if splits.cut:
        print(f"clean: {splits.cut:,} document(s) longer than {SPLIT_PIECE_CHARS:,} characters were split into train "
              f"and validation by pieces of about that size (at paragraph or line breaks)")
    return report


def _move_piece(train: Path, val: Path, closest: _Closest) -> tuple[list[str], str]:
    """Move `closest`'s piece from train to val; the train line that held it becomes the text before and the text
    after the piece (as two documents, either left out when empty). Returns (those train texts, the moved text)."""
    i = closest.index
    kept = [t for t in (_joined(closest.pieces[:i]), _joined(closest.pieces[i + 1:])) if t]
    moved = _joined([closest.pieces[i]])
    rewritten = train.with_suffix(".jsonl.tmp")
    done = False
    with open(train, encoding="utf-8", newline="\n") as fin, \
            open(rewritten, "w", encoding="utf-8", newline="\n") as fout:
        for cur in fin:
            if not done and cur == closest.line:
                done = True
                fout.writelines(_line(t, closest.source) for t in kept)
                continue
            fout.write(cur)
    os.replace(rewritten, train)
    with open(val, "a", encoding="utf-8", newline="\n") as f:
        f.write(_line(moved, closest.source))
    return kept, moved


def _require(path: Path, what: str, fix: str) -> Path:
    if not path.exists():
        raise InputError(f"{path}: {what} not found; {fix}")
    return path


def train_tokenizer_on_workdir(workdir: str | os.PathLike, cfg: ProjectConfig, out_dir: str | os.PathLike | None = None):
    """Train the byte-level BPE on WORKDIR/clean/train.jsonl (streamed, capped at tokenizer.max_train_chars)."""
    from gptsmith.tokenizer import bytes_per_token, train_tokenizer

    workdir = Path(workdir)
    train = _require(workdir / "clean" / "train.jsonl", "cleaned training data", "run `gptsmith data clean` first")
    out_dir = Path(out_dir) if out_dir else workdir / "tokenizer"
    t = cfg.tokenizer
    print(f"tokenizer: training a {t.vocab_size}-token byte-level BPE on {train} "
          f"(at most {t.max_train_chars:,} characters)")
    tok = train_tokenizer(iter_texts(train), out_dir, vocab_size=t.vocab_size, min_frequency=t.min_frequency,
                          max_train_chars=t.max_train_chars)
    val = workdir / "clean" / "val.jsonl"
    if val.exists() and val.stat().st_size:
        bpt = bytes_per_token(tok, iter_texts(val))
        print(f"tokenizer: {len(tok):,} tokens -> {out_dir}; {bpt:.2f} bytes per token on clean/val.jsonl")
    else:
        print(f"tokenizer: {len(tok):,} tokens -> {out_dir}")
    if out_dir.parent == workdir:
        save_config(cfg, workdir)
    return tok


def tokenize(workdir: str | os.PathLike, cfg: ProjectConfig, tokenizer_dir: str | os.PathLike | None = None) -> dict:
    """Tokenize WORKDIR/clean/{train,val}.jsonl into packed shards and WORKDIR/tokens/manifest.json."""
    from tokenizers import Tokenizer

    from gptsmith.data.shards import FORMAT, corpus_counts, dtype_for, separator_id, tokenize_split
    from gptsmith.tokenizer import load_tokenizer

    workdir = Path(workdir)
    report = read_json(_require(workdir / "clean" / "report.json", "cleaning report",
                                "run `gptsmith data clean` first"))
    tok_dir = Path(tokenizer_dir) if tokenizer_dir else workdir / "tokenizer"
    tok_json = _require(tok_dir / "tokenizer.json", "tokenizer", "run `gptsmith tokenizer train` first, "
                                                                 "or pass --tokenizer DIR")
    tok = Tokenizer.from_file(str(tok_json))
    bos_id = separator_id(load_tokenizer(tok_dir), tok_dir)  # any causal LM's tokenizer: its bos, else eos
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    workers = cfg.data.num_workers or os.cpu_count() or 1
    final = workdir / "tokens"
    tmp = _tmp_dir(final)
    try:
        splits = {split: tokenize_split(_require(workdir / "clean" / f"{split}.jsonl", f"clean {split} split",
                                                 "run `gptsmith data clean` first"),
                                        tmp, split, tok_json, bos_id, vocab_size, workers, cfg.data.shard_tokens)
                  for split in SPLITS}
        tokens = sum(s["tokens"] - s["documents"] for s in splits.values())  # without the bos tokens
        manifest = {
            "format": FORMAT,
            "dtype": dtype_for(vocab_size).name,
            "vocab_size": vocab_size,
            "bos_token_id": bos_id,
            "tokenizer": os.path.relpath(tok_dir.resolve(), workdir.resolve()),
            "splits": splits,
            "bytes_per_token": round(sum(s["bytes"] for s in splits.values()) / max(tokens, 1), 4),
            "documents": report["documents"],
            "dropped": report["dropped"],
            "skipped": report["skipped"],
            "ignored_files": report.get("ignored_files", {}),
            "sources": report["sources"],
        }
        atomic_write_json(tmp / "manifest.json", manifest)
        replace_dir(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    save_config(cfg, workdir)
    counts = corpus_counts(manifest)["splits"]  # text tokens, as the report card shows them
    print("tokens: " + ", ".join(f"{k} {counts[k]['tokens']:,} in {len(s['files'])} file(s)"
                                 for k, s in splits.items())
          + f" (without document separators); {manifest['bytes_per_token']:.2f} bytes per token -> {final}")
    return manifest


def prepare(inputs: list[str], out: str | os.PathLike, cfg: ProjectConfig) -> dict:
    """clean -> train tokenizer -> tokenize into OUT; returns the token manifest."""
    out = Path(out)
    report = clean(inputs, out, cfg)
    train_tokenizer_on_workdir(out, cfg)
    manifest = tokenize(out, cfg)
    save_config(cfg, out)
    from gptsmith.data.shards import corpus_counts
    counts = corpus_counts(manifest)  # the same numbers the report card shows
    sp = counts["splits"]
    print(f"\nprepared {out}:\n"
          f"  documents  kept {counts['kept']:,} (train {sp['train']['documents']:,}, "
          f"val {sp['val']['documents']:,}), read {report['documents']['read']:,}\n"
          f"  dropped    {_fmt(report['dropped'])}\n"
          f"  skipped    {_fmt(report['skipped'])}\n"
          f"  not read   {describe_ignored(report['ignored_files'])}\n"
          f"  tokens     train {sp['train']['tokens']:,}, val {sp['val']['tokens']:,} without separators "
          f"({manifest['dtype']}, vocab {manifest['vocab_size']:,})\n"
          f"  compression {manifest['bytes_per_token']:.2f} bytes per token\n"
          f"next: gptsmith pretrain --data {out} --out MODEL_DIR")
    return manifest
