"""Small file helpers shared by every stage: atomic writes, hashing, JSON/YAML I/O.

Every file gptsmith writes goes through a temp file in the same directory followed by
`os.replace`, so a crash or `kill -9` leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import hashlib
import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterable, Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside `path` for a writer that opens files itself (gguf, a library's save): on success
    it is synced and renamed over `path`; on any failure it is removed and `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def replace_dir(tmp_dir: str | os.PathLike, final_dir: str | os.PathLike) -> None:
    """Move a fully written `tmp_dir` into place as `final_dir`.

    A directory cannot be swapped in one atomic step, so the old one is first renamed aside; if we die
    between the two renames the old copy is still on disk as `<final>.old` and the new one as `tmp_dir`.
    """
    tmp_dir, final_dir = Path(tmp_dir), Path(final_dir)
    old = final_dir.with_name(final_dir.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final_dir.exists():
        os.replace(final_dir, old)
    os.replace(tmp_dir, final_dir)
    if old.exists():
        shutil.rmtree(old)


def swap_in_files(tmp_dir: str | os.PathLike, final_dir: str | os.PathLike) -> None:
    """Move the files of a fully written `tmp_dir` (a model or adapter save) into `final_dir`.

    A new directory is one atomic rename. An existing one keeps everything else that lives in it (checkpoints/,
    logs, plots) where it is, since a resume must find them at every instant, and gets the new files one by one,
    weights first, each with an atomic rename; weight files of an earlier save that this one does not write
    (other shard counts) are removed.
    """
    tmp_dir, final_dir = Path(tmp_dir), Path(final_dir)
    if not final_dir.exists():
        os.replace(tmp_dir, final_dir)
        return
    for stale in final_dir.glob("*.safetensors*"):
        if not (tmp_dir / stale.name).exists():
            stale.unlink()
    for f in sorted(tmp_dir.iterdir(), key=lambda p: (".safetensors" not in p.name, p.name)):
        os.replace(f, final_dir / f.name)
    tmp_dir.rmdir()


def write_dir(final_dir: str | os.PathLike, write) -> Path:
    """`write(tmp)` fills a temp dir beside `final_dir`, whose files are then swapped in (swap_in_files)."""
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = final_dir.with_name(f".{final_dir.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    write(tmp)
    swap_in_files(tmp, final_dir)
    return final_dir


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def weights_sha256(model_dir: str | os.PathLike) -> str:
    """One sha256 over a model directory's weight files (name + content hash of each *.safetensors / *.bin): the
    identity of its weights, whatever the folder is called or where it moved."""
    model_dir = Path(model_dir)
    files = sorted(model_dir.glob("*.safetensors")) + sorted(model_dir.glob("*.bin"))
    if not files:
        raise FileNotFoundError(f"{model_dir} holds no *.safetensors or *.bin weights")
    h = hashlib.sha256()
    for w in files:
        h.update(f"{w.name}\0{sha256_file(w)}\0".encode())
    return h.hexdigest()


def iter_lines(path: str | os.PathLike) -> Iterator[tuple[int, bytes]]:
    r"""(line number, line without its \n or \r\n) of a JSON Lines file, one line in memory at a time.

    Lines end at "\n" only. Not str.splitlines(), which also ends a line at U+2028, U+2029 and U+0085 (and \x0b,
    \x0c, \x1c-\x1e), characters JSON writers leave unescaped inside strings (json.dumps with ensure_ascii=False
    does), so a record would be cut in two; nor text mode, which ends one at a lone \r.
    """
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            yield lineno, line.rstrip(b"\r\n")


def iter_jsonl(path: str | os.PathLike, example: str) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) of each non-blank line of a JSON Lines file (read by iter_lines); a line that is
    not UTF-8 or not JSON is an InputError naming FILE:LINE, with `example` (one valid line) as the fix."""
    from gptsmith.errors import InputError

    for lineno, raw in iter_lines(path):
        if not raw.strip():
            continue
        try:
            yield lineno, json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise InputError(f"{path}:{lineno}: not valid UTF-8; save the file as UTF-8") from None
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno}); each line must be one "
                             f"JSON object, e.g. {example}") from None


def _complete_lines(pending: str) -> tuple[list[str], str]:
    """The finished lines in `pending` (CR of CRLF removed) and the unfinished rest."""
    *lines, rest = pending.split("\n")
    return [line.removesuffix("\r") for line in lines], rest


def split_lines(chunks: Iterable[str]) -> Iterator[str]:
    r"""The lines of a text stream (an HTTP body of server-sent events) ending at "\n" or "\r\n" only, for the
    reason iter_lines gives: httpx's Response.iter_lines() splits like str.splitlines()."""
    pending = ""
    for chunk in chunks:
        lines, pending = _complete_lines(pending + chunk)
        yield from lines
    if pending:
        yield pending.removesuffix("\r")


async def aiter_lines(chunks: AsyncIterator[str]) -> AsyncIterator[str]:
    """split_lines for an async stream (httpx's Response.aiter_text())."""
    pending = ""
    async for chunk in chunks:
        lines, pending = _complete_lines(pending + chunk)
        for line in lines:
            yield line
    if pending:
        yield pending.removesuffix("\r")
