"""Pieces every trainer shares: device and precision, distributed setup, LR schedules, atomic checkpoints,
RNG state, peak FLOPs for MFU, and the metrics trail (metrics.jsonl, TensorBoard, loss.png)."""

from __future__ import annotations

import io
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gptsmith.files import atomic_write_bytes, atomic_write_text

CHECKPOINT_RE = re.compile(r"^step_(\d+)$")
COMPLETE_MARKER = "complete"


# ---------------------------------------------------------------------------------------------- device

def select_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device '{name}' was asked for but CUDA is not available; use --pretrain.device cpu")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)
    return dev


def autocast_dtype(device: torch.device, name: str = "auto") -> torch.dtype | None:
    """The dtype to autocast matmuls to, or None for plain fp32 (the CPU default: bf16 on CPU is slower)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    return {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def setup_backends(device: torch.device) -> None:
    if device.type == "cuda":
        # TF32 matmuls: ~8x the fp32 throughput on Ampere+ for what little stays in fp32 under autocast.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


# ---------------------------------------------------------------------------------------------- distributed

@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def dist_from_env() -> Dist:
    """torchrun sets RANK / LOCAL_RANK / WORLD_SIZE; a plain `python` run has none and is a world of one."""
    return Dist(int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
                int(os.environ.get("WORLD_SIZE", 1)))


def init_distributed(dist: Dist, device: torch.device) -> None:
    import torch.distributed as td

    if dist.enabled and not td.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        td.init_process_group("nccl" if device.type == "cuda" else "gloo")


def all_reduce_mean(values: list[float], dist: Dist, device: torch.device) -> list[float]:
    if not dist.enabled:
        return values
    import torch.distributed as td

    t = torch.tensor(values, dtype=torch.float64, device=device)
    td.all_reduce(t)
    return (t / dist.world_size).tolist()


class StopOnSigint:
    """The first Ctrl-C asks the loop to stop after the current step, so the checkpoint and model it then
    saves are consistent; a second Ctrl-C interrupts at once as usual."""

    def __enter__(self):
        self.requested = False
        self.previous = None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True
        signal.signal(signal.SIGINT, self.previous)
        print("\nCtrl-C: stopping after this step and saving (press again to abort)", flush=True)

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
        return False


# ---------------------------------------------------------------------------------------------- schedules

def lr_multiplier(step: int, max_steps: int, warmup_steps: int, schedule: str = "cosine",
                  min_lr_ratio: float = 0.1, decay_fraction: float = 0.2) -> float:
    """LR as a fraction of the peak at optimizer step `step` (0-based): linear warmup, then
    cosine to min_lr_ratio, or warmup-stable-decay (flat, then a linear decay over the last decay_fraction)."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "wsd":
        decay_start = max(warmup_steps, int(max_steps * (1 - decay_fraction)))
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start) / max(1, max_steps - decay_start))
        return 1.0 - (1.0 - min_lr_ratio) * progress
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices and embeddings only: decaying norms' gains (1-D) just pulls them toward zero."""
    params = [p for p in model.parameters() if p.requires_grad]  # parameters() dedups tied weights
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


# ---------------------------------------------------------------------------------------------- RNG

def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------- checkpoints

