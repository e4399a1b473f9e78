"""Pretraining: next-token prediction on the packed token shards written by `gptsmith prepare`.

    gptsmith pretrain --data work --out model --preset tiny --max-steps 2000
    torchrun --nproc_per_node 8 -m gptsmith.cli pretrain --data work --out model --preset gpt2-small

A new model is a transformers LlamaForCausalLM; `--init-from DIR` continues any causal LM with its own
architecture and tokenizer. OUT is a plain Hugging Face directory. Each micro-batch is a set of random
windows whose positions are a pure function of (seed, step, micro-batch index), and the learning rate is a
pure function of the step and the saved schedule, so resuming after a kill only needs the checkpoint, and
the ranks of a data-parallel run read different data.

The code runs in three parts: `build_run` (model, optimizer, data, schedule, logging: a `PretrainRun`),
`train` (the loop, with the time budget's calibration as an explicit first phase) and `finish`.

A time budget (--minutes) is a step count planned from measured step times, re-planned every REPLAN_EVERY
steps from a moving average of them (train/budget.py), with the LR schedule stretched over each new count.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from gptsmith.config import ProjectConfig, load_config, save_config
from gptsmith.data.shards import TokenShards, read_manifest, separator_id
from gptsmith.device import select_device
from gptsmith.errors import InputError
from gptsmith.files import sha256_file
from gptsmith.model import (build_model, count_params, flops_per_token, llama_config, resolve_shape,
                            save_model_dir)
from gptsmith.train.budget import (CALIBRATION_SHARE, REPLAN_EVERY, StepSpeed, plan_time_budget, steps_at_speed,
                                   training_verdict)
from gptsmith.train.common import (Dist, LRSchedule, MetricsLog, StopOnSigint, all_reduce_mean, autocast,
                                   autocast_dtype, dist_from_env, find_latest_checkpoint, init_distributed,
                                   load_checkpoint, param_groups, peak_flops, rng_state, save_checkpoint,
                                   seed_everything, set_rng_state, setup_backends)

__all__ = ["pretrain", "evaluate", "read_manifest", "TokenShards", "batch_rng", "lm_loss", "sample_text"]

SAMPLE_TOKENS = 48
# What a resumed run may change: its length, where it runs and how it reports. Everything else (model shape,
# data order, optimizer, schedule) is the saved run's, or the resumed run would not continue the same training.
CHANGEABLE_ON_RESUME = frozenset({"max_steps", "max_minutes", "eval_every", "eval_batches", "save_every",
                                  "keep_checkpoints", "sample_every", "sample_prompt", "compile", "device", "dtype"})


def clock() -> float:
    """Seconds, for the time budget: a module function so a test can run the budget on a clock it controls."""
    return time.perf_counter()


def batch_rng(seed: int, step: int, micro: int) -> np.random.Generator:
    # `micro` is the global micro-batch index (rank * grad_accum + i): W ranks x A accumulation steps draw the
    # same data per optimizer step as 1 process with W*A accumulation steps.
    return np.random.default_rng([seed, step, micro])


def lm_loss(model, batch: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=batch[:, :-1], use_cache=False).logits
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), batch[:, 1:].reshape(-1))


# ---------------------------------------------------------------------------------------------- evaluation

@dataclass
class ValWindows:
    """The fixed validation windows this rank scores, and the UTF-8 bytes of their target tokens (the text
    the loss is measured on), so bits-per-byte is the loss of exactly these windows over exactly their bytes."""

    windows: list[np.ndarray]
    target_bytes: int

    @classmethod
    def take(cls, val: TokenShards, tokenizer, seq_len: int, n: int, dist: Dist | None = None) -> "ValWindows":
        dist = dist or Dist()
        windows = val.fixed_windows(seq_len, n)[dist.rank::dist.world_size]
        return cls(windows, sum(target_bytes(tokenizer, w) for w in windows))


def target_bytes(tokenizer, window: np.ndarray) -> int:
    """Bytes of the text that a window's targets (all tokens but the first) spell. Special tokens (the
    document separator) are not text and count 0 bytes, as in the manifest's byte counts."""
    text = tokenizer.decode(window[1:].tolist(), skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return len(text.encode("utf-8"))


@torch.no_grad()
def score(model, val: ValWindows, batch_size: int, device: torch.device, dtype: torch.dtype | None = None,
          dist: Dist | None = None) -> dict:
    """Mean loss (nats/token) and bits-per-byte over `val`'s windows, summed over every rank."""
    dist = dist or Dist()
    was_training = model.training
    model.eval()
    loss_sum, count = 0.0, 0
    for i in range(0, len(val.windows), batch_size):
        chunk = torch.from_numpy(np.stack(val.windows[i:i + batch_size]).astype(np.int64)).to(device)
        with autocast(device, dtype):
            loss = lm_loss(model, chunk)
        n = chunk.shape[0] * (chunk.shape[1] - 1)
        loss_sum += loss.item() * n
        count += n
    model.train(was_training)
    n_bytes = val.target_bytes
    if dist.enabled:
        import torch.distributed as td
        t = torch.tensor([loss_sum, count, n_bytes], dtype=torch.float64, device=device)
        td.all_reduce(t)
        loss_sum, count, n_bytes = t.tolist()
    bpb = loss_sum / math.log(2) / n_bytes if n_bytes else float("nan")
    return {"loss": loss_sum / max(count, 1), "bpb": bpb}


def evaluate(model, data_dir: str | Path, seq_len: int, batches: int, batch_size: int,
             device: str | torch.device = "cpu", tokenizer=None) -> dict:
    """Validation loss (nats/token) and bits-per-byte on fixed windows of WORKDIR's val split.

    Deterministic: the same first `batches * batch_size` windows every call, so two models (or one model
    before and after training) are compared on exactly the same tokens. `tokenizer` defaults to the one
    the shards were made with."""
    device = torch.device(device)
    manifest = read_manifest(data_dir)
    if tokenizer is None:
        tokenizer = _load_tokenizer(Path(data_dir) / manifest.get("tokenizer", "tokenizer"))
    val = ValWindows.take(TokenShards.open(data_dir, manifest, "val"), tokenizer, seq_len, batches * batch_size)
    return score(model, val, batch_size, device, autocast_dtype(device))


@torch.no_grad()
def sample_text(model, tokenizer, prompt: str, device: torch.device, seed: int, max_new_tokens: int = SAMPLE_TOKENS,
                separator: int | None = None) -> str:
    """A short sample to eyeball progress: a new document (separator, then the prompt) until the next
    separator. Runs under fork_rng so it never changes the training RNG stream."""
    separator = separator_id(tokenizer) if separator is None else separator
    ids = [separator] + tokenizer.encode(prompt, add_special_tokens=False)
    was_training = model.training
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else separator
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        out = model.generate(torch.tensor([ids], device=device), attention_mask=torch.ones(1, len(ids), device=device,
                             dtype=torch.long), max_new_tokens=max_new_tokens, do_sample=True, temperature=0.8,
                             top_k=50, top_p=1.0, eos_token_id=separator, pad_token_id=pad)
    model.train(was_training)
    return tokenizer.decode(out[0], skip_special_tokens=True)


# ---------------------------------------------------------------------------------------------- model

def _load_tokenizer(path: Path):
    from gptsmith.tokenizer import load_tokenizer
    if not path.is_dir():
        raise InputError(f"{path}: tokenizer directory not found; re-run `gptsmith prepare` "
                         f"(or `gptsmith tokenizer train`)")
    return load_tokenizer(path)


def _load_parent(parent: str, manifest: dict, data_dir: Path):
    """(model, tokenizer) of any causal LM to continue: its own architecture (Llama, GPT-2, ...) and tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not Path(parent).exists() and "/" not in parent:
        raise InputError(f"pretrain.init_from: '{parent}' is neither a local directory nor a hub id")
    tokenizer = _load_tokenizer(Path(parent)) if Path(parent).is_dir() else AutoTokenizer.from_pretrained(parent)
    model = AutoModelForCausalLM.from_pretrained(parent, dtype=torch.float32, attn_implementation="sdpa")
    model_vocab = model.get_input_embeddings().weight.shape[0]
    retokenize = f"`gptsmith data tokenize {data_dir} --tokenizer {parent}`"
    if manifest["vocab_size"] > model_vocab:
        raise InputError(f"{data_dir / 'tokens/manifest.json'}: vocab_size {manifest['vocab_size']} does not fit "
                         f"the model {parent} (vocabulary {model_vocab}); tokenize the data with the model's "
                         f"tokenizer: {retokenize}")
    data_tok_dir = data_dir / manifest.get("tokenizer", "tokenizer")
    if data_tok_dir.is_dir() and _load_tokenizer(data_tok_dir).get_vocab() != tokenizer.get_vocab():
        raise InputError(f"{data_dir}: the token shards were made with {data_tok_dir}, which is not the "
                         f"tokenizer of {parent}, so the ids would mean different text; re-tokenize: {retokenize}")
    return model, tokenizer


def build_model_and_tokenizer(cfg: ProjectConfig, manifest: dict, data_dir: Path):
    """(model, tokenizer) for a fresh Llama of cfg.model's shape, or for continued pretraining of init_from."""
    if cfg.pretrain.init_from:
        return _load_parent(cfg.pretrain.init_from, manifest, data_dir)
    tokenizer = _load_tokenizer(data_dir / manifest.get("tokenizer", "tokenizer"))
    vocab = max(len(tokenizer), int(manifest["vocab_size"]))
    try:
        shape = resolve_shape(cfg.model)
    except ValueError as e:
        raise InputError(str(e)) from None
    config = llama_config(shape, vocab, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    config._attn_implementation = "sdpa"  # F.scaled_dot_product_attention: flash kernels on CUDA
    return build_model(config, seed=cfg.pretrain.seed), tokenizer


# ---------------------------------------------------------------------------------------------- resume

def saved_run_config(state: dict, out_dir: Path) -> dict | None:
    """The config the checkpointed run trained with: in the checkpoint, else (older checkpoints) OUT's yaml."""
    if state.get("config"):
        return state["config"]
    path = out_dir / "gptsmith.yaml"
    return load_config(path).model_dump(mode="json") if path.is_file() else None


def _shape(model_section: dict) -> tuple:
    from gptsmith.config import ModelConfig
    try:
        return tuple(sorted(asdict(resolve_shape(ModelConfig.model_validate(model_section))).items()))
    except ValueError as e:
        raise InputError(f"model: {e}") from None


def config_for_resume(given: ProjectConfig, saved: dict, checkpoint: Path) -> tuple[ProjectConfig, dict]:
    """The resumed run's config: the saved run's model and pretrain settings, plus the settings given now
    that a resume may change (CHANGEABLE_ON_RESUME). A setting given explicitly (flag, override or config
    file) that would change the model's shape or the training is refused. Returns (config, changes)."""
    run = ProjectConfig.model_validate({**given.model_dump(mode="json"), "model": saved["model"],
                                        "pretrain": saved["pretrain"]})
    conflicts, changes = [], {}
    for key in sorted(given.pretrain.model_fields_set):
        new, old = getattr(given.pretrain, key), getattr(run.pretrain, key)
        if new == old:
            continue
        if key in CHANGEABLE_ON_RESUME:
            changes[key] = (old, new)
        else:
            conflicts.append(f"pretrain.{key} {new!r} (the run's: {old!r})")
    explicit_model = {k: getattr(given.model, k) for k in given.model.model_fields_set}
    if explicit_model and not run.pretrain.init_from:
        if _shape({**saved["model"], **explicit_model}) != _shape(saved["model"]):
            conflicts.append("model " + ", ".join(f"{k} {v!r} (the run's: {saved['model'].get(k)!r})"
                                                  for k, v in explicit_model.items()))
    if conflicts:
        raise InputError(
            f"{checkpoint}: --resume continues the run saved there, which was trained with other settings than "
            f"the ones given now: {'; '.join(conflicts)}. Drop those settings (a resume takes the model shape "
            f"and schedule from the checkpoint) or start a new run with another --out. A resume may change only "
            f"{', '.join(sorted(CHANGEABLE_ON_RESUME))}.")
    pretrain_cfg = run.pretrain.model_copy(update={k: new for k, (_, new) in changes.items()})
    return run.model_copy(update={"pretrain": pretrain_cfg}), changes


def resolve_config(out_dir: Path, cfg: ProjectConfig, resume: bool):
    """(config, checkpoint state or None, checkpoint path or None, changes) for this run."""
    latest = find_latest_checkpoint(out_dir / "checkpoints")
    if latest is not None and not resume:
        raise InputError(f"{out_dir} already holds checkpoints of a run (latest {latest.name}); pass --resume to "
                         f"continue it, choose another --out, or pass --overwrite to delete them")
    if latest is None:
        return cfg, None, None, {}
    state = load_checkpoint(latest)
    saved = saved_run_config(state, out_dir)
    if saved is None:
        return cfg, state, latest, {}
    cfg, changes = config_for_resume(cfg, saved, latest)
    return cfg, state, latest, changes


# ---------------------------------------------------------------------------------------------- the run

@dataclass
class PretrainRun:
    """Everything one pretraining process works with; `build_run` makes it, `train` and `finish` use it."""

    cfg: ProjectConfig
    data_dir: Path
    out_dir: Path
    dist: Dist
    device: torch.device
    amp_dtype: torch.dtype | None
    model: torch.nn.Module  # the plain model: weights, saving, sampling
    fwd_model: torch.nn.Module  # compiled (or not): evaluation
    train_model: torch.nn.Module  # fwd_model, wrapped in DDP when distributed
    tokenizer: object
    separator: int
    parent: str | None
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    train_data: TokenShards
    val: ValWindows
    schedule: LRSchedule
    log: MetricsLog | None
    tokens_per_step: int
    flops_per_token: float
    peak_flops: float
    step: int = 0
    start_step: int = 0
    # the time budget (--minutes): spent in earlier processes of this run, and whether it became a step count
    seconds_before: float = 0.0
    budget_planned: bool = False
    # the plan follows the measured speed unless the user fixed the step count (a resume with --max-steps)
    step_count_fixed: bool = False
    speed: StepSpeed | None = None
    steps_planned_at_start: int | None = None
    t_replan: float = 0.0
    step_replan: int = 0
    resumed_from: Path | None = None
    last: dict = field(default_factory=lambda: {"train_loss": float("nan"), "val_loss": float("nan"),
                                                 "val_bpb": float("nan")})
    t_start: float = 0.0
    window_loss: torch.Tensor | None = None
    window_steps: int = 0
    t_window: float = 0.0
    bar: object = None

    @property
    def pc(self):
        return self.cfg.pretrain

    def say(self, text: str) -> None:
        if self.dist.main:
            tqdm.write(text)

    def seconds_used(self) -> float:
        return self.seconds_before + clock() - self.t_start

    def out_of_time(self) -> bool:
        return self.pc.max_minutes is not None and self.seconds_used() > self.pc.max_minutes * 60

    @property
    def replanning(self) -> bool:
        return bool(self.pc.max_minutes) and self.budget_planned and not self.step_count_fixed


def new_schedule(pc) -> LRSchedule:
    return LRSchedule(pc.max_steps, pc.warmup_steps, pc.schedule, pc.min_lr_ratio, pc.decay_fraction)


def build_run(data_dir: Path, out_dir: Path, cfg: ProjectConfig, dist: Dist, device: torch.device,
              state: dict | None, latest: Path | None, changes: dict) -> PretrainRun:
    pc = cfg.pretrain
    manifest = read_manifest(data_dir)
    train_data = TokenShards.open(data_dir, manifest, "train")
    seed_everything(pc.seed)
    model, tokenizer = build_model_and_tokenizer(cfg, manifest, data_dir)
    context = model.config.max_position_embeddings
    if pc.seq_len > context:
        raise InputError(f"pretrain.seq_len ({pc.seq_len}) is longer than the model's context ({context}); "
                         f"lower --pretrain.seq_len or raise --model.max_seq_len")
    setup_backends(device)
    amp_dtype = autocast_dtype(device, pc.dtype)
    model.to(device).train()
    # the fused kernel: one pass over each tensor instead of ~10 (measured 4x faster per step on CPU too)
    optimizer = torch.optim.AdamW(param_groups(model, pc.weight_decay), lr=pc.lr, betas=(pc.beta1, pc.beta2),
                                  fused=device.type in ("cuda", "cpu"))
    # float16 needs loss scaling or small gradients underflow to zero; with bf16/fp32 the scaler is a no-op
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    fwd_model, train_model = _wrap(model, pc, dist, device)
    val = ValWindows.take(TokenShards.open(data_dir, manifest, "val"), tokenizer, pc.seq_len,
                          pc.eval_batches * pc.batch_size, dist)
    tokens_per_step = pc.batch_size * pc.seq_len * pc.grad_accum * dist.world_size
    run = PretrainRun(cfg, data_dir, out_dir, dist, device, amp_dtype, model, fwd_model, train_model, tokenizer,
                      _separator(manifest, tokenizer, data_dir), pc.init_from,
                      optimizer, scaler, train_data, val, new_schedule(pc), None, tokens_per_step,
                      flops_per_token(model, pc.seq_len), peak_flops(device, amp_dtype) if dist.main else float("nan"))
    run.budget_planned = pc.max_minutes is None
    if state is not None:
        restore(run, state, latest)
        apply_resume_changes(run, changes)
    if dist.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir)
        run.log = MetricsLog(out_dir, state["metrics"] if state else [], purge_step=run.step + 1)
        announce(run, context)
    return run


def _separator(manifest: dict, tokenizer, data_dir: Path) -> int:
    """The token the shards put before each document (older manifests may lack it: the tokenizer's)."""
    if manifest.get("bos_token_id") is not None:
        return int(manifest["bos_token_id"])
    return separator_id(tokenizer, data_dir)


def _wrap(model, pc, dist: Dist, device: torch.device):
    """(model for evaluation, model for training): compiled where it pays, wrapped in DDP when distributed."""
    compile_on = pc.compile == "on" or (pc.compile == "auto" and device.type == "cuda")
    fwd_model = torch.compile(model) if compile_on else model
    if not dist.enabled:
        return fwd_model, fwd_model
    from torch.nn.parallel import DistributedDataParallel as DDP
    return fwd_model, DDP(fwd_model, device_ids=[device.index] if device.type == "cuda" else None)


def restore(run: PretrainRun, state: dict, latest: Path) -> None:
    try:
        run.model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise InputError(f"{latest}: the checkpoint does not fit the model ({e}); resume with the model "
                         f"settings of {run.out_dir / 'gptsmith.yaml'}") from None
    run.optimizer.load_state_dict(state["optimizer"])
    if state.get("scaler"):
        run.scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    run.step = run.start_step = state["step"]
    run.last.update(state.get("last", {}))
    run.seconds_before = float(state.get("train_seconds", 0.0))
    run.budget_planned = bool(state.get("budget_planned", run.pc.max_minutes is None))
    run.step_count_fixed = bool(state.get("step_count_fixed", False))
    run.steps_planned_at_start = state.get("steps_planned_at_start")
    if state.get("speed"):
        run.speed = StepSpeed(**state["speed"])
    if state.get("schedule"):
        run.schedule = LRSchedule(**state["schedule"])
    elif state.get("plan"):  # checkpoints of gptsmith before the LRSchedule: {"steps": total, "fixed": planned}
        run.schedule = replace(run.schedule, total_steps=int(state["plan"]["steps"]))
        run.budget_planned = bool(state["plan"].get("fixed", True))
    run.resumed_from = latest


def apply_resume_changes(run: PretrainRun, changes: dict) -> None:
    """A new length on resume is honoured, and said. --max-steps: the LR schedule is re-planned for it
    (LRSchedule.with_total). --minutes alone: a new budget for the whole run's training time, calibrated
    again from here; with --max-steps too, the step count wins and the budget only stops the run."""
    if "max_steps" in changes:
        _new_max_steps(run, changes["max_steps"][1])
    elif "max_minutes" in changes:
        _new_time_budget(run, changes["max_minutes"][1])


def _new_max_steps(run: PretrainRun, new: int) -> None:
    if new < run.step:
        raise InputError(f"{run.resumed_from}: the run is already at step {run.step}, so --max-steps {new} cannot "
                         f"be honoured; pass a count of at least {run.step}")
    before = run.schedule
    run.schedule = before.with_total(run.step, new)
    run.budget_planned = True  # the user's step count replaces any time-budget plan; the budget still stops it
    run.step_count_fixed = True
    how = ("the LR schedule is the one a run planned for that many steps has" if run.schedule.rebase_multiplier is None
           else f"the LR continues from its current {run.schedule.multiplier(run.step) * run.pc.lr:.3g} and decays to "
                f"its end on step {new}")
    run.say(f"resuming at step {run.step} with max_steps {new} (the run was planned for {before.total_steps}): "
            f"training to step {new}; {how}")


def _new_time_budget(run: PretrainRun, minutes: float | None) -> None:
    # the calibration plans from max_steps down, so the schedule first spans max_steps again
    run.schedule = run.schedule.with_total(run.step, run.pc.max_steps)
    run.budget_planned = minutes is None
    run.step_count_fixed = False
    used = run.seconds_before / 60
    run.say(f"resuming at step {run.step} with " + (f"a time budget of {minutes:g} min for the whole run ({used:.1f} "
            f"min used): the step count is planned again" if minutes else f"no time budget: training to step "
            f"{run.pc.max_steps}"))


def announce(run: PretrainRun, context: int) -> None:
    pc, m = run.pc, run.model
    run.say(f"model: {count_params(m) / 1e6:.2f}M parameters ({count_params(m, exclude_embeddings=True) / 1e6:.2f}M "
            f"without embeddings), {m.config.num_hidden_layers} layers x {m.config.hidden_size}, vocab "
            f"{m.get_input_embeddings().weight.shape[0]}, context {context}"
            + (f", {type(m).__name__} from {run.parent}" if run.parent else ""))
    length = (f"as many steps as fit in {pc.max_minutes:g} min (at most {pc.max_steps})"
              if pc.max_minutes and not run.budget_planned else
              f"{run.schedule.total_steps} steps = "
              f"{run.schedule.total_steps * run.tokens_per_step / max(run.train_data.tokens, 1):.2f} epochs")
    run.say(f"data: {run.train_data.tokens:,} train tokens from {run.data_dir}; {run.tokens_per_step:,} tokens per "
            f"step ({pc.batch_size} x {pc.seq_len} x {pc.grad_accum} accum x {run.dist.world_size} procs); {length}")
    amp = "autocast " + str(run.amp_dtype).replace("torch.", "") if run.amp_dtype else "float32"
    run.say(f"device: {run.device} ({run.dist.world_size} process{'es' if run.dist.enabled else ''}), {amp}, "
            f"compile {'on' if run.fwd_model is not run.model else 'off'}; output: {run.out_dir} (checkpoints every "
            f"{pc.save_every} steps, TensorBoard: tensorboard --logdir {run.out_dir / 'logs'})")
    if run.resumed_from:
        run.say(f"resumed from {run.resumed_from} at step {run.step}")


# ---------------------------------------------------------------------------------------------- training

def device_batch(run: PretrainRun, micro: int) -> torch.Tensor:
    pc = run.pc
    rng = batch_rng(pc.seed, run.step, run.dist.rank * pc.grad_accum + micro)
    batch = run.train_data.random_batch(pc.seq_len, pc.batch_size, rng)
    if run.device.type == "cuda":
        return batch.pin_memory().to(run.device, non_blocking=True)
    return batch.to(run.device)


def train_step(run: PretrainRun) -> torch.Tensor:
    """One optimizer step at the schedule's LR for this step; returns the step's loss (on the device)."""
    pc = run.pc
    for group in run.optimizer.param_groups:
        group["lr"] = pc.lr * run.schedule.multiplier(run.step)
    step_loss = torch.zeros((), device=run.device)
    for micro in range(pc.grad_accum):
        batch = device_batch(run, micro)
        # DDP all-reduces gradients on the last micro-batch only
        sync = run.train_model.no_sync() if run.dist.enabled and micro < pc.grad_accum - 1 else nullcontext()
        with sync:
            with autocast(run.device, run.amp_dtype):
                loss = lm_loss(run.train_model, batch) / pc.grad_accum
            run.scaler.scale(loss).backward()
        step_loss += loss.detach()
    if pc.grad_clip:
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), pc.grad_clip)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    return step_loss


