"""The two values every part of rag (and assist, serve, eval) passes around: a chunk of a document that knows
where it came from, and a chunk found for a query with its scores."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath


@dataclass(frozen=True)
class Chunk:
    text: str  # the chunk's text, as embedded, searched and shown to the model
    source: str  # the file it came from: an absolute POSIX path
    heading: str = ""  # the heading path inside the document, "Guide > Install > Linux"; "" when it has none
    start: int = 1  # first line (1-based) of the chunk in the source, or first page when unit == "page"
    end: int = 1  # last line (or page), inclusive
    unit: str = "line"  # "line" | "page"
    n_tokens: int = 0  # its length in the chunker's tokens

    def context(self) -> str:
        """What the chunk is about beyond its own words: its document's name and heading path, e.g.
        `string methods > String Methods`. Embedded and keyword-indexed with the text (not shown as part of it),
        because a chunk from the middle of a section often never names its subject ("contextual retrieval": it
        cut retrieval failures by a third to a half)."""
        name = re.sub(r"[-_]+", " ", PurePosixPath(self.source).stem).strip()
        return " > ".join(p for p in (name, self.heading) if p)

    def searchable(self) -> str:
        """The text the embedder and the keyword index read: the context line, then the chunk."""
        context = self.context()
        return f"{context}\n\n{self.text}" if context else self.text

    def citation(self) -> str:
        """What a person reads to find the passage: `docs/install.md:12-30 (Guide > Install)`, `paper.pdf p. 3`."""
        if self.unit == "page":
            where = f"{self.source} p. {self.start}" + (f"-{self.end}" if self.end != self.start else "")
        else:
            where = f"{self.source}:{self.start}" + (f"-{self.end}" if self.end != self.start else "")
        return f"{where} ({self.heading})" if self.heading else where


@dataclass
class Hit:
    chunk: Chunk
    score: float  # the score the ranking used (fused RRF, a single retriever's, or the reranker's); higher is better
    rank: int = 0  # 1-based position in the result list
    scores: dict[str, float] = field(default_factory=dict)  # per stage: {"bm25": .., "vector": .., "rerank": ..}
    id: str = ""  # the chunk's id in the index (stable while its file does not change)