def checkpoint_dirs(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints under `root`, oldest first. A directory counts only once its `complete` marker
    exists, which is written last and renamed into place, so a checkpoint cut short by a kill is never used."""
    root = Path(root)
    found = []
    if root.is_dir():
        for d in root.iterdir():
            m = CHECKPOINT_RE.match(d.name)
            if m and d.is_dir() and (d / COMPLETE_MARKER).is_file():
                found.append((int(m.group(1)), d))
    return sorted(found)


def find_latest_checkpoint(root: str | os.PathLike) -> Path | None:
    found = checkpoint_dirs(root)
    return found[-1][1] if found else None


def save_checkpoint(root: str | os.PathLike, step: int, state: dict, keep: int = 2) -> Path:
    """Write `state` (anything torch.save takes) to root/step_NNNNNN/state.pt: temp dir, fsync, marker, rename."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    tmp = root / f".step_{step:06d}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    with open(tmp / "state.pt", "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    atomic_write_text(tmp / COMPLETE_MARKER, json.dumps({"step": step, "time": time.time()}) + "\n")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for _, old in checkpoint_dirs(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    # leftovers of checkpoints cut short by a crash
    for d in root.glob(".step_*.tmp-*"):
        shutil.rmtree(d, ignore_errors=True)
    return final


def load_checkpoint(path: str | os.PathLike) -> dict:
    # weights_only=False: the state holds Python/numpy RNG states, which are ours, not untrusted input
    return torch.load(Path(path) / "state.pt", map_location="cpu", weights_only=False)


# ---------------------------------------------------------------------------------------------- MFU

# Dense bf16 tensor-core peaks (no sparsity), FLOP/s. fp32 training on these uses TF32: half the figure.
GPU_PEAK_BF16 = {
    "H200": 989e12, "H100": 989e12, "GH200": 989e12, "H800": 989e12, "B200": 2250e12,
    "A100": 312e12, "A800": 312e12, "A10G": 70e12, "A10": 125e12, "A6000": 155e12, "L40S": 362e12,
    "L40": 181e12, "L4": 121e12, "4090": 165e12, "3090": 71e12, "V100": 125e12, "T4": 65e12,
}


def _cache_file() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "gptsmith" / "peak_flops.json"


def measure_matmul_flops(device: torch.device, dtype: torch.dtype = torch.float32, sizes=(512, 1024, 2048),
                         seconds: float = 0.25) -> float:
    """Best observed torch.mm throughput over a few sizes: the realistic peak on hardware with no published
    figure (CPUs). The best burst, not the mean, so a busy machine understates it less."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        torch.mm(a, b)
        sync()
        t_end = time.perf_counter() + seconds
        while time.perf_counter() < t_end:
            t0 = time.perf_counter()
            torch.mm(a, b)
            sync()
            best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    return best


def peak_flops(device: torch.device, dtype: torch.dtype | None = None) -> float:
    """Peak FLOP/s to measure MFU against: GPTSMITH_PEAK_FLOPS if set, a table for known GPUs, else a matmul
    benchmark cached on disk (delete ~/.cache/gptsmith/peak_flops.json to measure again)."""
    if os.environ.get("GPTSMITH_PEAK_FLOPS"):
        return float(os.environ["GPTSMITH_PEAK_FLOPS"])
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in GPU_PEAK_BF16.items():
            if key in name:
                return flops if dtype in (torch.bfloat16, torch.float16) else flops / 2
    dtype = dtype or torch.float32
    key = f"{device.type}|{platform.processor() or platform.machine()}|{os.cpu_count()}|" \
          f"{torch.get_num_threads()}|{dtype}|{torch.__version__}"
    if device.type == "cuda":
        key += "|" + torch.cuda.get_device_name(device)
    path = _cache_file()
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    if key not in cache:
        cache[key] = measure_matmul_flops(device, dtype)
        try:
            atomic_write_text(path, json.dumps(cache, indent=1))
        except OSError:
            pass  # a read-only home only costs a re-measure next time
    return cache[key]


# ---------------------------------------------------------------------------------------------- metrics

class MetricsLog:
    """metrics.jsonl + TensorBoard (OUT/logs) + loss.png, all from one list of records.

    The records travel in each checkpoint, so after a resume the files hold exactly the history up to the
    checkpoint plus what came after, never duplicate steps from the run that was killed.
    """

    def __init__(self, out_dir: str | os.PathLike, records: list[dict] | None = None, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.out_dir = Path(out_dir)
        self.records: list[dict] = list(records or [])
        self.writer = SummaryWriter(str(self.out_dir / "logs"), purge_step=purge_step)
        self.last_plot = 0.0

    def log(self, step: int, **values) -> None:
        rec = {"step": step, "time": round(time.time(), 3), **values}
        self.records.append(rec)
        for k, v in values.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                self.writer.add_scalar(k, v, step)
            elif isinstance(v, str):
                self.writer.add_text(k, v, step)

    def flush(self, plot_every_s: float = 60.0) -> None:
        self.writer.flush()
        lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self.records)
        atomic_write_text(self.out_dir / "metrics.jsonl", lines)
        # drawing costs ~0.5 s of matplotlib; small runs checkpoint often, so redraw at most once a minute
        if time.monotonic() - self.last_plot >= plot_every_s:
            self.plot()
            self.last_plot = time.monotonic()

    def plot(self) -> None:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        train = [(r["step"], r["train/loss"]) for r in self.records if "train/loss" in r]
        val = [(r["step"], r["val/loss"]) for r in self.records if "val/loss" in r]
        if not train and not val:
            return
        fig, ax = plt.subplots(figsize=(7, 4))
        if train:
            ax.plot(*zip(*train), label="train", linewidth=1)
        if val:
            ax.plot(*zip(*val), "o-", label="validation", linewidth=1.5)
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        plt.close(fig)
        atomic_write_bytes(self.out_dir / "loss.png", buf.getvalue())

    def close(self) -> None:
        self.flush(plot_every_s=0)
        self.writer.close()