def log_window(run: PretrainRun, step_loss: torch.Tensor) -> None:
    """Train loss, LR, tokens/s and MFU over the steps since the last log line."""
    # .item() syncs with the GPU, so it is done once per window, not every step
    train_loss, step_loss_v = all_reduce_mean([(run.window_loss / run.window_steps).item(), step_loss.item()],
                                              run.dist, run.device)
    now = time.perf_counter()
    tokens_per_s = run.window_steps * run.tokens_per_step / (now - run.t_window)
    mfu = run.flops_per_token * tokens_per_s / run.dist.world_size / run.peak_flops
    run.last["train_loss"] = step_loss_v
    if run.dist.main:
        lr = run.pc.lr * run.schedule.multiplier(run.step)  # the LR the next step trains at
        run.log.log(run.step, **{"train/loss": train_loss, "train/lr": lr, "train/tokens_per_s": tokens_per_s,
                                 "train/mfu": mfu, "train/tokens": run.step * run.tokens_per_step})
        run.bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{tokens_per_s:,.0f}", mfu=f"{mfu:.1%}",
                            lr=f"{lr:.2e}", refresh=False)
    run.window_loss.zero_()
    run.window_steps, run.t_window = 0, now


def after_step(run: PretrainRun, step_loss: torch.Tensor) -> None:
    """Logging, evaluation, samples and checkpoints due at this step."""
    pc, step, total = run.pc, run.step, run.schedule.total_steps
    run.window_loss += step_loss
    run.window_steps += 1
    run.bar.update(1)
    if step % max(1, min(10, pc.eval_every)) == 0 or step == total:
        log_window(run, step_loss)
    if step % pc.eval_every == 0 and step < total:
        res = run_eval(run)
        run.last.update(val_loss=res["loss"], val_bpb=res["bpb"])
    if pc.sample_every and step % pc.sample_every == 0:
        sample(run)
    if step % pc.save_every == 0 and step < total:
        checkpoint(run)
        if not pc.sample_every:
            sample(run)


