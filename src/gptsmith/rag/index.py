"""Build and keep fresh the index of a user's documents: one LanceDB table of chunks with their vectors, a BM25
full-text index on their text, and `gptsmith_index.json` beside it (inputs, embedder, chunk settings).

    report = build_index(["docs/", "notes/*.md", "paper.pdf"], "idx", cfg.rag)
    report = refresh("idx")           # the same inputs again: only what changed since

Incremental: every row carries its file's sha256 and the chunk settings it was cut with; a rerun re-reads every
file, but chunks and embeds only files whose content (or the chunk settings) changed, drops the rows of files that
are gone (or became empty/unreadable), and touches nothing else. The index mirrors the inputs of its latest run.

Safe to kill: each batch of files is swapped in with one LanceDB merge_insert (a single commit: the file's old
rows out, its new rows in), so a killed run leaves every file either as it was or fully updated, and a rerun
finishes the rest. The manifest is written (atomically) before any row, so `refresh` knows the inputs.
"""

from __future__ import annotations

import glob
import hashlib
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa

from gptsmith.config import RagConfig
from gptsmith.errors import InputError
from gptsmith.files import atomic_write_json, read_json, sha256_file
from gptsmith.rag.embed import Embedder, load_embedder
from gptsmith.rag.terms import bm25_terms
from gptsmith.rag.types import Chunk

MANIFEST = "gptsmith_index.json"
TABLE = "chunks"
FORMAT_VERSION = 2  # 2: chunks embedded and keyword-indexed with their context (Chunk.searchable), `terms` column
WRITE_BATCH_CHUNKS = 512  # chunks embedded and committed together: one LanceDB commit per batch of files
GLOB_CHARS = set("*?[")
SHOW_SKIPPED = 20  # skipped files listed in the printed summary (a folder of images would fill the screen)


# ---------------------------------------------------------------------------------------------- table

def schema(dim: int) -> pa.Schema:
    return pa.schema([
        pa.field("id", pa.string()),
        pa.field("source", pa.string()),
        pa.field("heading", pa.string()),
        pa.field("start", pa.int32()),
        pa.field("end", pa.int32()),
        pa.field("unit", pa.string()),
        pa.field("n_tokens", pa.int32()),
        pa.field("text", pa.string()),
        pa.field("terms", pa.string()),  # what BM25 indexes: bm25_terms(chunk.searchable()), see terms.py
        pa.field("file_sha256", pa.string()),
        pa.field("chunking", pa.string()),  # the chunk settings the file was cut with: a change re-chunks it
        pa.field("vector", pa.list_(pa.float32(), dim)),
    ])


def connect(index_dir: str | Path):
    import lancedb
    from datetime import timedelta

    # read_consistency_interval=0: every query sees the latest commit, so a server answering from this index sees
    # what a `refresh` (its folder watch, or another process) wrote a moment ago.
    return lancedb.connect(str(index_dir), read_consistency_interval=timedelta(0))


def open_table(index_dir: str | Path, dim: int | None = None):
    """The chunks table; created (empty, for `dim`-long vectors) when it does not exist and dim is given."""
    db = connect(index_dir)
    if TABLE in db.list_tables().tables:
        return db.open_table(TABLE)
    if dim is None:
        raise InputError(f"{index_dir} holds no gptsmith index; build one with `gptsmith rag index DOCS... "
                         f"--index {index_dir}`")
    return db.create_table(TABLE, schema=schema(dim))


