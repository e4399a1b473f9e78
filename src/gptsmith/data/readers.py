"""Turn the user's inputs (files, folders, globs, dataset ids, `python-docs`) into a stream of documents.

Every reader is a generator that holds at most one line, one row batch, one array record or one document in
memory, so a corpus larger than RAM streams through (a `.json` array is parsed incrementally with ijson). Bad
input raises `InputError` naming the file and line; with `on_error="skip"` the reader counts the problem in
`skipped` (by reason) and goes on. An empty file, or one with no records, is bad input too ("empty").

How an input is recognised, in this order:
  python-docs            the embedded corpus (Python's own documentation)
  hub:NAME               a Hugging Face dataset id, or a local dataset dir/file loaded by `datasets.load_dataset`
  an existing path       a file, or a folder read recursively
  a glob (* ? [)         the files it matches (** = any depth)
  owner/name             not an existing path and shaped like a dataset id: a Hugging Face dataset
Files in a folder or glob that are not read (another extension, a hidden path) are counted by reason in
`ignored`, which the cleaning report shows.
"""

from __future__ import annotations

import codecs
import csv
import glob
import hashlib
import json
import re
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from gptsmith.errors import InputError
from gptsmith.files import iter_lines

EXTENSIONS = (".txt", ".md", ".jsonl", ".json", ".parquet", ".csv")
EMBEDDED = "python-docs"
SKIP_REASONS = ("unreadable", "empty", "invalid_utf8", "bad_json", "missing_field")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
MAX_TEXT_DOC_BYTES = 64 << 20  # a plain-text file bigger than this is cut into documents at blank lines
READ_BLOCK = 8 << 20
SKIP_HINT = "; fix it or pass --on-error skip"


@dataclass
class Source:
    """One input unit: a file, a dataset, or the embedded corpus. `documents` is filled in by the cleaner."""
    kind: str  # file | hub | embedded
    path: str
    documents: int = 0
    sha256: str | None = None
    extra: dict = field(default_factory=dict)

    def record(self) -> dict:
        return {"path": self.path, "sha256": self.sha256, "documents": self.documents, **self.extra}


@dataclass
class ReadContext:
    text_field: str = "text"
    on_error: str = "error"
    hub_split: str = "train"
    hub_config: str | None = None
    skipped: Counter = field(default_factory=lambda: Counter({r: 0 for r in SKIP_REASONS}))

    def bad(self, reason: str, where: str, message: str) -> None:
        """Raise, or count and return so the caller skips this line/file."""
        if self.on_error != "skip":
            raise InputError(f"{where}: {message}{SKIP_HINT}")
        self.skipped[reason] += 1


def _ignored_reason(path: Path, root: Path | None) -> str | None:
    """Why a file found in a folder/glob is not read, or None when it is."""
    parts = path.relative_to(root).parts if root else (path.name,)
    if any(part.startswith(".") for part in parts):
        return "hidden path"
    if path.suffix.lower() not in EXTENSIONS:
        return f"unsupported extension {path.suffix.lower() or '(none)'}"
    return None


def _supported(paths, root: Path | None, ignored: Counter) -> list[Path]:
    found = []
    for p in paths:
        if not p.is_file():
            continue
        if reason := _ignored_reason(p, root):
            ignored[reason] += 1
        else:
            found.append(p)
    return found


def resolve_inputs(inputs: list[str], ignored: Counter | None = None) -> list[Source]:
    """Expand inputs into sources. Files are de-duplicated and sorted, so the result (and the cleaned corpus)
    doesn't depend on the order the inputs were given in. Files of folders and globs that are not read are
    counted in `ignored` by reason ("unsupported extension .xyz", "hidden path")."""
    ignored = Counter() if ignored is None else ignored
    files: dict[Path, Path] = {}  # resolved -> as given: a file named twice (a/x.md, ./a/x.md) is read once
    others: list[Source] = []
    for raw in inputs:
        text = str(raw)
        path = Path(text).expanduser()
        if text == EMBEDDED:
            others.append(Source("embedded", EMBEDDED, extra={"python": sys.version.split()[0]}))
        elif text.startswith("hub:"):
            others.append(Source("hub", text[4:]))
        elif path.is_file():
            if path.suffix.lower() not in EXTENSIONS:
                raise InputError(f"{path}: unsupported file type '{path.suffix}'; use one of {', '.join(EXTENSIONS)}")
            files[path.resolve()] = path
        elif path.is_dir():
            before = Counter(ignored)
            found = _supported(path.rglob("*"), path, ignored)
            if not found:
                raise InputError(f"{text}: folder has no {'/'.join(EXTENSIONS)} files"
                                 + (f"; not read: {describe_ignored(ignored - before)}" if ignored - before else ""))
            files.update((p.resolve(), p) for p in found)
        elif any(c in text for c in "*?["):
            found = _supported((Path(p) for p in glob.glob(text, recursive=True)), None, ignored)
            if not found:
                raise InputError(f"{text}: the pattern matches no {'/'.join(EXTENSIONS)} files")
            files.update((p.resolve(), p) for p in found)
        elif HUB_ID.match(text) and Path(text).suffix.lower() not in EXTENSIONS:
            others.append(Source("hub", text))
        else:
            raise InputError(f"{text}: no such file or folder (a Hugging Face dataset id looks like owner/name; "
                             f"prefix it with hub: to be explicit)")
    return [Source("file", str(files[k])) for k in sorted(files)] + others


