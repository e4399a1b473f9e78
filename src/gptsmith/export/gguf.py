"""Export a Llama-architecture model directory to one GGUF file that llama.cpp (and Ollama, LM Studio, ...) load.

Written with the `gguf` package from llama.cpp's authors. What llama.cpp needs beyond the weights:

- its tensor names, and q/k rows reordered: HF's rotary embedding rotates the two halves of each head
  (rotate_half), llama.cpp's LLAMA rope rotates adjacent pairs, so each head's rows go from
  [0 .. d/2-1 | d/2 .. d-1] to [0, d/2, 1, d/2+1, ...] (see `permute_qk`).
- the tokenizer as a GPT-2-style byte-level BPE vocabulary plus merges, and `tokenizer.ggml.pre`: the name of
  a pre-tokenizer (the regex that splits text before BPE) compiled into llama.cpp. llama.cpp cannot run an
  arbitrary regex from the file, so the exporter maps ours to a built-in one with the same splits and the same
  merge rule, and refuses tokenizers it cannot map instead of writing a file that tokenizes differently.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gptsmith.errors import InputError
from gptsmith.files import atomic_output

DTYPES = ("f16", "q8_0", "f32")

# Our split pattern (gptsmith.tokenizer.SPLIT_PATTERN, tiktoken's cl100k_base) and Llama 3's. They split every
# text the same way: the possessive quantifiers in ours never change a match here (what follows them cannot
# match the characters they keep), and in `\s*[\r\n]+` greedy `\s*` already ends at the run's last newline.
# llama.cpp implements this split natively as LLAMA_VOCAB_PRE_TYPE_LLAMA3 (src/llama-vocab.cpp).
CL100K_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)
LLAMA3_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# GPT-2's own split, as tokenizers' ByteLevel(use_regex=True) applies it: written as Split + ByteLevel it is the
# same tokenizer as ByteLevel alone, which llama.cpp calls "gpt-2".
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# Which llama.cpp pre-tokenizer name gives that split, by the BPE model's `ignore_merges` flag. llama.cpp's
# "llama-bpe" (Llama 3) also turns on ignore_merges (a word that is itself a vocabulary entry becomes that one
# token without applying merges), which tokenizes differently from a BPE that always applies its merges, as
# ours do. "dbrx" (DBRX ships cl100k_base) is the same split with merges always applied.
PRE_TOKENIZERS = {
    (CL100K_PATTERN, False): "dbrx",
    (LLAMA3_PATTERN, False): "dbrx",
    (CL100K_PATTERN, True): "llama-bpe",
    (LLAMA3_PATTERN, True): "llama-bpe",
    (GPT2_PATTERN, False): "gpt-2",
}

# Pre-tokenizers that are a single built-in step rather than Split(regex) + ByteLevel: GPT-2's ByteLevel with its own
# regex, which llama.cpp calls "gpt-2", and SmolLM's (digits one by one, then GPT-2's), which llama.cpp calls "smollm"
# (LLAMA_VOCAB_PRE_TYPE_SMOLLM: "\p{N}" then the GPT-2 regex). Both apply merges always, like llama.cpp for these.
GPT2_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
SMOLLM_DIGITS = {"type": "Digits", "individual_digits": True}

# HF parameter name (after "model.layers.{i}.") -> llama.cpp tensor name (after "blk.{i}.").
LAYER_TENSORS = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
TOP_TENSORS = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}

# `{% generation %}` is a transformers-only Jinja tag (it marks assistant tokens for training masks); other
# Jinja engines (llama.cpp's, Ollama's) reject unknown tags, and rendering is the same without it.
GENERATION_TAG = re.compile(r"\{%-?\s*(?:end)?generation\s*-?%\}")


@dataclass
class GgufExport:
    path: Path
    dtype: str
    pre_tokenizer: str
    n_tensors: int
    n_bytes: int
    vocab_size: int


@dataclass
class LlamaShape:
    vocab_size: int
    context_length: int
    hidden_size: int
    n_layer: int
    ffn_size: int
    n_head: int
    n_kv_head: int
    head_dim: int
    rope_theta: float
    rms_eps: float
    tied: bool


# ---------------------------------------------------------------------------------------------- config

def read_llama_shape(model_dir: Path) -> LlamaShape:
    """The architecture numbers llama.cpp needs; refuse (naming config.json's field) what it would run wrongly."""
    path = model_dir / "config.json"
    if not path.is_file():
        raise InputError(f"{model_dir}: not a model directory (no config.json); pass a directory written by "
                         "`gptsmith pretrain` or `gptsmith sft`, or any Hugging Face Llama model directory")
    cfg = json.loads(path.read_text(encoding="utf-8"))
    model_type = cfg.get("model_type")
    if model_type != "llama":
        raise InputError(f"{path}: model_type is {model_type!r}; GGUF export maps only 'llama' (LlamaForCausalLM) "
                         "models, the architecture gptsmith trains")

    def refuse(field: str, value, why: str) -> InputError:
        return InputError(f"{path}: {field} is {value!r}; {why}, which GGUF export does not map")

    if cfg.get("hidden_act", "silu") != "silu":
        raise refuse("hidden_act", cfg["hidden_act"], "llama.cpp's llama architecture uses SiLU")
    for field in ("attention_bias", "mlp_bias"):
        if cfg.get(field):
            raise refuse(field, cfg[field], "the model has bias terms")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise refuse("rope_parameters.rope_type", rope_type, "the model uses scaled rotary embeddings")
    hidden, n_head = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    from transformers import AutoConfig

    # The model's own setting as transformers reads it: a config.json that omits tie_word_embeddings is untied
    # (transformers' default), and that model has its own lm_head.weight, which must be written as output.weight.
    tied = bool(AutoConfig.from_pretrained(str(model_dir)).tie_word_embeddings)
    return LlamaShape(
        vocab_size=int(cfg["vocab_size"]),
        context_length=int(cfg.get("max_position_embeddings") or 2048),
        hidden_size=hidden,
        n_layer=int(cfg["num_hidden_layers"]),
        ffn_size=int(cfg["intermediate_size"]),
        n_head=n_head,
        n_kv_head=int(cfg.get("num_key_value_heads") or n_head),
        head_dim=int(cfg.get("head_dim") or hidden // n_head),
        rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
        rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        tied=tied,
    )


# ---------------------------------------------------------------------------------------------- tokenizer

@dataclass
class Vocab:
    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str


def split_regex(pre_tokenizer: dict | None) -> str | None:
    """The split regex of a byte-level pre-tokenizer: Sequence[Split(regex, isolated), ByteLevel(no regex)]."""
    steps = (pre_tokenizer or {}).get("pretokenizers") if (pre_tokenizer or {}).get("type") == "Sequence" else None
    if not steps or len(steps) != 2:
        return None
    split, byte_level = steps
    if (split.get("type") != "Split" or split.get("behavior") != "Isolated" or split.get("invert")
            or byte_level.get("type") != "ByteLevel" or byte_level.get("use_regex", True)
            or byte_level.get("add_prefix_space")):
        return None
    return (split.get("pattern") or {}).get("Regex")


def _is_gpt2_byte_level(step: dict) -> bool:
    return all(step.get(k, True if k == "use_regex" else None) == v for k, v in GPT2_BYTE_LEVEL.items())


def builtin_pre_tokenizer(pre_tokenizer: dict | None) -> str | None:
    """"gpt-2" for GPT-2's ByteLevel alone, "smollm" for Digits(individual) then it, else None."""
    pre = pre_tokenizer or {}
    if pre.get("type") == "ByteLevel" and _is_gpt2_byte_level(pre):
        return "gpt-2"
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else None
    if (steps and len(steps) == 2 and all(steps[0].get(k) == v for k, v in SMOLLM_DIGITS.items())
            and steps[1].get("type") == "ByteLevel" and _is_gpt2_byte_level(steps[1])):
        return "smollm"
    return None


def map_pre_tokenizer(tokenizer_json: dict, path: Path) -> str:
    """The llama.cpp pre-tokenizer name that splits and merges exactly as this tokenizer does, or InputError."""
    model = tokenizer_json.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise InputError(f"{path}: model.type is {model.get('type')!r} (byte_fallback={model.get('byte_fallback')}); "
                         "GGUF export maps only byte-level BPE tokenizers like gptsmith's")
    if tokenizer_json.get("normalizer"):
        raise InputError(f"{path}: the tokenizer has a normalizer ({tokenizer_json['normalizer'].get('type')}); "
                         "llama.cpp's byte-level BPE applies none, so it would tokenize differently")
    builtin = builtin_pre_tokenizer(tokenizer_json.get("pre_tokenizer"))
    if builtin and not model.get("ignore_merges"):
        return builtin
    regex = split_regex(tokenizer_json.get("pre_tokenizer"))
    pre = PRE_TOKENIZERS.get((regex, bool(model.get("ignore_merges"))))
    if pre is None:
        what = f"splits with {regex!r}" if regex else f"is {json.dumps(tokenizer_json.get('pre_tokenizer'))[:300]}"
        raise InputError(
            f"{path}: pre_tokenizer {what}, which matches no pre-tokenizer built into llama.cpp "
            "that GGUF export maps (GPT-2's ByteLevel, SmolLM's digits + ByteLevel, or the GPT-4/cl100k or "
            "Llama 3 split then ByteLevel); a GGUF would tokenize "
            "text differently from this tokenizer, so none was written")
    return pre


def read_vocab(tokenizer_json: dict, n_vocab: int, path: Path) -> Vocab:
    import gguf

    model = tokenizer_json["model"]
    by_id = {i: t for t, i in model["vocab"].items()}
    added = {a["id"]: a for a in tokenizer_json.get("added_tokens", [])}
    n_tok = max([*by_id, *added, -1]) + 1
    if n_tok > n_vocab:
        raise InputError(f"{path}: the tokenizer has {n_tok} tokens but config.json's vocab_size is {n_vocab}; "
                         "the model has no embedding row for the extra tokens")
    tokens, types = [], []
    for i in range(n_vocab):
        if i in added:
            tokens.append(added[i]["content"])
            types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
        elif i in by_id:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
        else:  # embedding rows past the tokenizer (vocab padded for speed): never produced by tokenizing
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    bad = [m for m in merges if m.count(" ") != 1]
    if bad:
        raise InputError(f"{path}: merge {bad[0]!r} has a space inside a token; GGUF stores merges as 'a b'")
    return Vocab(tokens, [int(t) for t in types], merges, map_pre_tokenizer(tokenizer_json, path))


def adds_special(tokenizer) -> tuple[bool, bool]:
    """Whether encoding text adds BOS / EOS, as the HF tokenizer does, so llama.cpp does the same."""
    plain = tokenizer.encode("a", add_special_tokens=False)
    full = tokenizer.encode("a")
    start = full[: full.index(plain[0])] if plain and plain[0] in full else []
    return (tokenizer.bos_token_id is not None and tokenizer.bos_token_id in start,
            tokenizer.eos_token_id is not None and len(full) > len(plain) + len(start)
            and full[-1] == tokenizer.eos_token_id)


def chat_template_for_gguf(template) -> str | None:
    if isinstance(template, dict):  # named templates: the default one
        template = template.get("default")
    return GENERATION_TAG.sub("", template) if isinstance(template, str) else None


# ---------------------------------------------------------------------------------------------- tensors

def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF rotate-half row order -> llama.cpp interleaved pairs, per head: rows [0, d/2, 1, d/2+1, ...]."""
    out_dim = w.shape[0]
    return w.reshape(n_heads, 2, out_dim // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of permute_qk: llama.cpp rows back to HF's order."""
    out_dim = w.shape[0]
    return w.reshape(n_heads, out_dim // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf_name: str, n_layer: int) -> str | None:
    if hf_name in TOP_TENSORS:
        return TOP_TENSORS[hf_name]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", hf_name)
    if m and int(m.group(1)) < n_layer and m.group(2) in LAYER_TENSORS:
        return f"blk.{m.group(1)}.{LAYER_TENSORS[m.group(2)]}"
    return None


def llama_tensors(model_dir: Path, shape: LlamaShape) -> Iterator[tuple[str, np.ndarray]]:
    """(llama.cpp name, float32 array) for every weight; output.weight only when embeddings are not tied."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    for hf_name, tensor in model.state_dict().items():
        if hf_name.endswith("rotary_emb.inv_freq") or (hf_name == "lm_head.weight" and shape.tied):
            continue
        name = gguf_name(hf_name, shape.n_layer)
        if name is None:
            raise InputError(f"{model_dir}: weight {hf_name!r} has no place in llama.cpp's llama architecture; "
                             "GGUF export maps standard LlamaForCausalLM weights only")
        w = tensor.detach().cpu().numpy()
        if name.endswith("attn_q.weight"):
            w = permute_qk(w, shape.n_head)
        elif name.endswith("attn_k.weight"):
            w = permute_qk(w, shape.n_kv_head)
        yield name, w


def encode_tensor(w: np.ndarray, dtype: str):
    """(data, raw_dtype) in the file's type. Norms (1-D) stay f32, as llama.cpp expects; q8_0 needs rows that
    are a multiple of its 32-value block, so a matrix whose rows are not is written f16."""
    import gguf

    if w.ndim == 1 or dtype == "f32":
        return w.astype(np.float32), None
    if dtype == "q8_0" and w.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
        q = gguf.GGMLQuantizationType.Q8_0
        return gguf.quants.quantize(w.astype(np.float32), q), q
    return w.astype(np.float16), None


# ---------------------------------------------------------------------------------------------- export

FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0"}


def stop_tokens(model_dir: Path, tokenizer) -> tuple[int | None, int | None]:
    """(eos, end-of-turn) ids for llama.cpp: the tokenizer's eos (else generation_config.json's first), and the
    stop token the chat template writes after each turn (`<|im_end|>`, `<|end|>`), so a chat stops after the answer
    even where eos is the end-of-text token."""
    path = model_dir / "generation_config.json"
    gen_eos = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id") if path.is_file() else None
    stops = [t for t in ([tokenizer.eos_token_id] + (gen_eos if isinstance(gen_eos, list) else [gen_eos]))
             if isinstance(t, int)]
    template = chat_template_for_gguf(getattr(tokenizer, "chat_template", None)) or ""
    eot = next((t for t in stops if (tokenizer.convert_ids_to_tokens(t) or "\0") in template), None)
    return (stops[0] if stops else None), eot


def write_metadata(writer, shape: LlamaShape, vocab: Vocab, tokenizer, dtype: str, name: str,
                   stops: tuple[int | None, int | None] = (None, None)) -> None:
    import gguf

    writer.add_name(name)
    writer.add_context_length(shape.context_length)
    writer.add_embedding_length(shape.hidden_size)
    writer.add_block_count(shape.n_layer)
    writer.add_feed_forward_length(shape.ffn_size)
    writer.add_head_count(shape.n_head)
    writer.add_head_count_kv(shape.n_kv_head)
    if shape.head_dim * shape.n_head != shape.hidden_size:
        writer.add_key_length(shape.head_dim)
        writer.add_value_length(shape.head_dim)
    writer.add_rope_dimension_count(shape.head_dim)
    writer.add_rope_freq_base(shape.rope_theta)
    writer.add_layer_norm_rms_eps(shape.rms_eps)
    writer.add_vocab_size(shape.vocab_size)
    writer.add_file_type(int(gguf.LlamaFileType[FILE_TYPES[dtype]]))
    if dtype == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    writer.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    eos, eot = stops
    special_ids = {writer.add_bos_token_id: tokenizer.bos_token_id,
                   writer.add_eos_token_id: eos if eos is not None else tokenizer.eos_token_id,
                   writer.add_eot_token_id: eot,
                   writer.add_pad_token_id: tokenizer.pad_token_id, writer.add_unk_token_id: tokenizer.unk_token_id}
    for add, tid in special_ids.items():
        if tid is not None:
            add(tid)
    add_bos, add_eos = adds_special(tokenizer)
    writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(add_eos)
    template = chat_template_for_gguf(getattr(tokenizer, "chat_template", None))
    if template:
        writer.add_chat_template(template)


def export_gguf(model_dir: str | os.PathLike, out: str | os.PathLike, dtype: str = "f16") -> GgufExport:
    """Write `model_dir` (a Hugging Face Llama directory) as one GGUF file at `out`, atomically."""
    import gguf
    from transformers import AutoTokenizer

    if dtype not in DTYPES:
        raise InputError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    model_dir, out = Path(model_dir), Path(out)
    shape = read_llama_shape(model_dir)
    tok_path = model_dir / "tokenizer.json"
    if not tok_path.is_file():
        raise InputError(f"{model_dir}: no tokenizer.json; GGUF export needs a fast (tokenizers) byte-level BPE")
    tokenizer_json = json.loads(tok_path.read_text(encoding="utf-8"))
    vocab = read_vocab(tokenizer_json, shape.vocab_size, tok_path)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))

    with atomic_output(out) as tmp:
        writer = gguf.GGUFWriter(str(tmp), "llama")
        write_metadata(writer, shape, vocab, tokenizer, dtype, model_dir.resolve().name,
                       stop_tokens(model_dir, tokenizer))
        n_tensors = 0
        for name, w in llama_tensors(model_dir, shape):
            data, raw_dtype = encode_tensor(w, dtype)
            writer.add_tensor(name, data, raw_dtype=raw_dtype)
            n_tensors += 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return GgufExport(out, dtype, vocab.pre, n_tensors, out.stat().st_size, shape.vocab_size)
