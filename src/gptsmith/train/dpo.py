"""`gptsmith dpo`: Direct Preference Optimization on pairs of answers (TRL's DPOTrainer).

    gptsmith feedback export --format dpo --out prefs.jsonl
    gptsmith dpo --model chat --data prefs.jsonl --out chat-dpo [--lora] [--precompute-ref]

The loss raises log p(chosen) - log p(rejected) relative to the reference (the starting model), scaled by beta:
the rewards/margins curve, and rewards/accuracies (the share of pairs where the chosen answer gained more).
Besides TRL's figures, validation reports `val_pair_accuracy`: the share of held-out pairs whose chosen answer the
model itself gives a higher log-probability than the rejected one, before and after.

Output as for sft: a HF model dir, or with --lora an adapter dir (`gptsmith merge-lora`), with gptsmith.yaml,
gptsmith_lineage.json (method "dpo", parent model, data with sha256), metrics.jsonl, loss.png, runs/ (TensorBoard),
checkpoints/.
"""

from __future__ import annotations

from pathlib import Path

from gptsmith.config import ProjectConfig
from gptsmith.train.preference import Method, completion_logps, prompt_and_answer_ids, run


def tokenize_pair(tokenizer, ex: dict) -> dict:
    prompt, chosen = prompt_and_answer_ids(tokenizer, ex["prompt"], ex["chosen"])
    prompt_r, rejected = prompt_and_answer_ids(tokenizer, ex["prompt"], ex["rejected"])
    n = min(len(prompt), len(prompt_r))  # both answers continue the same prompt tokens
    return {"prompt_ids": prompt[:n], "chosen_ids": prompt[n:] + chosen, "rejected_ids": prompt_r[n:] + rejected}


def pair_accuracy(model, rows: list[dict], batch_size: int = 8) -> dict:
    """The share of pairs whose chosen answer the model gives a higher log-probability than the rejected one, and
    the mean log-prob margin (nats)."""
    chosen = completion_logps(model, rows, "chosen_ids", batch_size)
    rejected = completion_logps(model, rows, "rejected_ids", batch_size)
    margins = [c - r for c, r in zip(chosen, rejected)]
    return {"val_pair_accuracy": sum(m > 0 for m in margins) / len(margins),
            "val_logp_margin": sum(margins) / len(margins)}


def _trainer_class():
    from trl import DPOTrainer

    class PretokenizedDPOTrainer(DPOTrainer):
        """DPOTrainer given rows already tokenised (prompt_ids, chosen_ids, rejected_ids; preference.tokenized):
        TRL's own preparation renders the template to text and tokenises it with special tokens parsed, so an
        answer containing "<|end|>" would train a real end-of-turn token. Rows of text still take TRL's path."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            if "prompt_ids" in dataset.column_names:
                return dataset  # too-long prompts were dropped (and counted) when tokenising
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    return PretokenizedDPOTrainer


def make_trainer(model, args: dict, train_ds, val_ds, tokenizer, peft_config, callbacks, section):
    from trl import DPOConfig

    config = DPOConfig(**args, label_smoothing=section.label_smoothing)
    return _trainer_class()(model=model, args=config, train_dataset=train_ds, eval_dataset=val_ds,
                            processing_class=tokenizer, peft_config=peft_config, callbacks=callbacks)


METHOD = Method(
    name="dpo", title="direct preference optimization", tokenize=tokenize_pair, make_trainer=make_trainer,
    panels=[("loss", ["loss"]),
            ("reward (beta x log-ratio)", ["rewards/chosen", "rewards/rejected", "rewards/margins"]),
            ("reward accuracy", ["rewards/accuracies"])],
    val_metrics=pair_accuracy,
)


def dpo(model: str, data, out, cfg: ProjectConfig, resume: bool = False, val=None) -> dict:
    """DPO-tune `model` on the pairs in `data`; write OUT; return the metrics (see module docstring)."""
    return run(METHOD, model, data, Path(out), cfg, resume=resume, val=val)
