"""Which torch device a command runs on: one rule for pretraining, fine-tuning and the engine."""

from __future__ import annotations

import torch

from gptsmith.errors import InputError


def mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()


def select_device(name: str = "auto", local_rank: int = 0, setting: str = "device") -> torch.device:
    """`auto`: CUDA (this process's GPU under torchrun), else Apple MPS, else CPU. An explicit name must
    exist on this machine; `setting` names the config key in the error (e.g. `pretrain.device`)."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        return torch.device("mps") if mps_available() else torch.device("cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise InputError(f"{setting}: '{name}' is not a device; use auto, cpu, cuda, cuda:1 or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"{setting} is '{name}' but no CUDA GPU is visible; use --{setting} cpu (or auto)")
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
        elif dev.index >= torch.cuda.device_count():
            raise InputError(f"{setting} is '{name}' but only {torch.cuda.device_count()} CUDA GPU(s) are visible")
    if dev.type == "mps" and not mps_available():
        raise InputError(f"{setting} is '{name}' but Apple MPS is not available here; use --{setting} cpu (or auto)")
    return dev
