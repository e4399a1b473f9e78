"""Pretraining: next-token prediction on the packed token shards written by `gptsmith prepare`.

    gptsmith pretrain --data work --out model --preset tiny --max-steps 2000
    torchrun --nproc_per_node 8 -m gptsmith.cli pretrain --data work --out model --preset gpt2-small

The model is a transformers LlamaForCausalLM, so OUT is a plain Hugging Face directory. Each micro-batch
is a set of random windows whose positions are a pure function of (seed, step, micro-batch index), so
resuming after a kill only needs the step number, and the ranks of a data-parallel run read different data.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from gptsmith.config import ProjectConfig, save_config
from gptsmith.errors import InputError
from gptsmith.files import read_json, sha256_file
from gptsmith.model import (build_model, count_params, flops_per_token, llama_config, resolve_shape,
                            save_model_dir)
from gptsmith.train.common import (Dist, MetricsLog, all_reduce_mean, autocast, autocast_dtype,
                                   dist_from_env, find_latest_checkpoint, init_distributed, load_checkpoint,
                                   lr_multiplier, param_groups, peak_flops, rng_state, save_checkpoint,
                                   seed_everything, select_device, set_rng_state, setup_backends, StopOnSigint)

MANIFEST_FORMAT = "gptsmith.tokens.v1"
SAMPLE_TOKENS = 48


# ---------------------------------------------------------------------------------------------- data

def read_manifest(data_dir: str | Path) -> dict:
    data_dir = Path(data_dir)
    path = data_dir / "tokens" / "manifest.json"
    if not data_dir.is_dir():
        raise InputError(f"{data_dir}: data directory not found; create it with "
                         f"`gptsmith prepare INPUTS --out {data_dir}`")
    if not path.is_file():
        raise InputError(f"{path}: not found, so {data_dir} is not a prepared WORKDIR; run "
                         f"`gptsmith prepare INPUTS --out {data_dir}` (or `gptsmith data tokenize {data_dir}`)")
    try:
        manifest = read_json(path)
    except ValueError as e:
        raise InputError(f"{path}: not valid JSON ({e}); re-run `gptsmith data tokenize {data_dir}`") from None
    if manifest.get("format") != MANIFEST_FORMAT:
        raise InputError(f"{path}: field 'format' is {manifest.get('format')!r}, expected '{MANIFEST_FORMAT}'; "
                         f"re-run `gptsmith data tokenize {data_dir}` with this gptsmith version")
    for key in ("dtype", "vocab_size", "splits"):
        if key not in manifest:
            raise InputError(f"{path}: missing field '{key}'; re-run `gptsmith data tokenize {data_dir}`")
    return manifest


@dataclass
class TokenShards:
    """One split's shards, memory-mapped: nothing is read until a window is asked for."""

    arrays: list[np.ndarray]
    tokens: int
    bytes: int
    name: str
    # number of valid window starts per shard and their running sum, for uniform sampling over all shards
    counts: np.ndarray | None = field(default=None, repr=False)
    cum: np.ndarray | None = field(default=None, repr=False)
    indexed_seq_len: int = field(default=0, repr=False)

    @classmethod
    def open(cls, data_dir: str | Path, manifest: dict, split: str) -> "TokenShards":
        tok_dir = Path(data_dir) / "tokens"
        info = manifest["splits"].get(split)
        if not info or not info.get("files"):
            raise InputError(f"{tok_dir / 'manifest.json'}: no '{split}' split; re-run `gptsmith prepare` "
                             f"(data.val_fraction must be > 0 for a validation split)")
        dtype = np.dtype(manifest["dtype"])
        arrays = []
        for name in info["files"]:
            path = tok_dir / name
            if not path.is_file():
                raise InputError(f"{path}: listed in manifest.json but missing; re-run `gptsmith data tokenize`")
            if path.stat().st_size % dtype.itemsize:
                raise InputError(f"{path}: size is not a multiple of {dtype.itemsize} bytes ({dtype}); "
                                 f"the file is truncated; re-run `gptsmith data tokenize`")
            if path.stat().st_size:
                arrays.append(np.memmap(path, dtype=dtype, mode="r"))
        tokens = sum(len(a) for a in arrays)
        return cls(arrays, tokens, int(info.get("bytes", 0)), split)

    def _index(self, seq_len: int) -> None:
        if self.counts is None or self.indexed_seq_len != seq_len:
            self.counts = np.array([max(0, len(a) - seq_len) for a in self.arrays], dtype=np.int64)
            self.cum = np.cumsum(self.counts)
            self.indexed_seq_len = seq_len
        if not len(self.cum) or self.cum[-1] == 0:
            raise InputError(f"the '{self.name}' split has no shard longer than seq_len + 1 = {seq_len + 1} tokens; "
                             f"lower --pretrain.seq_len or add data")

    def random_batch(self, seq_len: int, batch_size: int, rng: np.random.Generator) -> torch.Tensor:
        """batch_size windows of seq_len + 1 tokens, uniform over every valid start in every shard."""
        self._index(seq_len)
        idx = rng.integers(0, self.cum[-1], size=batch_size)
        shard = np.searchsorted(self.cum, idx, side="right")
        start = idx - (self.cum[shard] - self.counts[shard])
        rows = [self.arrays[s][o:o + seq_len + 1] for s, o in zip(shard, start)]
        return torch.from_numpy(np.stack(rows).astype(np.int64))

    def fixed_windows(self, seq_len: int, n: int) -> list[np.ndarray]:
        """The first n non-overlapping windows: the same validation tokens every time, for comparable losses."""
        out = []
        for a in self.arrays:
            for start in range(0, len(a) - seq_len, seq_len):
                if len(out) == n:
                    return out
                out.append(a[start:start + seq_len + 1])
        if not out:
            raise InputError(f"the '{self.name}' split has fewer than seq_len + 1 = {seq_len + 1} tokens in every "
                             f"shard; lower --pretrain.seq_len or give more validation data (data.val_fraction)")
        return out


