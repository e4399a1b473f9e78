"""The sampling defaults, in one place.

`gptsmith generate`/`chat`/`serve` (config.py's GenerateConfig), the engine (engine/params.py's SamplingParams)
and the generation_config.json saved with every model (model.py's default_generation_config) all take their
defaults from here. A plain module with no imports, so the low-level config module can use it too.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GenerationDefaults:
    max_new_tokens: int = 256
    temperature: float = 0.8  # 0 = greedy
    top_k: int = 50  # 0 = off
    top_p: float = 0.95  # 1 = off
    repetition_penalty: float = 1.1  # 1 = off


DEFAULTS = GenerationDefaults()

# The fields a caller, a config file or a model's generation_config.json may set; None means "not set".
SAMPLING_FIELDS = ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty")