def sql_str(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def sql_in(column: str, values: Iterable[str]) -> str:
    return f"{column} IN ({', '.join(sql_str(v) for v in values)})"


def chunk_id(source: str, file_sha: str, chunking: str, i: int) -> str:
    """Stable while the file and the chunk settings do not change."""
    return hashlib.sha256(f"{source}\0{file_sha}\0{chunking}\0{i}".encode()).hexdigest()[:20]


def indexed_files(table) -> dict[str, tuple[str, str, int, int]]:
    """source -> (file_sha256, chunking, chunks, tokens) of what the table holds now."""
    if table.count_rows() == 0:
        return {}
    rows = table.search().select(["source", "file_sha256", "chunking", "n_tokens"]).limit(None).to_arrow()
    grouped = rows.group_by(["source", "file_sha256", "chunking"]).aggregate([("n_tokens", "count"),
                                                                            ("n_tokens", "sum")])
    return {r["source"]: (r["file_sha256"], r["chunking"], r["n_tokens_count"], r["n_tokens_sum"])
            for r in grouped.to_pylist()}


def text_index_config():
    """The full-text index over `terms`: split at whitespace only (terms.py already cut the words and kept
    identifiers whole), lower-cased, English stemming and stop words (the same for documents and queries)."""
    from lancedb.index import FTS

    return FTS(base_tokenizer="whitespace", stem=True, remove_stop_words=True, ascii_folding=True,
               max_token_length=64)


def ensure_text_index(table, changed_rows: int) -> None:
    """BM25 needs a full-text index on `terms`; it is made on the new, empty table, so that a run killed after its
    first commit leaves a searchable index. Rows added later are searched even before they are indexed, so the
    index is only merged (optimize) once enough rows are outside it or small fragments pile up: optimize also
    compacts, which rewrites small fragments."""
    fts = [ix for ix in table.list_indices() if ix.columns == ["terms"]]
    if not fts:
        table.create_index("terms", config=text_index_config(), replace=True)
        return
    if changed_rows == 0:
        return
    index = table.index_stats(fts[0].name)
    small_fragments = table.stats()["fragment_stats"]["num_small_fragments"]
    if (index and index.num_unindexed_rows > max(1000, 0.1 * index.num_indexed_rows)) or small_fragments >= 32:
        table.optimize()


# ---------------------------------------------------------------------------------------------- inputs

@dataclass
class Scan:
    files: list[Path] = field(default_factory=list)  # supported files, absolute, sorted, no duplicates
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, why)


def supported_extensions() -> set[str]:
    from gptsmith.rag.extract import SUPPORTED

    return {e.lower() if e.startswith(".") else "." + e.lower() for e in SUPPORTED}


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def scan_inputs(inputs: list[str], index_dir: Path, missing_ok: bool = False) -> Scan:
    """Files, folders (recursive; hidden files and folders left out) and globs ('docs/**/*.md') -> the files to
    index. A file of an unsupported type is skipped with its reason; the index's own folder is never read."""
    exts = supported_extensions()
    index_dir = index_dir.resolve()
    found: dict[Path, None] = {}
    scan = Scan()

    def consider(path: Path) -> None:
        path = path.resolve()
        if path == index_dir or index_dir in path.parents or path in found:
            return
        if path.suffix.lower() in exts:
            found[path] = None
        else:
            scan.skipped.append((str(path), f"unsupported type '{path.suffix or '(none)'}' "
                                            f"(supported: {' '.join(sorted(exts))})"))

    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            root = path.resolve()
            for f in sorted(root.rglob("*")):
                if f.is_file() and not _hidden(f, root) and not (f == index_dir or index_dir in f.parents):
                    consider(f)
        elif path.is_file():
            consider(path)
        elif GLOB_CHARS & set(item):
            matches = [Path(m) for m in sorted(glob.glob(str(path), recursive=True)) if Path(m).is_file()]
            if not matches and not missing_ok:
                raise InputError(f"rag index: the glob '{item}' matches no file")
            for m in matches:
                consider(m)
        elif not missing_ok:
            raise InputError(f"rag index: '{item}' is no file, folder or glob (check the path)")
    scan.files = sorted(found)
    return scan


def absolute_inputs(inputs: list[str]) -> list[str]:
    """Inputs as the manifest keeps them: absolute, so `refresh` works from any directory."""
    return [str(Path(i).expanduser().absolute()) for i in inputs]


# ---------------------------------------------------------------------------------------------- manifest