def describe_ignored(counts: dict) -> str:
    """'1 (hidden path), 2 (unsupported extension .xyz)' for the counts `resolve_inputs` puts in `ignored`."""
    return ", ".join(f"{n:,} ({reason})" for reason, n in sorted(counts.items())) or "none"


def read_source(src: Source, ctx: ReadContext) -> Iterator[str]:
    """Yield the raw texts of one source."""
    if src.kind == "embedded":
        from gptsmith.data.embedded import python_docs

        h = hashlib.sha256()
        for text in python_docs():
            h.update(text.encode("utf-8"))
            yield text
        src.sha256 = h.hexdigest()
    elif src.kind == "hub":
        src.extra.update(split=ctx.hub_split, config=ctx.hub_config)
        yield from _read_hub(src.path, ctx)
    else:
        from gptsmith.files import sha256_file

        try:
            src.sha256 = sha256_file(src.path)
            size = Path(src.path).stat().st_size
        except OSError as e:
            ctx.bad("unreadable", src.path, f"cannot read file ({e.strerror or e})")
            return
        if size == 0:
            ctx.bad("empty", src.path, "the file is empty")
            return
        reader = {".txt": _read_text, ".md": _read_text, ".jsonl": _read_jsonl, ".json": _read_json,
                  ".csv": _read_csv, ".parquet": _read_parquet}[Path(src.path).suffix.lower()]
        problems_before, texts = ctx.skipped.total(), 0
        try:
            for text in reader(src.path, ctx):
                texts += 1
                yield text
        except OSError as e:
            ctx.bad("unreadable", src.path, f"cannot read file ({e.strerror or e})")
            return
        if texts == 0 and ctx.skipped.total() == problems_before:
            ctx.bad("empty", src.path, "the file holds no records (only blank lines, an empty list or a header)")


def _utf8_error(path: str, err: UnicodeDecodeError, line_offset: int = 0) -> tuple[str, str]:
    data = err.object
    line = line_offset + data[: err.start].count(b"\n") + 1
    return f"{path}:{line}", f"not valid UTF-8 (byte 0x{data[err.start]:02x}); re-save the file as UTF-8"


def _read_text(path: str, ctx: ReadContext) -> Iterator[str]:
    """A .txt/.md file is one document; a huge one is cut at blank lines into pieces of ~64 MB."""
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    buf, lines_before = "", 0
    with open(path, "rb") as f:
        while True:
            block = f.read(READ_BLOCK)
            try:
                buf += decoder.decode(block, final=not block)
            except UnicodeDecodeError as e:
                ctx.bad("invalid_utf8", *_utf8_error(path, e, lines_before + buf.count("\n")))
                return
            if not block:
                break
            if len(buf) > MAX_TEXT_DOC_BYTES:
                cut = buf.rfind("\n\n", 0, MAX_TEXT_DOC_BYTES)
                cut = cut + 2 if cut > 0 else MAX_TEXT_DOC_BYTES
                lines_before += buf.count("\n", 0, cut)
                yield buf[:cut]
                buf = buf[cut:]
    if buf:
        yield buf


def _field(obj, where: str, ctx: ReadContext) -> str | None:
    if not isinstance(obj, dict):
        ctx.bad("bad_json", where, f"expected a JSON object with a '{ctx.text_field}' field, got {type(obj).__name__}")
        return None
    value = obj.get(ctx.text_field)
    if not isinstance(value, str):
        have = ", ".join(list(obj)[:8]) or "none"
        what = "missing" if value is None else f"not a string ({type(value).__name__})"
        ctx.bad("missing_field", where, f"field '{ctx.text_field}' is {what} (fields: {have}); "
                                        f"choose the field with --text-field")
        return None
    return value


def _read_jsonl(path: str, ctx: ReadContext) -> Iterator[str]:
    for lineno, raw in iter_lines(path):
        where = f"{path}:{lineno}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            ctx.bad("invalid_utf8", *_utf8_error(path, e, lineno - 1))
            continue
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            ctx.bad("bad_json", where, f"not valid JSON ({e.msg} at column {e.colno})")
            continue
        if (text := _field(obj, where, ctx)) is not None:
            yield text


