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
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from gptsmith.files import atomic_write_bytes, atomic_write_text

CHECKPOINT_RE = re.compile(r"^step_(\d+)$")
COMPLETE_MARKER = "complete"


# ---------------------------------------------------------------------------------------------- device

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


@dataclass(frozen=True)
class LRSchedule:
    """The learning rate of every optimizer step, as a fraction of the peak: a pure function of the step, so
    a resumed run gets the same LR as the uninterrupted one. It is saved in every checkpoint.

    `rebase_step`/`rebase_multiplier`: set when the length changed after the decay had begun (a resume with
    a new --max-steps): from that step the decay restarts at the LR the run had there and ends at min_lr_ratio
    on the new last step, with no jump in the LR.
    `rebase_progress`: set by `stretched` (a time budget re-planned from measured speed): from `rebase_step` the
    rest of the decay, from the point it had reached, is stretched (or squeezed) over the steps up to the new
    last one: the same curve, a new length, no jump in the LR."""

    total_steps: int
    warmup_steps: int
    kind: str = "cosine"
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2
    rebase_step: int = 0
    rebase_multiplier: float | None = None
    rebase_progress: float | None = None

    def multiplier(self, step: int) -> float:
        if self.rebase_progress is not None and step >= self.rebase_step and self.kind != "constant":
            progress = self.rebase_progress + (1.0 - self.rebase_progress) * min(
                1.0, (step - self.rebase_step) / max(1, self.total_steps - self.rebase_step))
            if self.kind == "wsd":  # progress through the linear decay
                return 1.0 - (1.0 - self.min_lr_ratio) * progress
            return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
        if self.rebase_multiplier is None or step < self.rebase_step:
            return lr_multiplier(step, self.total_steps, self.warmup_steps, self.kind, self.min_lr_ratio,
                                 self.decay_fraction)
        if self.kind == "constant":
            return 1.0
        start, top, low = self.rebase_step, self.rebase_multiplier, self.min_lr_ratio
        if self.kind == "wsd":
            start = max(start, int(self.total_steps * (1 - self.decay_fraction)))
            if step < start:
                return top
            return top - (top - low) * min(1.0, (step - start) / max(1, self.total_steps - start))
        progress = min(1.0, (step - start) / max(1, self.total_steps - start))
        return low + (top - low) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def decay_started(self, step: int) -> bool:
        if self.kind == "constant" or step <= self.warmup_steps:
            return False
        if self.kind == "wsd" and self.rebase_multiplier is None and self.rebase_progress is None:
            return step > max(self.warmup_steps, int(self.total_steps * (1 - self.decay_fraction)))
        return True

    def with_total(self, step: int, total_steps: int) -> "LRSchedule":
        """The schedule for a new length, from `step` on. Before the decay has begun this is exactly the
        schedule a run planned with `total_steps` from the start has; after, the decay restarts from the
        current LR and reaches its end on the new last step."""
        if total_steps == self.total_steps:
            return self
        planned_anew = replace(self, total_steps=total_steps)
        if not self.decay_started(step) and not planned_anew.decay_started(step):
            return planned_anew
        return replace(self, total_steps=total_steps, rebase_step=step, rebase_multiplier=self.multiplier(step),
                       rebase_progress=None)

    def stretched(self, step: int, total_steps: int) -> "LRSchedule":
        """The schedule for a new length when the length is an estimate that keeps being revised (a time
        budget): before the decay has begun, the schedule planned for `total_steps`; after, the decay goes on
        from the point of its curve the LR has reached, stretched over the steps left. Re-planning often keeps
        the shape of one cosine, where `with_total`'s fresh decay from each re-plan would hold the LR near its
        peak until the last few steps."""
        if total_steps == self.total_steps:
            return self
        planned_anew = replace(self, total_steps=total_steps)
        if self.kind == "constant" or (not self.decay_started(step) and not planned_anew.decay_started(step)):
            return planned_anew
        low = self.min_lr_ratio
        left = min(1.0, max(0.0, (self.multiplier(step) - low) / (1.0 - low))) if low < 1 else 1.0
        progress = 1.0 - left if self.kind == "wsd" else math.acos(2.0 * left - 1.0) / math.pi
        return replace(self, total_steps=total_steps, rebase_step=step, rebase_multiplier=None,
                       rebase_progress=progress)


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