def read_manifest(index_dir: str | Path) -> dict | None:
    path = Path(index_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = read_json(path)
    except ValueError as e:
        raise InputError(f"{path}: not valid JSON ({e}); delete the index folder and build it again") from e
    for key in ("inputs", "embedder", "embedder_name", "dim", "chunk_tokens", "chunk_overlap"):
        if key not in manifest:
            raise InputError(f"{path}: missing '{key}'; delete the index folder and build it again")
    return manifest


def spec_key(spec: str) -> str:
    """An embedder spec as the manifest keeps it: a local model dir absolute, so it is found from anywhere."""
    if not spec.startswith(("http://", "https://")) and spec != "default" and Path(spec).is_dir():
        return str(Path(spec).resolve())
    return spec


def check_embedder(manifest: dict | None, embedder: Embedder, spec: str, index_dir: Path) -> None:
    if manifest is None:
        return
    if manifest["embedder_name"] != embedder.name or manifest["dim"] != embedder.dim:
        raise InputError(
            f"the index {index_dir} was built with embedder '{manifest['embedder']}' ({manifest['embedder_name']}, "
            f"{manifest['dim']} dims); this run asks for '{spec}' ({embedder.name}, {embedder.dim} dims), and "
            "vectors of two models cannot be compared. Use --embedder "
            f"'{manifest['embedder']}', or build the new one into another --index folder (or delete {index_dir}).")


class LazyEmbedder:
    """The run's embedder, loaded (seconds) only when a file must be chunked or embedded: a rerun over unchanged
    files trusts the manifest's record of the same spec and never loads the model."""

    def __init__(self, spec: str, manifest: dict | None, index_dir: Path, loaded: Embedder | None = None):
        self.spec, self.manifest, self.index_dir, self.loaded = spec, manifest, index_dir, loaded
        if loaded is not None:
            check_embedder(manifest, loaded, spec, index_dir)
        if loaded is None and (manifest is None or spec_key(spec) != manifest["embedder"]):
            self.get()  # a new index or another spec: load it to learn (and check) its name and size

    def get(self) -> Embedder:
        if self.loaded is None:
            self.loaded = load_embedder(self.spec)
            check_embedder(self.manifest, self.loaded, self.spec, self.index_dir)
        return self.loaded

    @property
    def name(self) -> str:
        return self.loaded.name if self.loaded else self.manifest["embedder_name"]

    @property
    def dim(self) -> int:
        return self.loaded.dim if self.loaded else self.manifest["dim"]


def chunking_key(cfg: RagConfig) -> str:
    return f"tokens={cfg.chunk_tokens} overlap={cfg.chunk_overlap} counter=approx"


# ---------------------------------------------------------------------------------------------- build

@dataclass
class FileChunks:
    source: str
    sha: str
    chunks: list[Chunk]


def read_file_chunks(path: Path, cfg: RagConfig) -> list[Chunk]:
    """Tokens are chunk.approx_tokens' estimate (made for subword tokenizers, calibrated on the default
    embedder's), not the embedder's tokenizer: the packer counts each chunk's text many times as it grows, and
    exact counting made indexing Python's docs 3x slower than embedding them, for chunks within 1-2 tokens."""
    from gptsmith.rag.chunk import chunk_file

    return chunk_file(path, max_tokens=cfg.chunk_tokens, overlap_tokens=cfg.chunk_overlap)


def to_rows(batch: list[FileChunks], vectors: np.ndarray, chunking: str, dim: int) -> pa.Table:
    chunks = [(fc, i, c) for fc in batch for i, c in enumerate(fc.chunks)]
    return pa.table({
        "id": [chunk_id(fc.source, fc.sha, chunking, i) for fc, i, _ in chunks],
        "source": [fc.source for fc, _, _ in chunks],
        "heading": [c.heading for _, _, c in chunks],
        "start": [c.start for _, _, c in chunks],
        "end": [c.end for _, _, c in chunks],
        "unit": [c.unit for _, _, c in chunks],
        "n_tokens": [c.n_tokens for _, _, c in chunks],
        "text": [c.text for _, _, c in chunks],
        "terms": [bm25_terms(c.searchable()) for _, _, c in chunks],
        "file_sha256": [fc.sha for fc, _, _ in chunks],
        "chunking": [chunking] * len(chunks),
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), dim),
    }, schema=schema(dim))


def replace_files(table, batch: list[FileChunks], vectors: np.ndarray, chunking: str, dim: int) -> None:
    """One commit: the batch's files lose their old rows and get their new ones (a file with no chunks: none)."""
    rows = to_rows(batch, vectors, chunking, dim)
    (table.merge_insert("id").when_matched_update_all().when_not_matched_insert_all()
     .when_not_matched_by_source_delete(sql_in("source", [fc.source for fc in batch]))
     .execute(rows))


def delete_sources(table, sources: list[str]) -> None:
    for i in range(0, len(sources), 500):
        table.delete(sql_in("source", sources[i:i + 500]))


def batches(files: list[FileChunks], size: int) -> Iterable[list[FileChunks]]:
    batch: list[FileChunks] = []
    n = 0
    for fc in files:
        batch.append(fc)
        n += len(fc.chunks)
        if n >= size:
            yield batch
            batch, n = [], 0
    if batch:
        yield batch


