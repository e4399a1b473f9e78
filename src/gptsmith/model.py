"""The model: named size presets mapped onto the `transformers` Llama architecture.

We do not define our own nn.Module. A Llama-architecture model already is the modern decoder-only
transformer (rotary positions, RMSNorm, SwiGLU, grouped-query attention, optional tied embeddings), and
building it through `transformers` means every directory we write is one that `transformers`, vLLM,
llama.cpp's converter and lm-evaluation-harness load with no gptsmith code at all.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig, LlamaForCausalLM

from gptsmith.config import ModelConfig

LINEAGE_FILENAME = "gptsmith_lineage.json"


@dataclass(frozen=True)
class ModelShape:
    n_layer: int
    d_model: int
    n_head: int
    n_kv_head: int
    d_ff: int
    max_seq_len: int
    tie_embeddings: bool = True
    rope_theta: float = 10000.0


# Sizes chosen so each step up is ~3-10x the compute of the one before. `test` is for unit tests,
# `tiny` trains visibly in about a minute on 2 CPU cores, `small` is a few minutes of CPU or seconds of
# GPU; the gpt2-* presets match GPT-2's parameter counts with a modern block.
PRESETS: dict[str, ModelShape] = {
    "test": ModelShape(n_layer=2, d_model=64, n_head=4, n_kv_head=2, d_ff=192, max_seq_len=256),
    "tiny": ModelShape(n_layer=4, d_model=128, n_head=4, n_kv_head=2, d_ff=384, max_seq_len=512),
    "small": ModelShape(n_layer=6, d_model=384, n_head=6, n_kv_head=2, d_ff=1024, max_seq_len=1024),
    "gpt2-small": ModelShape(n_layer=12, d_model=768, n_head=12, n_kv_head=4, d_ff=2048, max_seq_len=1024,
                             tie_embeddings=True),
    "gpt2-medium": ModelShape(n_layer=24, d_model=1024, n_head=16, n_kv_head=4, d_ff=2816, max_seq_len=1024,
                              tie_embeddings=True),
}


def resolve_shape(cfg: ModelConfig) -> ModelShape:
    if cfg.preset not in PRESETS:
        raise ValueError(f"unknown model preset '{cfg.preset}'; choose one of {', '.join(PRESETS)}")
    shape = PRESETS[cfg.preset]
    overrides = {k: v for k, v in cfg.model_dump().items() if k != "preset" and v is not None}
    shape = replace(shape, **overrides)
    if shape.d_model % shape.n_head:
        raise ValueError(f"model.d_model ({shape.d_model}) must be divisible by model.n_head ({shape.n_head})")
    if shape.n_head % shape.n_kv_head:
        raise ValueError(f"model.n_head ({shape.n_head}) must be divisible by model.n_kv_head ({shape.n_kv_head})")
    return shape


def llama_config(shape: ModelShape, vocab_size: int, bos_token_id: int | None, eos_token_id: int | list[int] | None,
                 pad_token_id: int | None) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=shape.d_model,
        intermediate_size=shape.d_ff,
        num_hidden_layers=shape.n_layer,
        num_attention_heads=shape.n_head,
        num_key_value_heads=shape.n_kv_head,
        max_position_embeddings=shape.max_seq_len,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": shape.rope_theta},
        tie_word_embeddings=shape.tie_embeddings,
        attention_bias=False,
        mlp_bias=False,
        hidden_act="silu",
        initializer_range=0.02,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )


def build_model(config: LlamaConfig, seed: int | None = None) -> LlamaForCausalLM:
    if seed is not None:
        torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    # GPT-2 / nanoGPT trick: scale the init of the projections that write into the residual stream by
    # 1/sqrt(2 * n_layer) so the residual's variance does not grow with depth.
    std = config.initializer_range / (2 * config.num_hidden_layers) ** 0.5
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.normal_(0.0, std)
            layer.mlp.down_proj.weight.normal_(0.0, std)
    return model


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """Load any local Hugging Face causal-LM directory (or a hub id when online)."""
    kwargs: dict[str, Any] = {}
    if dtype is not None:
        kwargs["dtype"] = dtype
    model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    return model.to(device)


def count_params(model: torch.nn.Module, trainable_only: bool = False, exclude_embeddings: bool = False) -> int:
    params = {id(p): p for p in model.parameters() if p.requires_grad or not trainable_only}
    n = sum(p.numel() for p in params.values())
    if exclude_embeddings and hasattr(model, "get_input_embeddings"):
        n -= model.get_input_embeddings().weight.numel()
    return n


def flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), the PaLM appendix B estimate used for MFU:
    6 * N (matmul parameters: every weight matrix but the embedding tables, plus the lm_head even when it
    is tied to the input embedding) + 12 * layers * d_model * seq_len (attention scores).

    Counted from the modules, so it holds for any architecture (Llama, GPT-2's Conv1D, ...)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    tables = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    n_matmul = sum(p.numel() for p in model.parameters() if p.dim() >= 2 and id(p) not in tables)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and id(head.weight) in tables:  # tied: the same matrix is also the output matmul
        n_matmul += head.weight.numel()
    return 6.0 * n_matmul + 12.0 * config.num_hidden_layers * config.hidden_size * seq_len


def default_generation_config(tokenizer) -> GenerationConfig:
    """Generation defaults saved with every model: gptsmith's sampling defaults (one source:
    gptsmith.generation_defaults); stop at end of turn or end of document."""
    from gptsmith.generation_defaults import DEFAULTS

    stop_ids = []
    for tok in ("<|end|>", "<|endoftext|>"):
        tid = tokenizer.convert_tokens_to_ids(tok)
        if tid is not None and tid != tokenizer.unk_token_id:
            stop_ids.append(tid)
    if not stop_ids and tokenizer.eos_token_id is not None:
        stop_ids = [tokenizer.eos_token_id]
    return GenerationConfig(
        do_sample=True, temperature=DEFAULTS.temperature, top_k=DEFAULTS.top_k, top_p=DEFAULTS.top_p,
        repetition_penalty=DEFAULTS.repetition_penalty, max_new_tokens=DEFAULTS.max_new_tokens,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=stop_ids or None, pad_token_id=tokenizer.pad_token_id,
    )


def save_model_dir(model, tokenizer, out_dir: str | os.PathLike, lineage: dict | None = None,
                   generation_config: GenerationConfig | None = None) -> Path:
    """Write a standard Hugging Face model directory: a temp dir, then swapped in (files.write_dir).

    `lineage` (parent model, data, config, metrics) goes to gptsmith_lineage.json beside the weights.
    """
    from gptsmith.files import atomic_write_json, write_dir

    model = getattr(model, "module", model)  # unwrap DDP
    model = getattr(model, "_orig_mod", model)  # unwrap torch.compile
    model.generation_config = generation_config or default_generation_config(tokenizer)

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if lineage is not None:
            atomic_write_json(tmp / LINEAGE_FILENAME, lineage)

    return write_dir(out_dir, write)


def read_lineage(model_dir: str | os.PathLike) -> dict:
    path = Path(model_dir) / LINEAGE_FILENAME
    return json.loads(path.read_text()) if path.exists() else {}


def shape_dict(shape: ModelShape) -> dict:
    return asdict(shape)