# Dense (no sparsity) peak FLOP/s per GPU and matmul kind, from the vendors' datasheets. TF32 is not always
# half of bf16 (fp32 with TF32 off is far lower, Volta/Turing have no TF32 or bf16 at all), so each kind has
# its own figure; a kind a GPU lacks is left out and measured instead. Longer names first: "H100 PCIe"
# must match before "H100".
GPU_PEAK_FLOPS: dict[str, dict[str, float]] = {
    "H100 PCIe": {"bf16": 756e12, "fp16": 756e12, "tf32": 378e12, "fp32": 51e12},
    "H100 NVL": {"bf16": 835e12, "fp16": 835e12, "tf32": 418e12, "fp32": 60e12},
    "H100": {"bf16": 989e12, "fp16": 989e12, "tf32": 495e12, "fp32": 67e12},
    "H200": {"bf16": 989e12, "fp16": 989e12, "tf32": 495e12, "fp32": 67e12},
    "H800": {"bf16": 989e12, "fp16": 989e12, "tf32": 495e12, "fp32": 67e12},
    "GH200": {"bf16": 989e12, "fp16": 989e12, "tf32": 495e12, "fp32": 67e12},
    "B200": {"bf16": 2250e12, "fp16": 2250e12, "tf32": 1100e12, "fp32": 75e12},
    "A100": {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12},
    "A800": {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12},
    "A10G": {"bf16": 70e12, "fp16": 70e12, "tf32": 35e12, "fp32": 31.2e12},
    "A10": {"bf16": 125e12, "fp16": 125e12, "tf32": 62.5e12, "fp32": 31.2e12},
    "RTX 6000 Ada": {"bf16": 364e12, "fp16": 364e12, "tf32": 182e12, "fp32": 91.1e12},
    "A6000": {"bf16": 155e12, "fp16": 155e12, "tf32": 77.4e12, "fp32": 38.7e12},
    "L40S": {"bf16": 362e12, "fp16": 362e12, "tf32": 183e12, "fp32": 91.6e12},
    "L40": {"bf16": 181e12, "fp16": 181e12, "tf32": 90.5e12, "fp32": 90.5e12},
    "L4": {"bf16": 121e12, "fp16": 121e12, "tf32": 60e12, "fp32": 30.3e12},
    "4090": {"bf16": 165e12, "fp16": 165e12, "tf32": 82.6e12, "fp32": 82.6e12},
    "3090": {"bf16": 71e12, "fp16": 71e12, "tf32": 35.6e12, "fp32": 35.6e12},
    "V100": {"fp16": 125e12, "fp32": 15.7e12},
    "T4": {"fp16": 65e12, "fp32": 8.1e12},
}


def matmul_kind(device: torch.device, dtype: torch.dtype | None) -> str:
    """The arithmetic the training matmuls actually run in: the autocast dtype, else TF32 where CUDA allows
    it for fp32 matmuls (setup_backends turns it on), else plain fp32."""
    if dtype in (torch.bfloat16, torch.float16):
        return "bf16" if dtype == torch.bfloat16 else "fp16"
    if device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "fp32"


def table_peak_flops(device_name: str, kind: str) -> float | None:
    """The datasheet peak for this GPU name and matmul kind, or None when the table does not know it."""
    for key, peaks in GPU_PEAK_FLOPS.items():
        if key in device_name:
            return peaks.get(kind)
    return None


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
    """Peak FLOP/s to measure MFU against: GPTSMITH_PEAK_FLOPS if set, the table for known GPUs in the kind of
    matmul that runs (bf16, fp16, tf32, fp32), else a matmul benchmark in that dtype, cached on disk
    (delete ~/.cache/gptsmith/peak_flops.json to measure again)."""
    if os.environ.get("GPTSMITH_PEAK_FLOPS"):
        return float(os.environ["GPTSMITH_PEAK_FLOPS"])
    if device.type == "cuda":
        known = table_peak_flops(torch.cuda.get_device_name(device), matmul_kind(device, dtype))
        if known:
            return known
    kind = matmul_kind(device, dtype)
    dtype = dtype or torch.float32
    key = f"{device.type}|{kind}|{platform.processor() or platform.machine()}|{os.cpu_count()}|" \
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
        save_loss_plot(self.out_dir / "loss.png",
                       train=[(r["step"], r["train/loss"]) for r in self.records if "train/loss" in r],
                       val=[(r["step"], r["val/loss"]) for r in self.records if "val/loss" in r])

    def close(self) -> None:
        self.flush(plot_every_s=0)
        self.writer.close()


def save_loss_plot(path: str | os.PathLike, train: list[tuple[int, float]], val: list[tuple[int, float]],
                   ylabel: str = "loss (nats/token)", title: str | None = None) -> None:
    """loss.png of every trainer: train loss as a line, validation loss as dots, written atomically.
    Nothing is drawn (and no file written) before the first loss."""
    if not train and not val:
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train", linewidth=1)
    if val:
        # markers, joined only by a faint dotted line: evaluations are sparse (a short run may have only the
        # before and after points), and a solid line would draw a curve that was never measured
        ax.plot(*zip(*val), "o:", label="validation", linewidth=0.8, markersize=6)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(Path(path), buf.getvalue())