def batch_rng(seed: int, step: int, micro: int) -> np.random.Generator:
    # `micro` is the global micro-batch index (rank * grad_accum + i): W ranks x A accumulation steps draw the
    # same data per optimizer step as 1 process with W*A accumulation steps.
    return np.random.default_rng([seed, step, micro])


def lm_loss(model, batch: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=batch[:, :-1], use_cache=False).logits
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), batch[:, 1:].reshape(-1))


# ---------------------------------------------------------------------------------------------- evaluation

@torch.no_grad()
def _evaluate(model, val: TokenShards, seq_len: int, batches: int, batch_size: int, device: torch.device,
              dtype: torch.dtype | None = None, dist: Dist | None = None) -> dict:
    dist = dist or Dist()
    windows = val.fixed_windows(seq_len, batches * batch_size)[dist.rank::dist.world_size]
    was_training = model.training
    model.eval()
    loss_sum, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        chunk = torch.from_numpy(np.stack(windows[i:i + batch_size]).astype(np.int64)).to(device)
        with autocast(device, dtype):
            loss = lm_loss(model, chunk)
        n = chunk.shape[0] * seq_len
        loss_sum += loss.item() * n
        count += n
    model.train(was_training)
    if dist.enabled:
        import torch.distributed as td
        t = torch.tensor([loss_sum, count], dtype=torch.float64, device=device)
        td.all_reduce(t)
        loss_sum, count = t.tolist()
    loss = loss_sum / max(count, 1)
    bpb = loss / math.log(2) * val.tokens / val.bytes if val.bytes else float("nan")
    return {"loss": loss, "bpb": bpb}


def evaluate(model, data_dir: str | Path, seq_len: int, batches: int, batch_size: int,
             device: str | torch.device = "cpu") -> dict:
    """Validation loss (nats/token) and bits-per-byte on fixed windows of WORKDIR's val split.

    Deterministic: the same first `batches * batch_size` windows every call, so two models (or one model
    before and after training) are compared on exactly the same tokens."""
    device = torch.device(device)
    val = TokenShards.open(data_dir, read_manifest(data_dir), "val")
    return _evaluate(model, val, seq_len, batches, batch_size, device, autocast_dtype(device))


