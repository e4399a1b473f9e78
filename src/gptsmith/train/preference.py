"""What `gptsmith dpo` and `gptsmith kto` share: one run from preference data to a tuned model directory.

TRL's DPOTrainer / KTOTrainer do the optimisation, the reference model (the starting model; with LoRA the same
weights with the adapter disabled, no second copy; or reference log-probs computed once before training with
`precompute_ref`), evaluation, checkpoints and exact resume. What is ours, as for sft (train/tuning.py holds the
parts all three share): reading the formats `gptsmith feedback export` and public datasets use, with file:line
errors; tokenising through the chat template with message text kept text; CPU-sane precision; the
prompt-level validation split; metrics.jsonl, TensorBoard and a PNG of the reward curves; lineage; atomic output.

Each method file (dpo.py, kto.py) gives a `Method`: its config section, how an example becomes token ids, and its
TRL trainer.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from gptsmith.config import ProjectConfig, save_config
from gptsmith.data.preference_formats import load_preferences, split_preferences
from gptsmith.errors import InputError
from gptsmith.files import atomic_write_json
from gptsmith.tokenizer import encode_chat
from gptsmith.train.tuning import (MetricsTrail, StopAfterMinutes, file_identity, load_model, lora_config,
                                   trainer_args, prepare_chat_template, resolve_device, save_curves_plot,
                                   save_trained, start_run)


@dataclass
class Method:
    name: str                                   # "dpo" | "kto": the command, the config section, the lineage method
    title: str                                  # the plot's title
    tokenize: Callable[[object, dict], dict]    # (tokenizer, example) -> the token-id row the trainer takes
    make_trainer: Callable[..., object]         # (model, args: dict, train_ds, val_ds, tokenizer, peft_config, callbacks, section)
    panels: list[tuple[str, list[str]]]         # what the PNG shows: (y label, logged metric names)
    val_metrics: Callable[..., dict] | None = None  # (model, val_rows, batch_size) -> extra validation figures

    def section(self, cfg: ProjectConfig):
        return getattr(cfg, self.name)


def prompt_and_answer_ids(tokenizer, prompt: list[dict], answer: list[dict]) -> tuple[list[int], list[int]]:
    """The prompt's tokens (ending with the template's generation prompt) and the answer's, through the chat
    template with message text kept text (tokenizer.encode_chat: a user who typed "<|end|>" trains no control
    token). Where the template renders the prompt alone differently from the prompt followed by an answer, the
    answer starts where the two diverge, as TRL splits them."""
    prompt_ids = encode_chat(tokenizer, prompt, add_generation_prompt=True).input_ids
    full_ids = encode_chat(tokenizer, prompt + answer).input_ids
    n = 0
    while n < min(len(prompt_ids), len(full_ids)) and prompt_ids[n] == full_ids[n]:
        n += 1
    return full_ids[:n], full_ids[n:]


def tokenized(method: Method, tokenizer, examples: list[dict], max_length: int, what: str):
    """The datasets' rows; examples whose prompt alone fills max_length (no answer token would be left to score)
    are dropped and counted, as TRL drops them."""
    from datasets import Dataset

    rows = [method.tokenize(tokenizer, ex) for ex in examples]
    kept = [r for r in rows if len(r["prompt_ids"]) < max_length]
    if rows and not kept:
        raise InputError(f"every {what} prompt is {max_length} tokens or longer, leaving no answer to train on; "
                         f"raise --{method.name}.max_length")
    return (Dataset.from_list(kept) if kept else None), len(rows) - len(kept)


def build_trainer(method: Method, model_id: str, train: list[dict], val: list[dict], out: Path, cfg: ProjectConfig,
                  callbacks: list | None = None):
    """The TRL trainer for this run: model loaded, chat template ready, data tokenised, reference model settled."""
    s = method.section(cfg)
    device = resolve_device(s.device, setting=f"{method.name}.device")
    model, tokenizer = load_model(model_id, device, qlora=s.qlora)
    # lora=True: a model without a chat template gets the plain-text one, never new tokens (see its docstring)
    info = prepare_chat_template(model, tokenizer, lora=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    train_ds, dropped = tokenized(method, tokenizer, train, s.max_length, "training")
    val_ds, val_dropped = tokenized(method, tokenizer, val, s.max_length, "validation") if val else (None, 0)
    info.update(dropped_long_prompts=dropped + val_dropped)
    if s.qlora:
        from peft import prepare_model_for_kbit_training
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=s.gradient_checkpointing)
    args = dict(trainer_args(s, out, device, val_ds is not None),
                max_length=s.max_length, beta=s.beta, loss_type=s.loss_type, precompute_ref_log_probs=s.precompute_ref)
    if s.max_minutes is not None:
        callbacks = [*(callbacks or []), StopAfterMinutes(s.max_minutes, stage=method.name)]
    peft_config = lora_config(s) if s.lora or s.qlora else None
    trainer = method.make_trainer(model, args, train_ds, val_ds, tokenizer, peft_config, callbacks, s)
    info["reference"] = reference_kind(trainer, s)
    return trainer, info


def reference_kind(trainer, s) -> str:
    """What the run compares against, in words, from what TRL actually holds."""
    if s.precompute_ref:
        return "precomputed log-probs of the starting model (no reference model in memory while training)"
    if trainer.ref_model is None:
        return "the starting model = this model with the LoRA adapter disabled (no second copy)"
    return "a frozen copy of the starting model"


@torch.no_grad()
def completion_logps(model, rows: list[dict], answer_key: str, batch_size: int = 8) -> list[float]:
    """log p(answer | prompt) of each row (prompt_ids + rows[answer_key]) under `model`, summed over the answer's
    tokens: the quantity DPO moves apart for chosen and rejected answers."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(rows), batch_size):
        batch = rows[i: i + batch_size]
        seqs = [r["prompt_ids"] + r[answer_key] for r in batch]
        width = max(map(len, seqs))
        ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs], device=device)
        att = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=device)
        logp = model(input_ids=ids, attention_mask=att).logits[:, :-1].float().log_softmax(-1)
        token_lp = logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        for j, r in enumerate(batch):
            start, end = len(r["prompt_ids"]) - 1, len(seqs[j]) - 1  # position t predicts token t + 1
            out.append(token_lp[j, start:end].sum().item())
    model.train(was_training)
    return out


