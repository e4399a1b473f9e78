"""`gptsmith reward`: a reward model from preference pairs (TRL's RewardTrainer).

    gptsmith feedback export --format dpo --out prefs.jsonl
    gptsmith reward --model chat --data prefs.jsonl --out chat-rm [--lora]

The starting causal LM gets a sequence-classification head with one output (AutoModelForSequenceClassification
from the same directory: the transformer's weights, a new `score` layer): the scalar it gives a whole conversation
(prompt + answer, through the chat template) is the reward. Training raises the reward of the chosen answer above
the rejected one's (Bradley-Terry loss, -log sigmoid(r_chosen - r_rejected)). The data is what `gptsmith dpo` reads
(train/preference_formats: feedback export's pairs, TRL's, UltraFeedback, Anthropic HH), split the same way.

Held-out pairs (--val, else reward.val_fraction of the prompts by content hash) measure it: `val_accuracy` is the
share of pairs whose chosen answer the model scores above the rejected one, before and after training; it is in
reward_metrics.json and the lineage. With --lora, the adapter and the trained head are merged at the end, so OUT is
always a standard HF directory that AutoModelForSequenceClassification loads (what grpo --reward-model and
`score()` read). Also in OUT: gptsmith.yaml, gptsmith_lineage.json (method "reward"), metrics.jsonl, loss.png,
runs/ (TensorBoard), checkpoints/ (--resume).

    from gptsmith.train.reward import score
    score("chat-rm", [[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]])  # [0.83]
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from gptsmith.config import ProjectConfig, save_config
from gptsmith.errors import InputError
from gptsmith.files import atomic_write_json, write_dir
from gptsmith.model import LINEAGE_FILENAME
from gptsmith.tokenizer import encode_chat
from gptsmith.train.preference import load_split
from gptsmith.train.tuning import (MetricsTrail, StopAfterMinutes, lora_config, trainer_args,
                                   prepare_chat_template, resolve_device, save_curves_plot, start_run)

PANELS = [("loss", ["loss"]), ("held-out / batch accuracy", ["accuracy"]), ("reward margin", ["margin"])]
TITLE = "reward model (chosen over rejected)"


# ---------------------------------------------------------------------------------------------- scoring

def load_reward_model(reward_dir, device: str = "cpu"):
    """(model, tokenizer) of a reward model directory, in eval mode on `device`."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    try:
        model = AutoModelForSequenceClassification.from_pretrained(reward_dir, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(reward_dir)
    except (OSError, ValueError) as e:
        raise InputError(f"{reward_dir}: cannot load a reward model: {e}. Fix: give a directory written by "
                         "`gptsmith reward`") from None
    if model.config.num_labels != 1:
        raise InputError(f"{reward_dir}: a classifier with {model.config.num_labels} outputs, not a reward model "
                         "(one scalar output); give a directory written by `gptsmith reward`")
    _set_pad(model, tokenizer)
    return model.to(device).eval(), tokenizer


def _set_pad(model, tokenizer) -> None:
    """A sequence-classification model reads its score at the last token that is not padding, so both the
    tokenizer and the model config must name the pad token."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id


@torch.no_grad()
def score_ids(model, sequences: list[list[int]], pad_id: int, batch_size: int = 16) -> list[float]:
    """The reward of each token sequence (right-padded batches; the head reads the last real token)."""
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(sequences), batch_size):
        batch = sequences[i: i + batch_size]
        width = max(map(len, batch))
        ids = torch.tensor([s + [pad_id] * (width - len(s)) for s in batch], device=device)
        att = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in batch], device=device)
        out.extend(model(input_ids=ids, attention_mask=att).logits[:, 0].float().tolist())
    return out


def score_loaded(model, tokenizer, conversations: list[list[dict]], batch_size: int = 16) -> list[float]:
    """Rewards of whole conversations (prompt + answer messages), encoded as in training: the chat template, with
    message text kept text."""
    seqs = [encode_chat(tokenizer, conv).input_ids for conv in conversations]
    return score_ids(model, seqs, tokenizer.pad_token_id, batch_size)


def score(reward_dir, conversations: list[list[dict]], batch_size: int = 16, device: str = "cpu") -> list[float]:
    """The reward model in `reward_dir` (from `gptsmith reward`) scores each conversation: a list of {role, content}
    messages ending with the answer to score. Higher = preferred."""
    model, tokenizer = load_reward_model(reward_dir, device)
    return score_loaded(model, tokenizer, conversations, batch_size)


def pair_accuracy(model, rows: list[dict], pad_id: int, batch_size: int = 16) -> dict:
    """Share of pairs whose chosen conversation scores above the rejected one, and the mean reward margin."""
    was_training = model.training
    model.eval()
    chosen = score_ids(model, [r["chosen_ids"] for r in rows], pad_id, batch_size)
    rejected = score_ids(model, [r["rejected_ids"] for r in rows], pad_id, batch_size)
    model.train(was_training)
    margins = [c - r for c, r in zip(chosen, rejected)]
    return {"val_accuracy": sum(m > 0 for m in margins) / len(margins), "val_margin": sum(margins) / len(margins)}


# ---------------------------------------------------------------------------------------------- training

def tokenize_pair(tokenizer, ex: dict) -> dict:
    """The two whole conversations as token ids, through the chat template with message text kept text."""
    return {"chosen_ids": encode_chat(tokenizer, ex["prompt"] + ex["chosen"]).input_ids,
            "rejected_ids": encode_chat(tokenizer, ex["prompt"] + ex["rejected"]).input_ids}


def tokenized(tokenizer, examples: list[dict], max_length: int, what: str):
    """(dataset, dropped): pairs where either conversation is longer than max_length are dropped (as TRL does:
    a cut conversation would be scored without its end) and counted."""
    from datasets import Dataset

    rows = [tokenize_pair(tokenizer, ex) for ex in examples]
    kept = [r for r in rows if max(len(r["chosen_ids"]), len(r["rejected_ids"])) <= max_length]
    if rows and not kept:
        raise InputError(f"every {what} pair is longer than {max_length} tokens; raise --max-length "
                         "(reward.max_length)")
    return (Dataset.from_list(kept) if kept else None), len(rows) - len(kept)


def load_start_model(model_id: str, seed: int):
    """The starting causal LM as a one-output sequence classifier: its transformer weights and a new `score` head
    (seeded, so a run is repeatable); TRL's context hides the expected "score missing / lm_head unused" warnings."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, set_seed
    from trl.trainer.reward_trainer import suppress_seqcls_warning

    set_seed(seed)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_id)
        with suppress_seqcls_warning():
            model = AutoModelForSequenceClassification.from_pretrained(model_id, num_labels=1, dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise InputError(f"{model_id}: cannot load a model: {e}. Fix: give a local Hugging Face model directory "
                         "(config.json + weights + tokenizer), or a hub id when online") from None
    return model, tokenizer


def build_trainer(model_id: str, train: list[dict], val: list[dict], out: Path, cfg: ProjectConfig, callbacks: list):
    from trl import RewardConfig as TRLRewardConfig
    from trl import RewardTrainer

    s = cfg.reward
    device = resolve_device(s.device, setting="reward.device")
    model, tokenizer = load_start_model(model_id, s.seed)
    # lora=True: a model without a chat template gets the plain-text one, never new tokens (see its docstring)
    info = prepare_chat_template(model, tokenizer, lora=True)
    _set_pad(model, tokenizer)
    train_ds, dropped = tokenized(tokenizer, train, s.max_length, "training")
    val_ds, val_dropped = tokenized(tokenizer, val, s.max_length, "validation") if val else (None, 0)
    info["dropped_long_pairs"] = dropped + val_dropped
    args = TRLRewardConfig(
        **trainer_args(s, out, device, val_ds is not None),
        max_length=None,  # long pairs were dropped (and counted) when tokenising
        center_rewards_coefficient=s.center_rewards_coefficient,
    )
    if s.max_minutes is not None:
        callbacks = [*callbacks, StopAfterMinutes(s.max_minutes, stage="reward")]
    peft_config = None
    if s.lora:
        peft_config = lora_config(s)
        peft_config.task_type = "SEQ_CLS"
        peft_config.modules_to_save = ["score"]  # the new head is trained in full (TRL's advice for a causal LM)
    trainer = RewardTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=val_ds,
                            processing_class=tokenizer, peft_config=peft_config, callbacks=callbacks)
    return trainer, info


