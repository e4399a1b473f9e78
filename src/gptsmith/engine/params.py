"""What a caller asks for (SamplingParams) and what it gets back (StreamEvent, Completion), plus sampling."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from gptsmith.errors import InputError
from gptsmith.generation_defaults import DEFAULTS, SAMPLING_FIELDS

GENERATION_CONFIG = "generation_config.json"


@dataclass
class SamplingParams:
    """What one request asks for. None = not set: the model's generation_config.json decides, else DEFAULTS
    (Engine.resolve fills them in; the engine generates with resolved params only)."""
    max_new_tokens: int | None = None
    temperature: float | None = None  # 0 -> greedy
    top_k: int | None = None  # 0 -> off
    top_p: float | None = None  # 1 -> off
    repetition_penalty: float | None = None  # 1 -> off
    stop: list[str] = field(default_factory=list)  # stop strings; the matched one is not in the output
    seed: int | None = None  # per-sequence torch.Generator; same seed -> same output

    @classmethod
    def from_config(cls, g, **overrides) -> "SamplingParams":
        """The fields a GenerateConfig sets (not null); the others stay None, so a model's generation_config.json
        can fill them."""
        values = {f: getattr(g, f, None) for f in SAMPLING_FIELDS}
        values["seed"] = g.seed
        values.update(overrides)
        return cls(**{k: v for k, v in values.items() if v is not None or k == "seed"})

    def resolved(self, model_defaults: dict | None = None) -> "SamplingParams":
        """Every unset field filled: from `model_defaults` (the model's generation config), else DEFAULTS."""
        model_defaults = model_defaults or {}
        values = {}
        for f in SAMPLING_FIELDS:
            value = getattr(self, f)
            values[f] = value if value is not None else model_defaults.get(f, getattr(DEFAULTS, f))
        return replace(self, **values)

    def validate(self) -> None:
        """Raise ValueError naming the field and the valid range: the server turns it into a 400. Unset (None)
        fields pass: they are filled from valid defaults."""
        checks = (("max_new_tokens", lambda v: v >= 1, "must be >= 1"),
                  ("temperature", lambda v: v >= 0, "must be >= 0; 0 means greedy"),
                  ("top_k", lambda v: v >= 0, "must be >= 0; 0 means off"),
                  ("top_p", lambda v: 0 < v <= 1, "must be in (0, 1]"),
                  ("repetition_penalty", lambda v: v > 0, "must be > 0; 1 means off"))
        for name, ok, rule in checks:
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a number (got {value!r})")
            if name in ("max_new_tokens", "top_k") and not isinstance(value, int):
                raise ValueError(f"{name} must be a whole number (got {value!r})")
            if not ok(value):
                raise ValueError(f"{name} {rule} (got {value})")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must be a list of non-empty strings (got {self.stop!r})")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def read_generation_config(model_dir) -> tuple[dict, list[int]]:
    """A model directory's generation_config.json as (sampling defaults it sets, its eos token ids).

    Only what the file says counts. transformers writes only the values that differ from its own defaults, so
    a file with `do_sample` speaks transformers' language: a sampling key it leaves out means transformers'
    default for it (temperature 1, top_k 50, top_p 1, no repetition penalty), and `do_sample: false` is greedy.
    """
    path = Path(model_dir) / GENERATION_CONFIG
    if not path.is_file():
        return {}, []
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: not a readable JSON file ({e}). Fix or delete it") from None
    if not isinstance(raw, dict):
        raise InputError(f"{path}: must be a JSON object of generation settings")
    values = {f: raw[f] for f in SAMPLING_FIELDS if raw.get(f) is not None}
    if "do_sample" in raw:
        from transformers import GenerationConfig

        hf = GenerationConfig()
        for f in ("temperature", "top_k", "top_p", "repetition_penalty"):
            values.setdefault(f, getattr(hf, f))
        if raw["do_sample"] is False:
            values["temperature"] = 0
    try:
        SamplingParams(**values).validate()
    except ValueError as e:
        raise InputError(f"{path}: {e}. Fix the value or remove the key") from None
    eos = raw.get("eos_token_id")
    eos_ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
    if any(isinstance(t, bool) or not isinstance(t, int) for t in eos_ids):
        raise InputError(f"{path}: eos_token_id must be a token id or a list of them (got {eos!r})")
    return values, eos_ids


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
