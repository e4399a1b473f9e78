"""Model runners: a forward pass over per-slot KV caches, for prefill (one prompt) and decode (all slots at once).

`LlamaRunner` is a compact functional Llama forward that reads the HF model's own weight tensors (no copy)
and keeps a pre-allocated KV cache with one row per slot, each slot at its own position. That is what
makes continuous batching simple, and it avoids the per-step Python overhead of `model.generate()`
(cache objects, mask builders, logits processors), which dominates decode time for small models.
It mirrors `transformers`' LlamaForCausalLM op for op (the tests check greedy output token for token).

`HFRunner` is the fallback for every other architecture: the model's own forward with a DynamicCache per
slot, decoding slot by slot. Slower, but correct for anything AutoModelForCausalLM loads.

Slots are kept dense: active sequences occupy slots 0..n-1, so decode works on a contiguous slice of the
cache; when a sequence leaves, the last one is moved into its slot (`move`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# rope types whose cos/sin do not depend on the sequence length, so one table covers every position
STATIC_ROPE = {"default", "linear", "llama3", "yarn"}


def llama_supported(model) -> bool:
    cfg = model.config
    if getattr(cfg, "model_type", None) != "llama" or not hasattr(model, "model"):
        return False
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    return rope_type in STATIC_ROPE and getattr(cfg, "hidden_act", "silu") == "silu"


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == torch.float32 and x.device.type == "cpu":
        # one fused op instead of six; bit-identical to HF's LlamaRMSNorm in fp32 on CPU (the tests check)
        return F.rms_norm(x, w.shape, w, eps)
    dtype = x.dtype
    x = x.to(torch.float32)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return w * x.to(dtype)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    # HF: x * cos + rotate_half(x) * sin, where rotate_half(x) = cat(-x2, x1). roll(x) = cat(x2, x1) times
    # sin with its first half negated gives bit-identical products in one op instead of four.
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin_signed


class LlamaRunner:
    def __init__(self, model, n_slots: int, max_len: int):
        cfg = model.config
        inner = model.model
        self.n_head = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.n_rep = self.n_head // self.n_kv
        self.scale = self.head_dim ** -0.5
        self.eps = cfg.rms_norm_eps
        self.embed = inner.embed_tokens.weight
        self.norm = inner.norm.weight
        self.lm_head = model.lm_head.weight  # the same tensor as embed when embeddings are tied
        self.layers = []
        for layer in inner.layers:
            a, m = layer.self_attn, layer.mlp
            self.layers.append((layer.input_layernorm.weight, a.q_proj.weight, a.q_proj.bias, a.k_proj.weight,
                                a.k_proj.bias, a.v_proj.weight, a.v_proj.bias, a.o_proj.weight, a.o_proj.bias,
                                layer.post_attention_layernorm.weight, m.gate_proj.weight, m.gate_proj.bias,
                                m.up_proj.weight, m.up_proj.bias, m.down_proj.weight, m.down_proj.bias))
        device, dtype = self.embed.device, self.embed.dtype
        self.max_len = max_len
        # cos/sin for every position from the model's own rotary module: any static rope scaling is included
        pos = torch.arange(max_len, device=device)[None]
        cos, sin = inner.rotary_emb(torch.empty(0, device=device, dtype=dtype), position_ids=pos)
        half = self.head_dim // 2
        self.cos, self.sin = cos[0], torch.cat([-sin[0, :, :half], sin[0, :, half:]], -1)  # (max_len, head_dim)
        # zeros, not empty: masked-out cache positions still enter the value matmul with weight 0, and 0*NaN=NaN
        shape = (len(self.layers), n_slots, self.n_kv, max_len, self.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.device = device

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(_rms(x, self.norm, self.eps), self.lm_head).float()

    def _mlp(self, x, lw) -> torch.Tensor:
        h = _rms(x, lw[9], self.eps)
        return F.linear(F.silu(F.linear(h, lw[10], lw[11])) * F.linear(h, lw[12], lw[13]), lw[14], lw[15])

    def prefill(self, slot: int, ids: list[int]) -> torch.Tensor:
        """Run a whole prompt into `slot`'s cache; returns the next-token logits (vocab,)."""
        n = len(ids)
        x = F.embedding(torch.tensor([ids], device=self.device), self.embed)  # (1, n, d)
        cos, sin = self.cos[None, None, :n], self.sin[None, None, :n]
        for i, lw in enumerate(self.layers):
            h = _rms(x, lw[0], self.eps)
            q = F.linear(h, lw[1], lw[2]).view(1, n, self.n_head, self.head_dim).transpose(1, 2)
            k = F.linear(h, lw[3], lw[4]).view(1, n, self.n_kv, self.head_dim).transpose(1, 2)
            v = F.linear(h, lw[5], lw[6]).view(1, n, self.n_kv, self.head_dim).transpose(1, 2)
            q, k = _rope(q, cos, sin), _rope(k, cos, sin)
            self.k[i, slot, :, :n] = k[0]
            self.v[i, slot, :, :n] = v[0]
            o = F.scaled_dot_product_attention(q, k, v, is_causal=n > 1, scale=self.scale,
                                               enable_gqa=self.n_rep > 1)
            x = x + F.linear(o.transpose(1, 2).reshape(1, n, -1), lw[7], lw[8])
            x = x + self._mlp(x, lw)
        return self._logits(x[0, -1])

    def decode(self, tokens: list[int], positions: list[int]) -> torch.Tensor:
        """One token for each of slots 0..B-1, token b at positions[b]; returns logits (B, vocab)."""
        b = len(tokens)
        x = F.embedding(torch.tensor(tokens, device=self.device), self.embed)[:, None]  # (B, 1, d)
        t = max(positions) + 1
        if b == 1:
            p = positions[0]
            cos, sin = self.cos[None, None, p:p + 1], self.sin[None, None, p:p + 1]
            mask = None
        else:
            pos = torch.tensor(positions, device=self.device)
            cos, sin = self.cos[pos][:, None, None], self.sin[pos][:, None, None]  # (B, 1, 1, hd)
            mask = (torch.arange(t, device=self.device)[None] <= pos[:, None])[:, None, None]  # (B, 1, 1, t)
            rows = torch.arange(b, device=self.device)
        for i, lw in enumerate(self.layers):
            h = _rms(x, lw[0], self.eps)
            q = F.linear(h, lw[1], lw[2]).view(b, 1, self.n_head, self.head_dim).transpose(1, 2)
            k = F.linear(h, lw[3], lw[4]).view(b, 1, self.n_kv, self.head_dim).transpose(1, 2)
            v = F.linear(h, lw[5], lw[6]).view(b, 1, self.n_kv, self.head_dim).transpose(1, 2)
            q, k = _rope(q, cos, sin), _rope(k, cos, sin)
            if b == 1:
                self.k[i, 0, :, p:p + 1] = k[0]
                self.v[i, 0, :, p:p + 1] = v[0]
                o = F.scaled_dot_product_attention(q, self.k[i, :1, :, :t], self.v[i, :1, :, :t], scale=self.scale,
                                                   enable_gqa=self.n_rep > 1)
            else:
                self.k[i, rows, :, pos] = k[:, :, 0]
                self.v[i, rows, :, pos] = v[:, :, 0]
                # the query heads sharing a kv head become n_rep query rows of it: no repeat of the cache
                qg = q.reshape(b, self.n_kv, self.n_rep, self.head_dim)
                o = F.scaled_dot_product_attention(qg, self.k[i, :b, :, :t], self.v[i, :b, :, :t],
                                                   attn_mask=mask, scale=self.scale)
                o = o.reshape(b, self.n_head, 1, self.head_dim)
            x = x + F.linear(o.transpose(1, 2).reshape(b, 1, -1), lw[7], lw[8])
            x = x + self._mlp(x, lw)
        return self._logits(x[:, 0])

    def move(self, src: int, dst: int, length: int) -> None:
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]