def stop_requested(run: PretrainRun, sigint) -> str | None:
    """Why to stop before the next step (Ctrl-C, the time budget spent), agreed by every rank."""
    out_of_time = run.out_of_time()
    if not (run.dist.enabled or out_of_time or sigint.requested):
        return None
    # every rank must leave the loop on the same step, or the next all-reduce hangs
    flags = all_reduce_mean([float(out_of_time), float(sigint.requested)], run.dist, run.device)
    if flags[1] > 0:
        return "interrupted"
    if flags[0] > 0:
        return f"max_minutes ({run.pc.max_minutes:g})"
    return None


def train_until(run: PretrainRun, total: int | None, sigint) -> str | None:
    """Train up to step `total` (None: to the schedule's end, which a time budget's re-plans move); returns why
    it stopped early, or None."""
    while run.step < (run.schedule.total_steps if total is None else total):
        reason = stop_requested(run, sigint)
        if reason:
            return reason
        after_step(run, train_step(run))
        if run.replanning and run.step - run.step_replan >= REPLAN_EVERY:
            replan(run)
    return None


def replan(run: PretrainRun) -> None:
    """Measure the steps since the last re-plan (evaluations and checkpoints included: they recur), fold them
    into the speed estimate and plan the step count again from the budget that is left; the LR schedule is
    stretched over the new count. Every rank plans the same count (the mean of theirs)."""
    now = clock()
    measured = (now - run.t_replan) / (run.step - run.step_replan)
    if run.speed is None:  # a checkpoint of a gptsmith that planned once and kept no speed
        run.speed = StepSpeed.first(measured)
    run.speed.update(measured)
    run.t_replan, run.step_replan = now, run.step
    left = run.pc.max_minutes * 60 - run.seconds_used()
    total = plan_time_budget(step=run.step, seconds_per_step=run.speed.ema, seconds_left=left,
                             max_steps=run.pc.max_steps)
    total = max(run.step, int(all_reduce_mean([float(total)], run.dist, run.device)[0]))
    old = run.schedule.total_steps
    # a change of a step or two is noise: keeping the schedule keeps the LR curve calm
    if total != old and abs(total - old) >= max(2, 0.02 * old):
        run.schedule = run.schedule.stretched(run.step, total)
        run.bar.total = total
        run.bar.refresh()


