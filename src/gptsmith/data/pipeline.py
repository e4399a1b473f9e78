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
from pathlib import Path

from tqdm import tqdm

from gptsmith.config import ProjectConfig, save_config
from gptsmith.data.clean import clean_text, digest, split_long, split_score
from gptsmith.data.readers import ReadContext, read_source, resolve_inputs
from gptsmith.errors import InputError
from gptsmith.files import atomic_write_json, read_json, replace_dir

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
    with open(jsonl, encoding="utf-8") as f:
        for line in f:
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


def clean(inputs: list[str], out: str | os.PathLike, cfg: ProjectConfig) -> dict:
    """Read, clean, filter, de-duplicate and split `inputs` into OUT/clean/{train,val}.jsonl."""
    d = cfg.data
    out = Path(out)
    sources = resolve_inputs(inputs)
    ctx = ReadContext(text_field=d.text_field, on_error=d.on_error, hub_split=d.hub_split, hub_config=d.hub_config)
    final = out / "clean"
    tmp = _tmp_dir(final)
    seen: set[bytes] = set()
    read, dropped = 0, Counter(too_short=0, duplicate=0)
    docs, nbytes = Counter(train=0, val=0), Counter(train=0, val=0)
    lowest_train: tuple[float, str, int] | None = None  # moved to val if val ends up empty
    try:
        with open(tmp / "train.jsonl", "w", encoding="utf-8") as ftrain, \
                open(tmp / "val.jsonl", "w", encoding="utf-8") as fval, \
                tqdm(desc="reading", unit="char", unit_scale=True, mininterval=0.5, dynamic_ncols=True) as bar:
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
                            continue
                        key = digest(text)
                        if d.dedup:
                            if key in seen:
                                dropped["duplicate"] += 1
                                continue
                            seen.add(key)
                        score = split_score(key, d.seed)
                        split = "val" if score < d.val_fraction else "train"
                        line = json.dumps({"text": text, "source": src.path}, ensure_ascii=False) + "\n"
                        (fval if split == "val" else ftrain).write(line)
                        size = len(text.encode("utf-8"))
                        docs[split] += 1
                        nbytes[split] += size
                        src.documents += 1
                        if split == "train" and (lowest_train is None or score < lowest_train[0]):
                            lowest_train = (score, line, size)
        if docs["train"] + docs["val"] == 0:
            raise _empty_corpus(read, dropped, ctx.skipped, cfg)
        if docs["val"] == 0 and docs["train"] >= 2:
            # Validation must never be empty; move the train document the hash ranks closest to val, which
            # is as order-independent as the split itself.
            _move_line(tmp / "train.jsonl", tmp / "val.jsonl", lowest_train[1])
            docs.update(train=-1, val=1)
            nbytes.update(train=-lowest_train[2], val=lowest_train[2])
        report = {
            "inputs": [str(i) for i in inputs],
            "documents": {"read": read, "kept": docs["train"] + docs["val"], **docs},
            "bytes": dict(nbytes),
            "dropped": dict(dropped),
            "skipped": dict(ctx.skipped),
            "sources": [s.record() for s in sources],
            "config": d.model_dump(mode="json"),
        }
        atomic_write_json(tmp / "report.json", report)
        replace_dir(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    save_config(cfg, out)
    print(f"clean: read {read:,} documents, kept {report['documents']['kept']:,} "
          f"(train {docs['train']:,}, val {docs['val']:,}); dropped: {_fmt(dropped)}; "
          f"skipped: {_fmt(ctx.skipped)} -> {final}")
    return report


def _move_line(src: Path, dst: Path, line: str) -> None:
    kept = src.with_suffix(".jsonl.tmp")
    moved = False
    with open(src, encoding="utf-8") as fin, open(kept, "w", encoding="utf-8") as fout:
        for cur in fin:
            if not moved and cur == line:
                moved = True
                continue
            fout.write(cur)
    os.replace(kept, src)
    with open(dst, "a", encoding="utf-8") as f:
        f.write(line)


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

    from gptsmith.data.shards import FORMAT, dtype_for, separator_id, tokenize_split
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
            "dropped": report["dropped"],
            "skipped": report["skipped"],
            "sources": report["sources"],
        }
        atomic_write_json(tmp / "manifest.json", manifest)
        replace_dir(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    save_config(cfg, workdir)
    print("tokens: " + ", ".join(f"{k} {s['tokens']:,} in {len(s['files'])} file(s)" for k, s in splits.items())
          + f"; {manifest['bytes_per_token']:.2f} bytes per token -> {final}")
    return manifest


def prepare(inputs: list[str], out: str | os.PathLike, cfg: ProjectConfig) -> dict:
    """clean -> train tokenizer -> tokenize into OUT; returns the token manifest."""
    out = Path(out)
    report = clean(inputs, out, cfg)
    train_tokenizer_on_workdir(out, cfg)
    manifest = tokenize(out, cfg)
    save_config(cfg, out)
    sp = manifest["splits"]
    print(f"\nprepared {out}:\n"
          f"  documents  kept {report['documents']['kept']:,} (train {sp['train']['documents']:,}, "
          f"val {sp['val']['documents']:,}), read {report['documents']['read']:,}\n"
          f"  dropped    {_fmt(report['dropped'])}\n"
          f"  skipped    {_fmt(report['skipped'])}\n"
          f"  tokens     train {sp['train']['tokens']:,}, val {sp['val']['tokens']:,} "
          f"({manifest['dtype']}, vocab {manifest['vocab_size']:,})\n"
          f"  compression {manifest['bytes_per_token']:.2f} bytes per token\n"
          f"next: gptsmith pretrain --data {out} --out MODEL_DIR")
    return manifest
