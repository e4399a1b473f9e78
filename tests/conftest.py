"""Shared fixtures. Nothing is downloaded: HF_HUB_OFFLINE=1, and every model/tokenizer is built here."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


def python_doc_texts(limit: int | None = None) -> list[str]:
    import pydoc_data.topics

    texts = [t for t in pydoc_data.topics.topics.values() if len(t) > 200]
    return texts[:limit] if limit else texts


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """A 512-token byte-level BPE with the chat special tokens and template, trained on Python's docs."""
    from gptsmith.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    train_tokenizer(python_doc_texts(), out, vocab_size=512)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer_dir):
    """A randomly initialised 2-layer, 64-wide Llama model saved as a standard HF directory."""
    from gptsmith.config import ModelConfig
    from gptsmith.model import build_model, llama_config, resolve_shape, save_model_dir
    from gptsmith.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    cfg = llama_config(resolve_shape(ModelConfig(preset="test")), len(tok), tok.bos_token_id, tok.eos_token_id,
                       tok.pad_token_id)
    out = tmp_path_factory.mktemp("model") / "tiny"
    save_model_dir(build_model(cfg, seed=0), tok, out)
    return out
