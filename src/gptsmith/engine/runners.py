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
# Above this, copying q/k/v and gate/up into fused matrices costs real memory and buys nothing: per-op
# overhead only matters next to small matmuls. Bigger models keep separate projections (no copy).
FUSE_MAX_BYTES = 256 << 20


def llama_supported(model) -> bool:
    cfg = model.config
    if getattr(cfg, "model_type", None) != "llama" or not hasattr(model, "model"):
        return False
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    return rope_type in STATIC_ROPE and getattr(cfg, "hidden_act", "silu") == "silu"


def _fused_sources(model) -> list[tuple]:
    return [(layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.mlp.gate_proj,
             layer.mlp.up_proj) for layer in model.model.layers]


def weights_key(model) -> tuple:
    """Changes whenever a weight that the fused copies come from is replaced or edited in place."""
    return tuple((m.weight.data_ptr(), m.weight._version) for mods in _fused_sources(model) for m in mods)


def _proj(mods, fuse: bool):
    """(weight, bias) of several linears applied to the same input: one concatenated matrix when `fuse`
    (one matmul instead of several: at batch 1 the per-op overhead costs more than the math), else the
    separate weights, concatenated after the matmuls."""
    ws, bs = [m.weight for m in mods], [m.bias for m in mods]
    bias = None if all(b is None for b in bs) else [b if b is not None else w.new_zeros(w.shape[0])
                                                    for w, b in zip(ws, bs)]
    if not fuse:
        return ws, bias
    with torch.no_grad():
        return torch.cat(ws), None if bias is None else torch.cat(bias)


def llama_weights(model) -> list[tuple]:
    """Per layer: (input norm, qkv, o, post norm, gate-up, down); qkv and gate-up are (weight, bias) pairs
    (fused or lists), o and down are (weight transposed, bias) for addmm."""
    fused_bytes = sum(m.weight.numel() * m.weight.element_size() for mods in _fused_sources(model) for m in mods)
    fuse = fused_bytes <= FUSE_MAX_BYTES
    layers = []
    for layer, mods in zip(model.model.layers, _fused_sources(model)):
        a, m = layer.self_attn, layer.mlp
        layers.append((layer.input_layernorm.weight, _proj(mods[:3], fuse), (a.o_proj.weight.t(), a.o_proj.bias),
                       layer.post_attention_layernorm.weight, _proj(mods[3:], fuse),
                       (m.down_proj.weight.t(), m.down_proj.bias)))
    return layers


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == torch.float32 and x.device.type == "cpu":
        # one fused op instead of six; bit-identical to HF's LlamaRMSNorm in fp32 on CPU (the tests check)
        return F.rms_norm(x, w.shape, w, eps)
    dtype = x.dtype
    x = x.to(torch.float32)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return w * x.to(dtype)


def _linear(x: torch.Tensor, wb) -> torch.Tensor:
    w, b = wb
    if isinstance(w, torch.Tensor):
        return F.linear(x, w, b)
    return torch.cat([F.linear(x, wi, None if b is None else b[i]) for i, wi in enumerate(w)], -1)


def _residual(x: torch.Tensor, h: torch.Tensor, wb) -> torch.Tensor:
    """x + h @ W.T (+ bias): one addmm, bit-identical to the add after the linear."""
    wt, b = wb
    return torch.addmm(x, h, wt) if b is None else x + F.linear(h, wt.t(), b)


def _mlp(h: torch.Tensor, gate_up) -> torch.Tensor:
    g, u = _linear(h, gate_up).chunk(2, -1)
    return F.silu(g) * u


def _rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    # HF: x * cos + rotate_half(x) * sin, where rotate_half(x) = cat(-x2, x1). roll(x) = cat(x2, x1) times
    # sin with its first half negated gives bit-identical products in one op instead of four.
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin_signed