def save_reward_model(model, tokenizer, out: Path, lineage: dict) -> None:
    """OUT as a standard HF sequence-classification dir (a LoRA adapter merged in first), swapped in whole."""
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / LINEAGE_FILENAME, lineage)

    write_dir(out, write)


def reward(model: str, data, out, cfg: ProjectConfig, resume: bool = False, val=None) -> dict:
    """Train a reward model from `model` (HF dir or hub id) on the preference pairs in `data` (held out: `val`, else
    a content-hash split of `data`); write OUT; return the metrics (see module docstring)."""
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    s, out = cfg.reward, Path(out)
    model_id = str(Path(model).resolve()) if Path(model).is_dir() else str(model)
    loaded, train, held, identity = load_split(data, val, "dpo", s, cfg.data.on_error, model_id)
    print(f"reward: {len(train)} train / {len(held)} held-out pairs ({loaded.format}; skipped {loaded.skipped}"
          + (f": {dict(loaded.problems)}" if loaded.problems else "") + f") from {data}"
          + (f", held out from {val}" if val is not None else ""))

    ckpt = start_run(out, identity, resume, "reward_run.json", "reward")
    save_config(cfg, out)
    writer = SummaryWriter(str(out / "runs"))
    plot = lambda history, path: save_curves_plot(history, path, PANELS, TITLE)  # noqa: E731
    trainer, info = build_trainer(model_id, train, held, out, cfg,
                                  [TensorBoardCallback(writer), MetricsTrail(out, plot)])
    n_trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in trainer.model.parameters())
    print(f"reward: {'LoRA' if s.lora else 'full'} tuning, {n_trainable:,} of {n_total:,} parameters trainable; "
          f"chat template: {info['chat_template']}"
          + (f"; dropped {info['dropped_long_pairs']} pairs longer than max_length" if info["dropped_long_pairs"]
             else "") + (f"; resuming from {ckpt.name}" if ckpt else ""))
    pad_id = trainer.processing_class.pad_token_id
    val_rows = list(trainer.eval_dataset) if trainer.eval_dataset is not None else []
    before = pair_accuracy(trainer.model, val_rows, pad_id, s.batch_size) if val_rows and ckpt is None else None

    t0 = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
    metrics = {"train_loss": result.training_loss, "steps": trainer.state.global_step,
               "train_seconds": round(time.perf_counter() - t0, 2), "train_pairs": len(train),
               "val_pairs": len(held), "skipped": loaded.skipped, "trainable_params": n_trainable,
               "total_params": n_total}
    if val_rows:
        evaluated = trainer.evaluate()
        metrics.update({k.replace("eval_", "val_trl_", 1): v for k, v in evaluated.items()
                        if k.startswith("eval_") and not k.endswith(("_runtime", "_per_second"))})
        metrics.update(pair_accuracy(trainer.model, val_rows, pad_id, s.batch_size))
        if before is not None:
            metrics.update({f"{k}_before": v for k, v in before.items()})
    writer.close()
    save_curves_plot(trainer.state.log_history, out / "loss.png", PANELS, TITLE)

    lineage = {"stage": "reward", "method": "reward", **identity, "data_format": loaded.format,
               "mode": "lora (merged)" if s.lora else "full", "head": "sequence classification, 1 output",
               "chat_template": info["chat_template"], "config": cfg.model_dump(mode="json"), "metrics": metrics,
               "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    save_reward_model(trainer.model, trainer.processing_class, out, lineage)
    atomic_write_json(out / "reward_metrics.json", metrics)
    shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}
    print(f"reward: wrote {out} {shown}")
    from gptsmith.eval.report import report_after_training
    report_after_training(out, device=s.device, samples=0)  # a reward model scores; it writes no samples
    return metrics