def embed_and_write(table, todo: list[FileChunks], embedder: Embedder, chunking: str, progress: bool) -> None:
    """Embed the chunks of changed files (a progress bar with chunks/s and ETA) and swap them in batch by batch."""
    from tqdm import tqdm

    total = sum(len(fc.chunks) for fc in todo)
    with tqdm(total=total, unit="chunk", desc="embedding", disable=not progress or total == 0,
              dynamic_ncols=True) as bar:
        for batch in batches(todo, WRITE_BATCH_CHUNKS):
            texts = [c.searchable() for fc in batch for c in fc.chunks]
            parts = []
            for i in range(0, len(texts), embedder.batch_size):
                parts.append(embedder.embed(texts[i:i + embedder.batch_size]))
                bar.update(len(parts[-1]))
            vectors = np.concatenate(parts) if parts else np.zeros((0, embedder.dim), np.float32)
            replace_files(table, batch, vectors, chunking, embedder.dim)


def read_changed_files(files: list[Path], before: dict, cfg: RagConfig, report: dict, progress: bool
                       ) -> tuple[list[FileChunks], list[str]]:
    """Hash every file; chunk those that are new or changed. Returns them, and the indexed files that now give no
    chunks (emptied, unreadable): their old rows must go. Counts go into `report`."""
    from tqdm import tqdm

    chunking = chunking_key(cfg)
    todo: list[FileChunks] = []
    emptied: list[str] = []

    def skip(source: str, reason: str) -> None:
        report["skipped"].append({"path": source, "reason": reason})
        if source in before:
            emptied.append(source)

    for path in tqdm(files, unit="file", desc="reading", disable=not progress, dynamic_ncols=True):
        source = path.as_posix()
        try:
            sha = sha256_file(path)
        except OSError as e:
            skip(source, f"cannot read: {e.strerror or e}")
            continue
        report["files_read"] += 1
        old = before.get(source)
        if old and old[0] == sha and old[1] == chunking:
            report["files_unchanged"] += 1
            continue
        try:
            chunks = read_file_chunks(path, cfg)
        except Exception as e:  # noqa: BLE001 - one bad document is counted and reported, never ends the run
            skip(source, str(e) if isinstance(e, InputError) else f"{type(e).__name__}: {e}")
            continue
        if chunks:
            todo.append(FileChunks(source, sha, chunks))
        else:
            skip(source, "no text to index")
    return todo, emptied


def build_index(inputs: list[str], index_dir: str | Path, cfg: RagConfig, *, embedder: Embedder | None = None,
                progress: bool = True, missing_ok: bool = False) -> dict:
    """Index (or update the index of) `inputs` into `index_dir`; returns the report (also printed when
    `progress`). `embedder`: an already loaded one (it must be the index's); else cfg.embedder is loaded."""
    t0 = time.perf_counter()
    index_dir = Path(index_dir)
    if not inputs:
        raise InputError("rag index: give at least one file, folder or glob to index")
    if index_dir.exists() and not index_dir.is_dir():
        raise InputError(f"--index {index_dir} is a file; give a folder")
    manifest = read_manifest(index_dir)
    if manifest is None and index_dir.is_dir() and any(index_dir.iterdir()):
        raise InputError(f"--index {index_dir} is a folder with other things in it and no {MANIFEST}; "
                         "give a new or empty folder (or one `rag index` made)")
    scan = scan_inputs(inputs, index_dir, missing_ok=missing_ok)
    embedder = LazyEmbedder(cfg.embedder, manifest, index_dir, embedder)
    chunking = chunking_key(cfg)
    index_dir.mkdir(parents=True, exist_ok=True)
    if manifest is not None and manifest.get("format", 1) != FORMAT_VERSION:
        # An older layout (no context in the vectors, no `terms` column): every chunk must be embedded again.
        if progress:
            print(f"index {index_dir} was built by an older gptsmith (format {manifest.get('format', 1)}); "
                  f"rebuilding it as format {FORMAT_VERSION}")
        db = connect(index_dir)
        if TABLE in db.list_tables().tables:
            db.drop_table(TABLE)
    write_manifest(index_dir, inputs, cfg, embedder, manifest, stats=None)
    table = open_table(index_dir, embedder.dim)
    ensure_text_index(table, changed_rows=0)
    before = indexed_files(table)

    report = {"index": str(index_dir), "embedder": embedder.name, "dim": embedder.dim,
              "files_read": 0, "files_unchanged": 0, "files_updated": 0, "files_deleted": 0, "files_skipped": 0,
              "skipped": [{"path": p, "reason": r} for p, r in scan.skipped],
              "chunks": 0, "chunks_embedded": 0, "tokens": 0, "tokens_embedded": 0, "seconds": 0.0}
    todo, emptied = read_changed_files(scan.files, before, cfg, report, progress)
    present = {p.as_posix() for p in scan.files}
    gone = sorted(s for s in before if s not in present)
    delete_sources(table, gone + emptied)
    if todo:
        embed_and_write(table, todo, embedder.get(), chunking, progress)
    ensure_text_index(table, sum(len(fc.chunks) for fc in todo) + len(gone) + len(emptied))

    after = indexed_files(table)
    report.update(files_updated=len(todo), files_deleted=len(gone), files_skipped=len(report["skipped"]),
                  chunks=sum(v[2] for v in after.values()), tokens=sum(v[3] for v in after.values()),
                  chunks_embedded=sum(len(fc.chunks) for fc in todo),
                  tokens_embedded=sum(c.n_tokens for fc in todo for c in fc.chunks),
                  files_indexed=len(after), seconds=round(time.perf_counter() - t0, 3))
    write_manifest(index_dir, inputs, cfg, embedder, manifest, stats=report)
    if progress:
        print(format_report(report))
    return report


