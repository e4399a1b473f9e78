"""Find the chunks of an index that answer a question.

    r = Retriever.open("idx", rerank="./cross-encoder")          # rerank: optional, any local cross-encoder dir
    hits = r.search("how do I install on linux?", top_k=5)       # hybrid, reranked when a cross-encoder is open
    hits = r.search("pip install", mode="bm25", sources=["docs/*.md"], min_score=2.0)

Modes: `bm25` (LanceDB's native full-text index over terms.bm25_terms of each chunk's context and text; the
query goes through the same function), `vector` (cosine similarity of the embedder's vectors) and `hybrid` (both
lists fused by weighted reciprocal rank fusion: each chunk scores sum weight/(rrf_k + rank) over the lists it is
in, weight 1 for BM25 and `vector_weight` for vectors). Each retriever fetches `candidates` chunks; a
cross-encoder, when asked, re-scores the fused candidates. `sources` globs filter on the source path before
ranking; `min_score` drops hits whose final score (rerank, RRF, BM25 or cosine: the last stage's) is below it.
Hit.scores keeps every stage's score.

What a search uses when its caller does not say (mode, rerank on/off, rrf_k, candidates, vector_weight) is the
index's recorded choice (`gptsmith rag eval --save` writes it into gptsmith_index.json under "retrieval", with the
evidence), else hybrid without rerank and RagConfig's defaults. Settings the caller gives explicitly win.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, fields
from pathlib import Path

from gptsmith.config import RagConfig
from gptsmith.errors import InputError
from gptsmith.rag.embed import Embedder, load_embedder
from gptsmith.rag.index import FORMAT_VERSION, open_table, read_manifest, sql_str
from gptsmith.rag.terms import bm25_terms
from gptsmith.rag.types import Chunk, Hit

log = logging.getLogger(__name__)

MODES = ("hybrid", "bm25", "vector")
COLUMNS = ["id", "source", "heading", "start", "end", "unit", "n_tokens", "text"]
QUERY_CACHE = 256  # query vectors kept: comparing modes, or a chat repeating a question, embeds it once


def glob_to_like(pattern: str) -> str:
    """A source glob as an SQL LIKE pattern: `*` and `**` match any characters (`/` included), `?` one. A relative
    pattern matches the end of the (absolute) source path: 'docs/*.md' finds /home/me/proj/docs/install.md; a
    pattern ending in '/' is a folder: everything under it."""
    pattern = pattern.strip()
    if pattern.startswith("./"):
        pattern = pattern[2:]
    if pattern.endswith("/"):
        pattern += "*"
    out = []
    for ch in pattern:
        if ch == "*":
            out.append("" if out and out[-1] == "%" else "%")
        elif ch == "?":
            out.append("_")
        elif ch in "%_\\":
            out.append("\\" + ch)
        else:
            out.append(ch)
    like = "".join(out)
    if not pattern.startswith("/") and not like.startswith("%"):
        like = "%/" + like
    return like


def sources_filter(patterns: list[str] | None) -> str | None:
    if not patterns:
        return None
    if isinstance(patterns, str):
        patterns = [patterns]
    return " OR ".join(f"source LIKE {sql_str(glob_to_like(p))}" for p in patterns)


def row_chunk(row: dict) -> Chunk:
    return Chunk(text=row["text"], source=row["source"], heading=row["heading"] or "", start=row["start"],
                 end=row["end"], unit=row["unit"], n_tokens=row["n_tokens"])


@dataclass
class Settings:
    """How a search runs when its caller does not say: the index's recorded choice, else these defaults."""

    mode: str = "hybrid"
    rerank: bool = False
    # Small k and 20 candidates (not the usual 60 and 50): with k 60 over 50 candidates, a chunk that one list ranks
    # first and the other misses (an exact identifier match, "str.center()", that the vectors blur) scores 1/61 and
    # loses to chunks both lists rank only 20th-40th (2/90); k 5 keeps a list's top hits on top, and fewer candidates
    # leave less room for such middling agreement. Measured on the tune questions: docs/benchmarks.md (RAG quality).
    rrf_k: int = 5
    candidates: int = 20
    vector_weight: float = 1.0  # the vector list's weight in the fusion; BM25's is 1

    @classmethod
    def resolve(cls, recorded: dict | None, cfg: RagConfig | None) -> Settings:
        """What the user set in `cfg` (config file, CLI flags) first, then the index's record, then cfg's defaults.
        (rerank: the record's choice; a cross-encoder the user names is applied by Retriever.open.)"""
        recorded, out = recorded or {}, cls()
        explicit = cfg.model_fields_set if cfg is not None else set()
        for name in ("mode", "rerank", "rrf_k", "candidates", "vector_weight"):
            mine = getattr(cfg, name, None) if name in ("mode", "rrf_k", "candidates") else None
            if mine is not None and name in explicit:
                setattr(out, name, mine)
            elif recorded.get(name) is not None:
                setattr(out, name, type(getattr(out, name))(recorded[name]))
            elif mine is not None:
                setattr(out, name, mine)
        return out