def _read_json(path: str, ctx: ReadContext) -> Iterator[str]:
    """A .json file: JSON Lines under another name, one object, or an array of objects or strings.
    An array is parsed incrementally, one record in memory at a time."""
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    if head[:1] != b"[":
        first = head.split(b"\n", 1)[0]
        try:
            json.loads(first)
            lines_parse = b"\n" in head or len(head) < 4096
        except (json.JSONDecodeError, UnicodeDecodeError):
            lines_parse = False
        if lines_parse:
            yield from _read_jsonl(path, ctx)
            return
    for i, item in iter_json_records(path, ctx):
        if isinstance(item, str):
            yield item
        elif (text := _field(item, f"{path}: item [{i}]", ctx)) is not None:
            yield text


def iter_json_records(path: str | Path, ctx: ReadContext) -> Iterator[tuple[int, object]]:
    """(index, record) of a .json file's top-level array, or (0, the value) when it holds one value, parsed
    incrementally (ijson): the records before a malformed one are yielded, then the error names the record."""
    import ijson

    with open(path, "rb") as f:
        is_array = f.read(4096).lstrip()[:1] == b"["
        f.seek(0)
        n = 0  # records yielded so far = the index of the one being parsed when an error comes
        try:
            for record in ijson.items(f, "item" if is_array else "", use_float=True):
                yield n, record
                n += 1
            return
        except ijson.JSONError as e:
            problem = str(e).split("\n", 1)[0]
        except UnicodeDecodeError:
            problem = "invalid bytes in UTF8 string"
    if "UTF8" in problem:
        reason, message = "invalid_utf8", "not valid UTF-8; re-save the file as UTF-8"
    else:
        reason, message = "bad_json", f"not valid JSON ({problem.strip()})"
    if is_array:
        ctx.bad(reason, f"{path}: item [{n}]", message + (f"; the {n:,} records before it were read" if n else ""))
    else:
        ctx.bad(reason, str(path), message)


class _Utf8Lines:
    """Feed csv.reader decoded lines, counting lines so errors can name one; a line that isn't UTF-8 is
    reported (or skipped and counted) here, since an exception would end the csv reader's iteration."""

    def __init__(self, f, path: str, ctx: ReadContext):
        self.f, self.path, self.ctx, self.lineno = f, path, ctx, 0

    def __iter__(self):
        for raw in self.f:
            self.lineno += 1
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError as e:
                self.ctx.bad("invalid_utf8", *_utf8_error(self.path, e, self.lineno - 1))


def _read_csv(path: str, ctx: ReadContext) -> Iterator[str]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # documents can be long; the default is 128 KB
    with open(path, "rb") as f:
        lines = _Utf8Lines(f, path, ctx)
        reader = csv.DictReader(lines)
        header = reader.fieldnames
        if not header or ctx.text_field not in header:
            ctx.bad("missing_field", f"{path}:1", f"no column '{ctx.text_field}' in the header "
                                                  f"({', '.join(header or [])}); choose one with --text-field")
            return
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                ctx.bad("bad_json", f"{path}:{lines.lineno}", f"malformed CSV ({e})")
                continue
            value = row.get(ctx.text_field)
            if value is None:
                ctx.bad("missing_field", f"{path}:{lines.lineno}", f"row has no value for '{ctx.text_field}'")
                continue
            yield value


def _read_parquet(path: str, ctx: ReadContext) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowInvalid, pa.ArrowIOError) as e:
        ctx.bad("unreadable", path, f"not a readable Parquet file ({e})")
        return
    names = pf.schema_arrow.names
    if ctx.text_field not in names:
        ctx.bad("missing_field", path, f"no column '{ctx.text_field}' (columns: {', '.join(names)}); "
                                       f"choose one with --text-field")
        return
    row = 0
    for batch in pf.iter_batches(batch_size=1024, columns=[ctx.text_field]):
        for value in batch.column(0).to_pylist():
            row += 1
            if not isinstance(value, str):
                ctx.bad("missing_field", f"{path}: row {row}", f"'{ctx.text_field}' is {type(value).__name__}, "
                                                               f"not text")
                continue
            yield value


def _read_hub(name: str, ctx: ReadContext) -> Iterator[str]:
    """Stream a Hugging Face dataset (an id on the Hub, or a local dataset folder/file) row by row."""
    import datasets

    try:
        ds = datasets.load_dataset(name, ctx.hub_config, split=ctx.hub_split, streaming=True)
    except Exception as e:  # noqa: BLE001 - datasets raises many types; all mean "can't load this"
        raise InputError(f"hub:{name}: cannot load dataset (split '{ctx.hub_split}'): {type(e).__name__}: {e}. "
                         f"Check the id, --data.hub_split and --data.hub_config, and that you are online "
                         f"(or the dataset is in the local cache)") from None
    for row, item in enumerate(ds, 1):
        if (text := _field(item, f"hub:{name}: row {row}", ctx)) is not None:
            yield text