class LlamaRunner:
    def __init__(self, model, n_slots: int, max_len: int, weights: list[tuple] | None = None):
        cfg = model.config
        inner = model.model
        self.n_head = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.n_rep = self.n_head // self.n_kv
        self.n_rows = self.n_head + 2 * self.n_kv  # head rows of the qkv projection: q, then k, then v
        self.scale = self.head_dim ** -0.5
        self.eps = cfg.rms_norm_eps
        self.embed = inner.embed_tokens.weight
        self.norm = inner.norm.weight
        self.lm_head = model.lm_head.weight  # the same tensor as embed when embeddings are tied
        self.layers = weights if weights is not None else llama_weights(model)
        device, dtype = self.embed.device, self.embed.dtype
        self.max_len = max_len
        # cos/sin for every position from the model's own rotary module: any static rope scaling is included
        pos = torch.arange(max_len, device=device)[None]
        cos, sin = inner.rotary_emb(torch.empty(0, device=device, dtype=dtype), position_ids=pos)
        half = self.head_dim // 2
        self.cos, self.sin = cos[0], torch.cat([-sin[0, :, :half], sin[0, :, half:]], -1)  # (max_len, head_dim)
        # One cache for keys and values, (layer, slot, k|v, kv head, position, head_dim), so the k and v rows of
        # the qkv projection go in with one write. Zeros, not empty: masked-out positions still enter the value
        # matmul with weight 0, and 0*NaN=NaN.
        self.kv = torch.zeros((len(self.layers), n_slots, 2, self.n_kv, max_len, self.head_dim), device=device,
                              dtype=dtype)
        self.kv0 = [self.kv[i, :1].transpose(0, 1) for i in range(len(self.layers))]  # slot 0: (2, 1, kv, T, hd)
        # rope over all qkv head rows at once: v rows get cos 1, sin 0, so they pass through unchanged
        self.cos1, self.sin1 = self._rope_rows(1)
        self.device = device

    def _rope_rows(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (n, self.n_rows, self.head_dim)
        return (torch.ones(shape, device=self.embed.device, dtype=self.cos.dtype),
                torch.zeros(shape, device=self.embed.device, dtype=self.cos.dtype))

    def _rope_at(self, pos) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self._rope_rows(len(self.cos[pos]))
        qk = self.n_head + self.n_kv
        cos[:, :qk], sin[:, :qk] = self.cos[pos][:, None], self.sin[pos][:, None]
        return cos, sin

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(_rms(x, self.norm, self.eps), self.lm_head).float()

    def prefill(self, slot: int, ids: list[int]) -> torch.Tensor:
        """Run a whole prompt into `slot`'s cache; returns the next-token logits (vocab,)."""
        n, nh, hd = len(ids), self.n_head, self.head_dim
        x = F.embedding(torch.tensor(ids, device=self.device), self.embed)  # (n, d)
        cos, sin = self._rope_at(slice(0, n))
        for i, (ln1, qkv_w, o_w, ln2, gu_w, down_w) in enumerate(self.layers):
            qkv = _rope(_linear(_rms(x, ln1, self.eps), qkv_w).view(n, self.n_rows, hd), cos, sin)
            self.kv[i, slot, :, :, :n] = qkv[:, nh:].view(n, 2, self.n_kv, hd).permute(1, 2, 0, 3)
            q = qkv[:, :nh].transpose(0, 1)[None]  # (1, heads, n, hd)
            k, v = self.kv[i, slot, :, None, :, :n]
            o = F.scaled_dot_product_attention(q, k, v, is_causal=n > 1, scale=self.scale,
                                               enable_gqa=self.n_rep > 1)
            x = _residual(x, o[0].transpose(0, 1).reshape(n, -1), o_w)
            x = _residual(x, _mlp(_rms(x, ln2, self.eps), gu_w), down_w)
        return self._logits(x[-1:])[0]

    def decode(self, tokens: list[int], positions: list[int]) -> torch.Tensor:
        """One token for each of slots 0..B-1, token b at positions[b]; returns logits (B, vocab)."""
        if len(tokens) == 1:
            return self._decode1(tokens[0], positions[0])
        b, nh, hd = len(tokens), self.n_head, self.head_dim
        x = F.embedding(torch.tensor(tokens, device=self.device), self.embed)  # (B, d)
        t = max(positions) + 1
        pos = torch.tensor(positions, device=self.device)
        cos, sin = self._rope_at(pos)
        mask = (torch.arange(t, device=self.device)[None] <= pos[:, None])[:, None, None]  # (B, 1, 1, t)
        rows = torch.arange(b, device=self.device)
        for i, (ln1, qkv_w, o_w, ln2, gu_w, down_w) in enumerate(self.layers):
            qkv = _rope(_linear(_rms(x, ln1, self.eps), qkv_w).view(b, self.n_rows, hd), cos, sin)
            self.kv[i, rows, :, :, pos] = qkv[:, nh:].view(b, 2, self.n_kv, hd)
            # the query heads sharing a kv head become n_rep query rows of it: no repeat of the cache
            q = qkv[:, :nh].view(b, self.n_kv, self.n_rep, hd)
            k, v = self.kv[i, :b, :, :, :t].unbind(1)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
            x = _residual(x, o.reshape(b, -1), o_w)
            x = _residual(x, _mlp(_rms(x, ln2, self.eps), gu_w), down_w)
        return self._logits(x)

    def _decode1(self, token: int, p: int) -> torch.Tensor:
        """Batch 1, the latency case: a tiny model spends more time per op than in it, so this path does as
        few ops as it can: no tensors built per step, one projection, one rope and one cache write per layer."""
        nh, hd = self.n_head, self.head_dim
        x = self.embed[token:token + 1]  # (1, d), a view of the table: never written to
        cos, sin = self.cos1[0], self.sin1[0]
        qk = nh + self.n_kv
        cos[:qk], sin[:qk] = self.cos[p], self.sin[p]
        t = p + 1
        for i, (ln1, qkv_w, o_w, ln2, gu_w, down_w) in enumerate(self.layers):
            qkv = _rope(_linear(_rms(x, ln1, self.eps), qkv_w).view(self.n_rows, hd), cos, sin)
            kv = self.kv0[i]
            kv[:, 0, :, p] = qkv[nh:].view(2, self.n_kv, hd)
            k, v = kv[:, :, :, :t]
            o = F.scaled_dot_product_attention(qkv[:nh].view(1, self.n_kv, self.n_rep, hd), k, v, scale=self.scale)
            x = _residual(x, o.view(1, -1), o_w)
            x = _residual(x, _mlp(_rms(x, ln2, self.eps), gu_w), down_w)
        return self._logits(x)

    def move(self, src: int, dst: int, length: int) -> None:
        self.kv[:, dst, :, :, :length] = self.kv[:, src, :, :, :length]


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