class Retriever:
    def __init__(self, index_dir: Path, table, embedder: Embedder, manifest: dict, rerank: str | None = None,
                 cfg: RagConfig | None = None, settings: Settings | None = None):
        self.index_dir = index_dir
        self.table = table
        self.embedder = embedder
        self.manifest = manifest
        self.cfg = cfg or RagConfig()
        self.settings = settings or Settings.resolve(manifest.get("retrieval"), cfg)
        self.rerank_model = rerank
        self._cross_encoder = None
        self._query_vectors: OrderedDict[str, object] = OrderedDict()

    @classmethod
    def open(cls, index_dir: str | Path, rerank: str | None = None, *, embedder: Embedder | None = None,
             cfg: RagConfig | None = None) -> Retriever:
        """Open an index built by `build_index`. `rerank`: a local cross-encoder directory (loaded on first use;
        with none given, the one the index's recorded choice reranks with, if it did); `embedder`: one already
        loaded (must be the index's); `cfg`: mode, rrf_k and candidates the user set (else the index's choice)."""
        index_dir = Path(index_dir)
        manifest = read_manifest(index_dir)
        if manifest is None:
            raise InputError(f"{index_dir} holds no gptsmith index (no gptsmith_index.json); build one with "
                             f"`gptsmith rag index DOCS... --index {index_dir}`")
        if manifest.get("format", 1) != FORMAT_VERSION:
            raise InputError(f"{index_dir} was built by an older gptsmith (index format {manifest.get('format', 1)},"
                             f" this one reads {FORMAT_VERSION}); update it with `gptsmith rag index --index "
                             f"{index_dir}` (it re-embeds every chunk once)")
        settings = Settings.resolve(manifest.get("retrieval"), cfg)
        recorded = manifest.get("retrieval") or {}
        if rerank is None and settings.rerank:
            model = recorded.get("rerank_model")
            if model and Path(model).is_dir():
                rerank = model
            else:  # the choice was measured with a cross-encoder that is gone: serve the best without it
                log.warning("%s: the recorded retrieval choice reranks with %s, which is not there; searching "
                            "without rerank", index_dir, model)
                settings.rerank = False
        elif rerank is not None:
            settings.rerank = True  # a cross-encoder given explicitly is used unless a search says otherwise
        if rerank is not None and not Path(rerank).is_dir():
            raise InputError(f"rerank model '{rerank}' is not a directory; give a local cross-encoder folder "
                             "(sentence-transformers CrossEncoder or a sequence-classification model)")
        embedder = embedder or load_embedder(manifest["embedder"])
        if embedder.name != manifest["embedder_name"] or embedder.dim != manifest["dim"]:
            raise InputError(f"{index_dir} was built with embedder {manifest['embedder_name']} "
                             f"({manifest['dim']} dims), not {embedder.name} ({embedder.dim} dims)")
        return cls(index_dir, open_table(index_dir), embedder, manifest, rerank, cfg, settings)

    def __len__(self) -> int:
        return self.table.count_rows()

    def chunks(self) -> list[tuple[str, Chunk]]:
        """Every (id, chunk) of the index, in document order (by source, then line or page)."""
        if self.table.count_rows() == 0:
            return []
        rows = self.table.search().select(COLUMNS).limit(None).to_arrow().to_pylist()
        rows.sort(key=lambda r: (r["source"], r["start"], r["end"]))
        return [(r["id"], row_chunk(r)) for r in rows]

    # ------------------------------------------------------------------------------------------ retrievers

    def clear_cache(self) -> None:
        """Forget the recent query vectors (kept so one question searched in several modes is embedded once)."""
        self._query_vectors.clear()

    def query_vector(self, query: str):
        vec = self._query_vectors.pop(query, None)
        if vec is None:
            vec = self.embedder.embed([query])[0]
        self._query_vectors[query] = vec
        if len(self._query_vectors) > QUERY_CACHE:
            self._query_vectors.popitem(last=False)
        return vec

    def _bm25(self, query: str, n: int, where: str | None) -> list[tuple[dict, dict]]:
        terms = bm25_terms(query)
        if not terms:  # punctuation only: no word to look up
            return []
        q = self.table.search(terms, query_type="fts", fts_columns="terms").select(COLUMNS + ["_score"])
        if where:
            q = q.where(where, prefilter=True)
        rows = q.limit(n).to_arrow().to_pylist()
        return [(r, {"bm25": float(r["_score"])}) for r in rows]

    def _vector(self, query: str, n: int, where: str | None) -> list[tuple[dict, dict]]:
        vec = self.query_vector(query)
        q = self.table.search(vec, query_type="vector").distance_type("cosine").select(COLUMNS + ["_distance"])
        if where:
            q = q.where(where, prefilter=True)
        rows = q.limit(n).to_arrow().to_pylist()
        return [(r, {"vector": 1.0 - float(r["_distance"])}) for r in rows]

    def _hybrid(self, query: str, n: int, where: str | None, vector_weight: float, rrf_k: int
                ) -> list[tuple[dict, dict]]:
        """Weighted reciprocal rank fusion of the two lists (done here rather than by LanceDB's RRFReranker, which
        weighs both lists alike): the first n by fused score; a chunk keeps the scores of the lists it was in."""
        fused: dict[str, tuple[dict, dict]] = {}
        for weight, found in ((1.0, self._bm25(query, n, where)), (vector_weight, self._vector(query, n, where))):
            for rank, (row, scores) in enumerate(found, 1):
                _, kept = fused.setdefault(row["id"], (row, {"rrf": 0.0}))
                kept.update(scores)
                kept["rrf"] += weight / (rrf_k + rank)
        return sorted(fused.values(), key=lambda f: -f[1]["rrf"])[:n]

    # ------------------------------------------------------------------------------------------ rerank

    def cross_encoder(self):
        if self._cross_encoder is None:
            from sentence_transformers import CrossEncoder

            try:
                self._cross_encoder = CrossEncoder(str(self.rerank_model), local_files_only=True)
            except (OSError, ValueError) as e:
                raise InputError(f"rerank model {self.rerank_model} could not be loaded as a cross-encoder "
                                 f"({e})") from e
        return self._cross_encoder

    def _rerank(self, query: str, found: list[tuple[dict, dict]]) -> list[tuple[dict, dict]]:
        if not found:
            return found
        pairs = [(query, row_chunk(r).searchable()) for r, _ in found]
        scores = self.cross_encoder().predict(pairs, show_progress_bar=False)
        for (_, s), score in zip(found, scores):
            s["rerank"] = float(score)
        return sorted(found, key=lambda f: -f[1]["rerank"])

    # ------------------------------------------------------------------------------------------ search

    def search(self, query: str, top_k: int = 5, mode: str | None = None, rerank: bool | None = None,
               min_score: float | None = None, sources: list[str] | None = None, *,
               candidates: int | None = None, vector_weight: float | None = None, rrf_k: int | None = None
               ) -> list[Hit]:
        """The best `top_k` chunks for `query`, best first. mode, rerank, candidates, vector_weight, rrf_k: None = the
        retriever's settings (the index's recorded choice; rerank when a cross-encoder was given to open()).
        Hit.score is the last stage's score (rerank > rrf > bm25/vector); Hit.scores has each stage's."""
        mode = self.settings.mode if mode is None else mode
        if not isinstance(query, str) or not query.strip():
            raise InputError("rag search: the query is empty; ask a question")
        if mode not in MODES:
            raise InputError(f"rag search: mode '{mode}' is not one of {', '.join(MODES)}")
        if top_k < 1:
            raise InputError(f"rag search: top_k must be at least 1 (got {top_k})")
        if rerank and self.rerank_model is None:
            raise InputError("rag search: rerank asked for, but no cross-encoder was given (--rerank DIR)")
        rerank = (self.settings.rerank and self.rerank_model is not None) if rerank is None else rerank
        if self.table.count_rows() == 0:
            return []
        n = max(self.settings.candidates if candidates is None else candidates, top_k)
        where = sources_filter(sources)
        if mode == "hybrid":
            found = self._hybrid(query, n, where, self.settings.vector_weight if vector_weight is None
                                 else vector_weight, self.settings.rrf_k if rrf_k is None else rrf_k)
        else:
            found = (self._bm25 if mode == "bm25" else self._vector)(query, n, where)
        if rerank:
            found = self._rerank(query, found)
        final = "rerank" if rerank else ("rrf" if mode == "hybrid" else mode)
        hits = []
        for r, scores in found:
            if min_score is not None and scores[final] < min_score:
                continue
            hits.append(Hit(chunk=row_chunk(r), score=scores[final], rank=len(hits) + 1, scores=scores, id=r["id"]))
            if len(hits) == top_k:
                break
        return hits


def format_hits(hits: list[Hit]) -> str:
    """What `rag query` prints: each hit's rank, citation, scores and full text."""
    if not hits:
        return "no matching chunks"
    blocks = []
    for h in hits:
        scores = " ".join(f"{k}={v:.4f}" for k, v in h.scores.items())
        blocks.append(f"[{h.rank}] {h.chunk.citation()}  score={h.score:.4f} ({scores})\n{h.chunk.text.rstrip()}")
    return "\n\n".join(blocks)


def hit_json(h: Hit) -> dict:
    c = h.chunk
    return {"rank": h.rank, "score": h.score, "scores": h.scores, "id": h.id, "citation": c.citation(),
            "source": c.source, "heading": c.heading, "start": c.start, "end": c.end, "unit": c.unit,
            "n_tokens": c.n_tokens, "text": c.text}