def write_manifest(index_dir: Path, inputs: list[str], cfg: RagConfig, embedder: LazyEmbedder, old: dict | None,
                   stats: dict | None) -> None:
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    spec = spec_key(cfg.embedder)
    counts = {"files": stats["files_indexed"], "chunks": stats["chunks"], "tokens": stats["tokens"]} if stats \
        else {k: (old or {}).get(k, 0) for k in ("files", "chunks", "tokens")}
    manifest = {
        "format": FORMAT_VERSION,
        "inputs": absolute_inputs(inputs),
        "embedder": spec, "embedder_name": embedder.name, "dim": embedder.dim,
        "chunk_tokens": cfg.chunk_tokens, "chunk_overlap": cfg.chunk_overlap,
        "created": (old or {}).get("created") or now, "updated": now, **counts,
    }
    if (old or {}).get("retrieval"):  # the settings `rag eval --save` chose stay chosen through re-indexing
        manifest["retrieval"] = old["retrieval"]
    atomic_write_json(index_dir / MANIFEST, manifest)


def format_report(r: dict) -> str:
    lines = [f"index {r['index']}: {r['chunks']} chunks, {r['tokens']} tokens from {r.get('files_indexed', 0)} "
             f"files (embedder {r['embedder']}, {r['dim']} dims)",
             f"files: {r['files_read']} read, {r['files_unchanged']} unchanged, {r['files_updated']} new or "
             f"changed ({r['chunks_embedded']} chunks, {r['tokens_embedded']} tokens embedded), "
             f"{r['files_deleted']} deleted, {r['files_skipped']} skipped; {r['seconds']:.1f} s"]
    lines += [f"  skipped {s['path']}: {s['reason']}" for s in r["skipped"][:SHOW_SKIPPED]]
    if len(r["skipped"]) > SHOW_SKIPPED:
        lines.append(f"  ... and {len(r['skipped']) - SHOW_SKIPPED} more skipped (all in the returned report)")
    return "\n".join(lines)


def refresh(index_dir: str | Path, *, embedder: Embedder | None = None, progress: bool = False) -> dict:
    """Bring the index up to date with its remembered inputs (the folder watch of `serve` calls this). An input
    that no longer exists just means its files are gone."""
    manifest = read_manifest(index_dir)
    if manifest is None:
        raise InputError(f"{index_dir} holds no gptsmith index ({MANIFEST} is missing); build one with "
                         f"`gptsmith rag index DOCS... --index {index_dir}`")
    cfg = RagConfig(embedder=manifest["embedder"], chunk_tokens=manifest["chunk_tokens"],
                    chunk_overlap=manifest["chunk_overlap"])
    return build_index(manifest["inputs"], index_dir, cfg, embedder=embedder, progress=progress, missing_ok=True)