def calibrate_time_budget(run: PretrainRun, sigint) -> str | None:
    """The explicit first phase of a --minutes run: time a few steps, then turn the budget into a step count,
    so the LR schedule decays to its end within the budget; `replan` revises it as training goes. The plan and
    the speed estimate are saved in every checkpoint after this, so a resumed run goes on from them and never
    calibrates again."""
    pc = run.pc
    # the first step pays one-off costs (allocation, compilation); it is not timed
    reason = train_until(run, min(run.schedule.total_steps, run.step + 1), sigint)
    timed_from, t0 = run.step, clock()
    end = min(run.schedule.total_steps, run.step + min(20, max(5, pc.max_steps // 50)))
    while not reason and run.step < end:
        reason = train_until(run, run.step + 1, sigint)
        # on a busy machine 20 slow steps can eat the whole budget before any plan exists: a few timed steps
        # are enough, the re-plans correct the estimate as training goes (every rank stops timing together)
        late = clock() - t0 > CALIBRATION_SHARE * pc.max_minutes * 60
        if run.step - timed_from >= 2 and all_reduce_mean([float(late)], run.dist, run.device)[0] > 0:
            break
    if reason or run.step == timed_from or run.step >= run.schedule.total_steps:
        return reason
    now = clock()
    per_step = (now - t0) / (run.step - timed_from)
    left = pc.max_minutes * 60 - run.seconds_used()
    total = plan_time_budget(step=run.step, seconds_per_step=per_step, seconds_left=left, max_steps=pc.max_steps)
    total = max(run.step, int(all_reduce_mean([float(total)], run.dist, run.device)[0]))
    warmup = min(run.schedule.warmup_steps, max(run.step, total // 4))
    if warmup < run.schedule.warmup_steps:
        # a budget that buys fewer steps than the warmup would train its whole run below the peak LR: the warmup
        # becomes at most a quarter of the plan (what a run planned for this count from the start would use)
        run.say(f"warmup shortened from {run.schedule.warmup_steps} to {warmup} steps to fit the plan")
        run.schedule = replace(run.schedule, warmup_steps=warmup)
    run.schedule = run.schedule.with_total(run.step, total)
    run.budget_planned = True
    run.speed = StepSpeed.first(per_step)
    run.steps_planned_at_start = total
    run.t_replan, run.step_replan = now, run.step
    run.bar.total = total
    run.say(f"time budget {pc.max_minutes:g} min at {per_step:.3f} s/step: planning {total} steps (re-planned "
            f"every {REPLAN_EVERY} steps from the measured speed)")
    return None


def train(run: PretrainRun) -> str:
    """The training loop; returns the stop reason."""
    if run.resumed_from is None:  # the untrained model's score: the baseline every later number is read against
        run.last["val_bpb_before"] = run_eval(run)["bpb"]
    run.window_loss, run.window_steps = torch.zeros((), device=run.device), 0
    run.t_start = clock()
    run.t_window = time.perf_counter()
    run.t_replan, run.step_replan = run.t_start, run.step
    run.bar = tqdm(total=run.schedule.total_steps, initial=run.step, disable=not run.dist.main, unit="step",
                   dynamic_ncols=True, desc="pretrain")
    with StopOnSigint() as sigint:
        reason = None
        if not run.budget_planned:
            reason = calibrate_time_budget(run, sigint)
        reason = reason or train_until(run, None, sigint)
    run.bar.close()
    if reason is None and run.schedule.total_steps < run.pc.max_steps and run.pc.max_minutes:
        reason = f"time budget ({run.pc.max_minutes:g} min)"
    if reason:
        run.say(f"stopping at step {run.step}: {reason}")
    return reason or "max_steps"


# ---------------------------------------------------------------------------------------------- reporting

def run_eval(run: PretrainRun) -> dict:
    res = score(run.fwd_model, run.val, run.pc.batch_size, run.device, run.amp_dtype, run.dist)
    if run.dist.main:
        run.log.log(run.step, **{"val/loss": res["loss"], "val/bpb": res["bpb"]})
        run.say(f"step {run.step}: val loss {res['loss']:.4f}, {res['bpb']:.4f} bits/byte")
    return res


def sample(run: PretrainRun) -> None:
    if run.dist.main:
        text = sample_text(run.model, run.tokenizer, run.pc.sample_prompt, run.device, run.pc.seed,
                           separator=run.separator)
        run.say(f"step {run.step} sample: {text!r}")
        run.log.log(run.step, sample=text)


def checkpoint(run: PretrainRun) -> None:
    """Everything a resume needs, including the run's config and LR schedule, written atomically."""
    if run.dist.main:
        root = run.out_dir / "checkpoints"
        # a stop (time limit, Ctrl-C, resuming a finished run) right at a checkpoint step has the same
        # state: keep that checkpoint rather than replace it, which would briefly leave none on disk
        latest = find_latest_checkpoint(root)
        if latest is None or latest.name != f"step_{run.step:06d}":
            save_checkpoint(root, run.step, {
                "step": run.step, "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
                "scaler": run.scaler.state_dict(), "rng": rng_state(), "metrics": run.log.records,
                "data_position": {"seed": run.pc.seed, "next_step": run.step}, "last": dict(run.last),
                "schedule": asdict(run.schedule), "budget_planned": run.budget_planned,
                "step_count_fixed": run.step_count_fixed, "steps_planned_at_start": run.steps_planned_at_start,
                "speed": asdict(run.speed) if run.speed else None,
                "train_seconds": run.seconds_used(), "config": run.cfg.model_dump(mode="json"),
            }, keep=run.pc.keep_checkpoints)
        run.log.flush()
    if run.dist.enabled:
        import torch.distributed as td
        td.barrier()


def finish(run: PretrainRun, stop_reason: str) -> dict:
    """Final evaluation, checkpoint and model directory (with its lineage); returns the final metrics."""
    steps_this_run = run.step - run.start_step
    if steps_this_run:
        tokens_per_s = steps_this_run * run.tokens_per_step / max(clock() - run.t_start, 1e-9)
        run.last.update(tokens_per_s=tokens_per_s,
                        mfu=run.flops_per_token * tokens_per_s / run.dist.world_size / run.peak_flops)
    res = run_eval(run)
    run.last.update(val_loss=res["loss"], val_bpb=res["bpb"])
    metrics = {"step": run.step, "train_loss": run.last.get("train_loss"), "val_loss": res["loss"],
               "val_bpb": res["bpb"], "tokens_seen": run.step * run.tokens_per_step,
               "tokens_per_s": run.last.get("tokens_per_s"), "mfu": run.last.get("mfu"), "stop_reason": stop_reason,
               "val_bpb_before": run.last.get("val_bpb_before"), "planned_steps": run.schedule.total_steps,
               **what_the_run_bought(run)}
    metrics["verdict"] = training_verdict(metrics)  # the run's own yardstick; the quickstart adds its own figure
    if run.dist.enabled:
        metrics["ranks_in_sync"] = _ranks_in_sync(run.model, run.dist)
    checkpoint(run)
    if run.dist.main:
        manifest_path = run.data_dir / "tokens" / "manifest.json"
        lineage = {"stage": "pretrain", "parent_model": run.parent,
                   "data": {"workdir": str(run.data_dir.resolve()), "manifest": str(manifest_path.resolve()),
                            "manifest_sha256": sha256_file(manifest_path)},
                   "config": run.cfg.model_dump(mode="json"), "metrics": metrics}
        save_model_dir(run.model, run.tokenizer, run.out_dir, lineage=lineage)
        run.log.close()
        tqdm.write(f"saved {run.out_dir} at step {run.step}: val loss {res['loss']:.4f}, {res['bpb']:.4f} bits/byte")
        from gptsmith.eval.report import report_after_training
        report_after_training(run.out_dir, device=str(run.device))
    return metrics


def what_the_run_bought(run: PretrainRun) -> dict:
    """The numbers training_verdict (train/budget.py) reads: steps done against the plan at the start, the
    final plan, and (under a time budget) what the budget buys at the fastest speed this run measured."""
    pc = run.pc
    # a budget spent before its plan was made (a very slow machine) planned nothing: no count to compare with
    planned = run.schedule.total_steps if run.budget_planned else None
    bought = {"steps_done": run.step, "steps_planned": planned,
              "steps_planned_at_start": run.steps_planned_at_start or (None if pc.max_minutes else pc.max_steps)}
    speed = run.speed
    if pc.max_minutes and speed is None and run.step > run.start_step:
        speed = StepSpeed.first((clock() - run.t_start) / (run.step - run.start_step))
    if pc.max_minutes and speed:
        bought.update(seconds_per_step=round(speed.ema, 4), best_seconds_per_step=round(speed.best, 4),
                      steps_at_best_speed=steps_at_speed(pc.max_minutes * 60, speed.best, pc.max_steps))
    return bought


def _ranks_in_sync(model, dist: Dist) -> bool:
    """DDP averages gradients, so every rank must end with identical weights; check it with a checksum."""
    import torch.distributed as td

    s = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().reshape(1)
    gathered = [torch.zeros_like(s) for _ in range(dist.world_size)]
    td.all_gather(gathered, s)
    return all(torch.equal(g, gathered[0]) for g in gathered) and bool(torch.isfinite(s).all())


# ---------------------------------------------------------------------------------------------- entry point

def pretrain(data_dir: str | Path, out_dir: str | Path, cfg: ProjectConfig, resume: bool = False) -> dict:
    """Train (or continue training) a causal LM on WORKDIR's token shards; write a HF model dir to OUT.

    With `resume`, the run continues from OUT's latest checkpoint with the run's saved config (model shape,
    data order, optimizer, LR schedule, time-budget plan); only the settings in CHANGEABLE_ON_RESUME may be
    given anew. Returns the final metrics: step, train_loss, val_loss, val_bpb, tokens_seen, tokens_per_s, mfu."""
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    dist = dist_from_env()
    cfg, state, latest, changes = resolve_config(out_dir, cfg, resume)
    if resume and latest is None and dist.main:
        tqdm.write(f"no complete checkpoint in {out_dir / 'checkpoints'}; starting from step 0")
    device = select_device(cfg.pretrain.device, dist.local_rank, setting="pretrain.device")
    init_distributed(dist, device)
    try:
        run = build_run(data_dir, out_dir, cfg, dist, device, state, latest, changes)
        del state  # the run holds what it needs; free the checkpoint's copy of the weights
        stop_reason = train(run)
        metrics = finish(run, stop_reason)
    finally:
        if dist.enabled:
            import torch.distributed as td
            if td.is_initialized():
                td.destroy_process_group()
    if stop_reason == "interrupted":
        raise KeyboardInterrupt  # the work is saved; the CLI exits with status 130 as for any Ctrl-C
    return metrics
