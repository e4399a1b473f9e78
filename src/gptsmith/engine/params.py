"""What a caller asks for (SamplingParams) and what it gets back (StreamEvent, Completion), plus sampling."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.8  # 0 -> greedy
    top_k: int = 0  # 0 -> off
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)  # stop strings; the matched one is not in the output
    seed: int | None = None  # per-sequence torch.Generator; same seed -> same output

    @classmethod
    def from_config(cls, g, **overrides) -> "SamplingParams":
        values = dict(max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_k=g.top_k, top_p=g.top_p,
                      repetition_penalty=g.repetition_penalty, seed=g.seed)
        values.update(overrides)
        return cls(**values)

    def validate(self) -> None:
        """Raise ValueError naming the field and the valid range: the server turns it into a 400."""
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1 (got {self.max_new_tokens})")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0; 0 means greedy (got {self.temperature})")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0; 0 means off (got {self.top_k})")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (got {self.top_p})")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0; 1 means off (got {self.repetition_penalty})")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must be a list of non-empty strings (got {self.stop!r})")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class StreamEvent:
    text: str  # new text since the previous event ("" while a UTF-8 character or a possible stop string is pending)
    token_ids: list[int]  # new token ids since the previous event
    finish_reason: str | None = None  # None while running; then "stop", "length", "cancelled" or "error"


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    # An unseeded request still gets its own generator, so one request's draws never depend on another's.
    g.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)
    return g


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float | torch.Tensor) -> torch.Tensor:
    """CTRL / HF-style penalty over every token already in the sequence (prompt included), as HF generate does.

    `seen` is a boolean mask over the vocabulary (same shape as `logits`), so one call covers a whole batch of
    rows at once, each with its own penalty (a (B, 1) tensor) — no per-sequence gather/scatter in the decode step.
    """
    return torch.where(seen, torch.where(logits < 0, logits * penalty, logits / penalty), logits)


def sample_token(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None) -> int:
    """One token from a 1-D row of logits (repetition penalty already applied).

    Same distribution as HF's temperature -> top-k -> top-p -> softmax, computed faster: top-k first, so
    top-p sorts k candidates instead of the vocabulary, and the draw is argmax(probs / Exp(1)) (the
    exponential-race form of sampling), which is several times cheaper than torch.multinomial per row.
    """
    if p.greedy:
        return int(logits.argmax())
    logits = logits.float() / p.temperature
    idx = None
    if p.top_k and p.top_k < logits.numel():
        logits, idx = torch.topk(logits, p.top_k)  # sorted, descending
    elif p.top_p < 1.0:
        logits, idx = torch.sort(logits, descending=True)
    if p.top_p < 1.0:
        probs = logits.softmax(-1)
        # drop a token when the tokens before it already cover top_p; the most likely token always stays
        logits = logits.masked_fill((probs.cumsum(-1) - probs) > p.top_p, float("-inf"))
    probs = logits.softmax(-1)
    choice = int((probs / torch.empty_like(probs).exponential_(generator=generator)).argmax())
    return choice if idx is None else int(idx[choice])