class HFRunner:
    """Any causal LM through its own forward and a DynamicCache per slot."""

    def __init__(self, model, n_slots: int, max_len: int):
        self.model = model
        self.device = next(model.parameters()).device
        self.caches: list = [None] * n_slots
        self.max_len = max_len

    def prefill(self, slot: int, ids: list[int]) -> torch.Tensor:
        from transformers import DynamicCache
        cache = DynamicCache(config=self.model.config)
        out = self.model(input_ids=torch.tensor([ids], device=self.device), past_key_values=cache, use_cache=True,
                         logits_to_keep=1)
        self.caches[slot] = out.past_key_values
        return out.logits[0, -1].float()

    def decode(self, tokens: list[int], positions: list[int]) -> torch.Tensor:
        rows = []
        for slot, (tok, pos) in enumerate(zip(tokens, positions)):
            out = self.model(input_ids=torch.tensor([[tok]], device=self.device), past_key_values=self.caches[slot],
                             position_ids=torch.tensor([[pos]], device=self.device), use_cache=True)
            self.caches[slot] = out.past_key_values
            rows.append(out.logits[0, -1].float())
        return torch.stack(rows)

    def move(self, src: int, dst: int, length: int) -> None:
        self.caches[dst], self.caches[src] = self.caches[src], None