@torch.no_grad()
def sample_text(model, tokenizer, prompt: str, device: torch.device, seed: int, max_new_tokens: int = SAMPLE_TOKENS) -> str:
    """A short sample to eyeball progress. Runs under fork_rng so it never changes the training RNG stream."""
    ids = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    ids += tokenizer.encode(prompt, add_special_tokens=False)
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        out = model.generate(torch.tensor([ids], device=device), max_new_tokens=max_new_tokens, do_sample=True,
                             temperature=0.8, top_k=50, top_p=1.0, eos_token_id=tokenizer.bos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
    model.train(was_training)
    return tokenizer.decode(out[0], skip_special_tokens=True)


# ---------------------------------------------------------------------------------------------- model

def _load_tokenizer(path: Path):
    from gptsmith.tokenizer import load_tokenizer
    if not path.is_dir():
        raise InputError(f"{path}: tokenizer directory not found; re-run `gptsmith prepare` "
                         f"(or `gptsmith tokenizer train`)")
    return load_tokenizer(path)


def _build(cfg: ProjectConfig, manifest: dict, data_dir: Path):
    """(model, tokenizer, parent) for a fresh model or for continued pretraining of cfg.pretrain.init_from."""
    from transformers import AutoModelForCausalLM

    pc = cfg.pretrain
    data_tok_dir = data_dir / manifest.get("tokenizer", "tokenizer")
    if pc.init_from:
        parent = pc.init_from
        if not Path(parent).exists() and "/" not in parent:
            raise InputError(f"pretrain.init_from: '{parent}' is neither a local directory nor a hub id")
        tokenizer = _load_tokenizer(Path(parent)) if Path(parent).is_dir() else None
        if tokenizer is None:
            from transformers import AutoTokenizer
            tokenizer = AutoTokenizer.from_pretrained(parent)
        model = AutoModelForCausalLM.from_pretrained(parent, dtype=torch.float32, attn_implementation="sdpa")
        model_vocab = model.get_input_embeddings().weight.shape[0]
        if manifest["vocab_size"] > model_vocab:
            raise InputError(f"{data_dir / 'tokens/manifest.json'}: vocab_size {manifest['vocab_size']} does not fit "
                             f"the model {parent} (vocabulary {model_vocab}); tokenize the data with the model's "
                             f"tokenizer: `gptsmith data tokenize {data_dir} --tokenizer {parent}`")
        if data_tok_dir.is_dir() and _load_tokenizer(data_tok_dir).get_vocab() != tokenizer.get_vocab():
            raise InputError(f"{data_dir}: the token shards were made with {data_tok_dir}, which is not the "
                             f"tokenizer of {parent}, so the ids would mean different text; re-tokenize: "
                             f"`gptsmith data tokenize {data_dir} --tokenizer {parent}`")
        return model, tokenizer, parent
    tokenizer = _load_tokenizer(data_tok_dir)
    vocab = max(len(tokenizer), int(manifest["vocab_size"]))
    try:
        shape = resolve_shape(cfg.model)
    except ValueError as e:
        raise InputError(str(e)) from None
    config = llama_config(shape, vocab, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    config._attn_implementation = "sdpa"  # F.scaled_dot_product_attention: flash kernels on CUDA
    return build_model(config, seed=pc.seed), tokenizer, None


# ---------------------------------------------------------------------------------------------- training

def pretrain(data_dir: str | Path, out_dir: str | Path, cfg: ProjectConfig, resume: bool = False) -> dict:
    """Train (or continue training) a causal LM on WORKDIR's token shards; write a HF model dir to OUT.

    Returns the final metrics: step, train_loss, val_loss, val_bpb, tokens_seen, tokens_per_s, mfu."""
    dist = dist_from_env()
    device = select_device(cfg.pretrain.device, dist.local_rank)
    init_distributed(dist, device)
    try:
        return _pretrain(Path(data_dir), Path(out_dir), cfg, resume, dist, device)
    finally:
        if dist.enabled:
            import torch.distributed as td
            if td.is_initialized():
                td.destroy_process_group()


def _pretrain(data_dir: Path, out_dir: Path, cfg: ProjectConfig, resume: bool, dist: Dist,
              device: torch.device) -> dict:
    pc = cfg.pretrain
    say = tqdm.write if dist.main else (lambda *a, **k: None)
    manifest = read_manifest(data_dir)
    train_data = TokenShards.open(data_dir, manifest, "train")
    val_data = TokenShards.open(data_dir, manifest, "val")

    seed_everything(pc.seed)
    model, tokenizer, parent = _build(cfg, manifest, data_dir)
    context = model.config.max_position_embeddings
    if pc.seq_len > context:
        raise InputError(f"pretrain.seq_len ({pc.seq_len}) is longer than the model's context ({context}); "
                         f"lower --pretrain.seq_len or raise --model.max_seq_len")

    ckpt_root = out_dir / "checkpoints"
    latest = find_latest_checkpoint(ckpt_root)
    if latest is not None and not resume:
        raise InputError(f"{out_dir} already holds checkpoints of a run (latest {latest.name}); pass --resume to "
                         f"continue it, or choose another --out")
    state = load_checkpoint(latest) if resume and latest is not None else None

    setup_backends(device)
    amp_dtype = autocast_dtype(device, pc.dtype)
    model.to(device)
    model.train()
    # the fused kernel: one pass over each tensor instead of ~10 (measured 4x faster per step on CPU too)
    optimizer = torch.optim.AdamW(param_groups(model, pc.weight_decay), lr=pc.lr, betas=(pc.beta1, pc.beta2),
                                  fused=device.type in ("cuda", "cpu"))
    # `plan["steps"]` is max_steps, or fewer when a time budget (max_minutes) is set: after a few timed steps
    # the budget is turned into a step count once, so the LR schedule decays to its end within the budget
    # and a resumed run follows the same schedule.
    plan = {"steps": pc.max_steps, "fixed": pc.max_minutes is None}
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(
        s, plan["steps"], pc.warmup_steps, pc.schedule, pc.min_lr_ratio, pc.decay_fraction))
    # float16 needs loss scaling or small gradients underflow to zero; with bf16/fp32 the scaler is a no-op
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    start_step, records = 0, []
    if state is not None:
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as e:
            raise InputError(f"{latest}: the checkpoint does not fit the configured model ({e}); resume with the "
                             f"model settings of {out_dir / 'gptsmith.yaml'}") from None
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        start_step, records = state["step"], state["metrics"]
        plan.update(state.get("plan", {}))
    elif resume:
        say(f"no complete checkpoint in {ckpt_root}; starting from step 0")

    compile_on = pc.compile == "on" or (pc.compile == "auto" and device.type == "cuda")
    raw_model = model
    fwd_model = torch.compile(model) if compile_on else model
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP
        train_model = DDP(fwd_model, device_ids=[device.index] if device.type == "cuda" else None)
    else:
        train_model = fwd_model

    tokens_per_micro = pc.batch_size * pc.seq_len
    tokens_per_step = tokens_per_micro * pc.grad_accum * dist.world_size
    fpt = flops_per_token(raw_model.config, pc.seq_len)
    peak = peak_flops(device, amp_dtype) if dist.main else float("nan")
    n_params = count_params(raw_model)
    log = MetricsLog(out_dir, records, purge_step=start_step + 1) if dist.main else None
    if dist.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir)
        say(f"model: {n_params / 1e6:.2f}M parameters ({count_params(raw_model, exclude_embeddings=True) / 1e6:.2f}M "
            f"without embeddings), {raw_model.config.num_hidden_layers} layers x {raw_model.config.hidden_size}, "
            f"vocab {raw_model.config.vocab_size}, context {context}" + (f", from {parent}" if parent else ""))
        say(f"data: {train_data.tokens:,} train / {val_data.tokens:,} val tokens from {data_dir}; "
            f"{tokens_per_step:,} tokens per step ({pc.batch_size} x {pc.seq_len} x {pc.grad_accum} accum x "
            f"{dist.world_size} procs); "
            + (f"as many steps as fit in {pc.max_minutes:g} min (at most {pc.max_steps})" if pc.max_minutes else
               f"{pc.max_steps} steps = {pc.max_steps * tokens_per_step / max(train_data.tokens, 1):.2f} epochs"))
        say(f"device: {device} ({dist.world_size} process{'es' if dist.enabled else ''}), "
            f"{'autocast ' + str(amp_dtype).replace('torch.', '') if amp_dtype else 'float32'}, "
            f"compile {'on' if compile_on else 'off'}; output: {out_dir} (checkpoints every {pc.save_every} steps, "
            f"TensorBoard: tensorboard --logdir {out_dir / 'logs'})")
        if start_step:
            say(f"resumed from {latest} at step {start_step}")

    def device_batch(step: int, micro: int) -> torch.Tensor:
        rng = batch_rng(pc.seed, step, dist.rank * pc.grad_accum + micro)
        batch = train_data.random_batch(pc.seq_len, pc.batch_size, rng)
        if device.type == "cuda":
            return batch.pin_memory().to(device, non_blocking=True)
        return batch.to(device)

    def checkpoint(step: int, metrics: dict) -> None:
        if dist.main:
            # a stop (time limit, Ctrl-C, resuming a finished run) right at a checkpoint step has the same
            # state: keep that checkpoint rather than replace it, which would briefly leave none on disk
            latest = find_latest_checkpoint(ckpt_root)
            if latest is None or latest.name != f"step_{step:06d}":
                save_checkpoint(ckpt_root, step, {
                    "step": step, "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng": rng_state(),
                    "metrics": log.records, "data_position": {"seed": pc.seed, "next_step": step},
                    "last": metrics, "plan": dict(plan),
                }, keep=pc.keep_checkpoints)
            log.flush()
        if dist.enabled:
            import torch.distributed as td
            td.barrier()

    def run_eval(step: int) -> dict:
        res = _evaluate(fwd_model, val_data, pc.seq_len, pc.eval_batches, pc.batch_size, device, amp_dtype, dist)
        if dist.main:
            log.log(step, **{"val/loss": res["loss"], "val/bpb": res["bpb"]})
            say(f"step {step}: val loss {res['loss']:.4f}, {res['bpb']:.4f} bits/byte")
        return res

    def sample(step: int) -> None:
        if dist.main:
            text = sample_text(raw_model, tokenizer, pc.sample_prompt, device, pc.seed)
            say(f"step {step} sample: {text!r}")
            log.log(step, sample=text)

    last = {"train_loss": float("nan"), "val_loss": float("nan"), "val_bpb": float("nan")}
    if state is not None:
        last.update(state.get("last", {}))
    log_every = max(1, min(10, pc.eval_every))
    window_loss, window_steps = torch.zeros((), device=device), 0
    t_start = t_window = time.perf_counter()
    steps_this_run, step, stop_reason = 0, start_step, "max_steps"
    mfu = tokens_per_s = float("nan")
    if state is None:  # the untrained model's score: the baseline every later number is read against
        last["val_bpb_before"] = run_eval(0)["bpb"]
    bar = tqdm(total=plan["steps"], initial=start_step, disable=not dist.main, unit="step", dynamic_ncols=True,
               desc="pretrain")
    calibration_steps = min(20, max(5, pc.max_steps // 50))
    t_calibrate = None
    with StopOnSigint() as sigint:
        while step < plan["steps"]:
            step_loss = torch.zeros((), device=device)
            for micro in range(pc.grad_accum):
                batch = device_batch(step, micro)
                # DDP all-reduces gradients on the last micro-batch only
                sync = train_model.no_sync() if dist.enabled and micro < pc.grad_accum - 1 else nullcontext()
                with sync:
                    with autocast(device, amp_dtype):
                        loss = lm_loss(train_model, batch) / pc.grad_accum
                    scaler.scale(loss).backward()
                step_loss += loss.detach()
            if pc.grad_clip:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(raw_model.parameters(), pc.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            steps_this_run += 1
            window_loss += step_loss
            window_steps += 1
            bar.update(1)
            if not plan["fixed"]:
                if steps_this_run == 1:  # the first step pays one-off costs (allocation, compilation); skip it
                    t_calibrate = time.perf_counter()
                elif steps_this_run == 1 + calibration_steps:
                    per_step = (time.perf_counter() - t_calibrate) / calibration_steps
                    # 8% headroom for what the timed steps did not include: evaluations, checkpoints, samples
                    left = pc.max_minutes * 60 - (time.perf_counter() - t_start)
                    steps = all_reduce_mean([float(step + int(0.92 * left / per_step))], dist, device)[0]
                    plan.update(steps=max(step + 1, min(pc.max_steps, int(steps))), fixed=True)
                    bar.total = plan["steps"]
                    say(f"time budget {pc.max_minutes:g} min at {per_step:.3f} s/step: training {plan['steps']} steps")

            if step % log_every == 0 or step == plan["steps"]:
                # .item() syncs with the GPU, so it is done once per window, not every step
                train_loss, step_loss_v = all_reduce_mean([(window_loss / window_steps).item(), step_loss.item()],
                                                          dist, device)
                now = time.perf_counter()
                tokens_per_s = window_steps * tokens_per_step / (now - t_window)
                mfu = fpt * tokens_per_s / dist.world_size / peak
                last["train_loss"] = step_loss_v
                if dist.main:
                    lr = scheduler.get_last_lr()[0]
                    log.log(step, **{"train/loss": train_loss, "train/lr": lr, "train/tokens_per_s": tokens_per_s,
                                     "train/mfu": mfu, "train/tokens": step * tokens_per_step})
                    bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{tokens_per_s:,.0f}", mfu=f"{mfu:.1%}",
                                    lr=f"{lr:.2e}", refresh=False)
                window_loss.zero_()
                window_steps, t_window = 0, now

            if step % pc.eval_every == 0 and step < plan["steps"]:
                res = run_eval(step)
                last.update(val_loss=res["loss"], val_bpb=res["bpb"])
            if pc.sample_every and step % pc.sample_every == 0:
                sample(step)
            if step % pc.save_every == 0 and step < plan["steps"]:
                checkpoint(step, last)
                if not pc.sample_every:
                    sample(step)
            out_of_time = pc.max_minutes is not None and time.perf_counter() - t_start > pc.max_minutes * 60
            if dist.enabled or out_of_time or sigint.requested:
                # every rank must leave the loop on the same step, or the next all-reduce hangs
                flags = all_reduce_mean([float(out_of_time), float(sigint.requested)], dist, device)
                if flags[1] > 0:
                    stop_reason = "interrupted"
                    break
                if flags[0] > 0:
                    stop_reason = f"max_minutes ({pc.max_minutes})"
                    break
    bar.close()
    if stop_reason == "max_steps" and plan["steps"] < pc.max_steps:
        stop_reason = f"time budget ({pc.max_minutes:g} min)"
    if stop_reason != "max_steps":
        say(f"stopping at step {step}: {stop_reason}")
    elapsed = time.perf_counter() - t_start
    if steps_this_run:
        tokens_per_s = steps_this_run * tokens_per_step / elapsed
        mfu = fpt * tokens_per_s / dist.world_size / peak
    last.update(tokens_per_s=tokens_per_s, mfu=mfu)
    metrics = _finish(step, run_eval, checkpoint, last, raw_model, tokenizer, out_dir, cfg, data_dir, parent, log,
                      dist, stop_reason, tokens_per_step)
    if stop_reason == "interrupted":
        raise KeyboardInterrupt  # the work is saved; the CLI exits with status 130 as for any Ctrl-C
    return metrics


def _finish(step, run_eval, checkpoint, last, raw_model, tokenizer, out_dir, cfg, data_dir, parent, log, dist,
            stop_reason, tokens_per_step) -> dict:
    res = run_eval(step)
    metrics = {"step": step, "train_loss": last.get("train_loss"), "val_loss": res["loss"], "val_bpb": res["bpb"],
               "tokens_seen": step * tokens_per_step, "tokens_per_s": last.get("tokens_per_s"),
               "mfu": last.get("mfu"), "stop_reason": stop_reason, "val_bpb_before": last.get("val_bpb_before")}
    if dist.enabled:
        metrics["ranks_in_sync"] = _ranks_in_sync(raw_model, dist)
    checkpoint(step, {**last, "val_loss": res["loss"], "val_bpb": res["bpb"]})
    if dist.main:
        manifest_path = data_dir / "tokens" / "manifest.json"
        lineage = {"stage": "pretrain", "parent_model": parent,
                   "data": {"workdir": str(data_dir.resolve()), "manifest": str(manifest_path.resolve()),
                            "manifest_sha256": sha256_file(manifest_path)},
                   "config": cfg.model_dump(mode="json"), "metrics": metrics}
        save_model_dir(raw_model, tokenizer, out_dir, lineage=lineage)
        save_config(cfg, out_dir)
        log.close()
        tqdm.write(f"saved {out_dir} at step {step}: val loss {res['loss']:.4f}, {res['bpb']:.4f} bits/byte")
    return metrics


def _ranks_in_sync(model, dist: Dist) -> bool:
    """DDP averages gradients, so every rank must end with identical weights; check it with a checksum."""
    import torch.distributed as td

    s = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().reshape(1)
    gathered = [torch.zeros_like(s) for _ in range(dist.world_size)]
    td.all_gather(gathered, s)
    return all(torch.equal(g, gathered[0]) for g in gathered) and bool(torch.isfinite(s).all())