def _trainable(model) -> tuple[int, int]:
    return (sum(p.numel() for p in model.parameters() if p.requires_grad), sum(p.numel() for p in model.parameters()))


def load_split(data, val, fmt: str, s, on_error: str, model_id: str):
    """What dpo, kto and reward train and validate on: `data` read in `fmt` ("dpo" pairs or "kto"), the
    validation examples from `val` or a content-hash share (s.val_fraction) of `data`'s prompts, the training
    examples shuffled once by s.seed, and the run's identity (parent model, data files with hashes) that a resume
    must match. Returns (loaded, train, held, identity)."""
    loaded = load_preferences(data, fmt, on_error=on_error)
    if val is not None:
        train, held = loaded.examples, load_preferences(val, fmt, on_error=on_error).examples
    else:
        train, held = split_preferences(loaded.examples, s.val_fraction)
    # sequential samplers (KTO's) would otherwise see the file's order: shuffle once, by the seed (resume-safe)
    random.Random(s.seed).shuffle(train)
    identity = {"parent_model": model_id, "data": file_identity(data),
                **({"val_data": file_identity(val)} if val is not None else {})}
    return loaded, train, held, identity


def run(method: Method, model: str, data, out, cfg: ProjectConfig, resume: bool = False, val=None) -> dict:
    """Tune `model` (HF dir or hub id) on the preference file `data` (validation: `val`, else a content-hash split of
    `data`); write OUT (a HF model dir, or a LoRA adapter dir); return the metrics."""
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    name, s = method.name, method.section(cfg)
    out = Path(out)
    model_id = str(Path(model).resolve()) if Path(model).is_dir() else str(model)
    loaded, train, held, identity = load_split(data, val, name, s, cfg.data.on_error, model_id)
    print(f"{name}: {len(train)} train / {len(held)} validation examples ({loaded.format}; skipped {loaded.skipped}"
          + (f": {dict(loaded.problems)}" if loaded.problems else "") + f") from {data}"
          + (f", validation from {val}" if val is not None else ""))

    ckpt = start_run(out, identity, resume, f"{name}_run.json", name)
    save_config(cfg, out)
    writer = SummaryWriter(str(out / "runs"))
    plot = lambda history, path: save_curves_plot(history, path, method.panels, method.title)  # noqa: E731
    trainer, info = build_trainer(method, model_id, train, held, out, cfg,
                                  callbacks=[TensorBoardCallback(writer), MetricsTrail(out, plot)])
    n_trainable, n_total = _trainable(trainer.model)
    print(f"{name}: {'LoRA' if s.lora or s.qlora else 'full'} tuning, {n_trainable:,} of {n_total:,} parameters "
          f"trainable; chat template: {info['chat_template']}; reference: {info['reference']}"
          + (f"; dropped {info['dropped_long_prompts']} examples whose prompt fills max_length"
             if info["dropped_long_prompts"] else "") + (f"; resuming from {ckpt.name}" if ckpt else ""))
    val_rows = list(trainer.eval_dataset) if trainer.eval_dataset is not None else []
    before = method.val_metrics(trainer.model, val_rows, s.batch_size) if method.val_metrics and val_rows and ckpt is None else None

    t0, cpu0 = time.perf_counter(), time.process_time()
    result = trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - cpu0
    metrics = {"train_loss": result.training_loss, "steps": trainer.state.global_step,
               "train_seconds": round(seconds, 2), "train_cpu_seconds": round(cpu_seconds, 2),
               "train_examples": len(train), "val_examples": len(held), "skipped": loaded.skipped,
               "trainable_params": n_trainable, "total_params": n_total}
    if val_rows:
        evaluated = trainer.evaluate()
        metrics.update({k.replace("eval_", "val_", 1).replace("/", "_"): v for k, v in evaluated.items()
                        if isinstance(v, (int, float)) and not k.endswith(("_runtime", "_per_second"))})
        if method.val_metrics:
            metrics.update(method.val_metrics(trainer.model, val_rows, s.batch_size))
            if before is not None:
                metrics.update({f"{k}_before": v for k, v in before.items()})
    writer.close()
    save_curves_plot(trainer.state.log_history, out / "loss.png", method.panels, method.title)

    lineage = {"stage": name, "method": name, **identity, "data_format": loaded.format,
               "mode": "qlora" if s.qlora else "lora" if s.lora else "full", "reference": info["reference"],
               "chat_template": info["chat_template"], "config": cfg.model_dump(mode="json"), "metrics": metrics,
               "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    save_trained(trainer.model, trainer.processing_class, out, lineage, adapter=s.lora or s.qlora, model_id=model_id)
    atomic_write_json(out / f"{name}_metrics.json", metrics)
    shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}
    print(f"{name}: wrote {out} {shown}")
    from gptsmith.eval.report import report_after_training
    report_after_training(out, device=s.device)
    return metrics
