"""`gptsmith kto`: Kahneman-Tversky Optimization on answers rated good or bad one by one (TRL's KTOTrainer).

    gptsmith feedback export --format kto --out thumbs.jsonl
    gptsmith kto --model chat --data thumbs.jsonl --out chat-kto [--lora] [--precompute-ref]

Thumbs up/down need no pairs: KTO raises the log-ratio (against the reference, the starting model) of desirable
answers and lowers that of undesirable ones, relative to an estimate of the KL between model and reference (made
from mismatched prompt/answer pairs of the same batch, so batch_size must be at least 2). Paired dpo files work too:
each pair gives one desirable and one undesirable answer. Output, resume, lineage (method "kto") and curves as dpo.
"""

from __future__ import annotations

from pathlib import Path

from gptsmith.config import ProjectConfig
from gptsmith.errors import InputError
from gptsmith.train.preference import Method, completion_logps, prompt_and_answer_ids, run


def tokenize_unpaired(tokenizer, ex: dict) -> dict:
    prompt, completion = prompt_and_answer_ids(tokenizer, ex["prompt"], ex["completion"])
    return {"prompt_ids": prompt, "completion_ids": completion, "label": ex["label"]}


def label_logps(model, rows: list[dict], batch_size: int = 8) -> dict:
    """Mean log p(answer | prompt) of the desirable and of the undesirable held-out answers, and their gap."""
    logps = completion_logps(model, rows, "completion_ids", batch_size)
    good = [lp for lp, r in zip(logps, rows) if r["label"]]
    bad = [lp for lp, r in zip(logps, rows) if not r["label"]]
    out = {}
    if good:
        out["val_desirable_logp"] = sum(good) / len(good)
    if bad:
        out["val_undesirable_logp"] = sum(bad) / len(bad)
    if good and bad:
        out["val_logp_gap"] = out["val_desirable_logp"] - out["val_undesirable_logp"]
    return out


def _trainer_class():
    from trl import KTOTrainer

    class PretokenizedKTOTrainer(KTOTrainer):
        """KTOTrainer given rows already tokenised (prompt_ids, completion_ids, label; see dpo's
        PretokenizedDPOTrainer for why). What TRL's preparation adds after tokenising is done here the same way:
        the mismatched KL completions, each row's answer rotated by one within its batch."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            if "prompt_ids" not in dataset.column_names:
                return super()._prepare_dataset(dataset, processing_class, args, dataset_name)
            if self.calculate_KL:
                def add_kl_completion_ids(batch):
                    batch["KL_completion_ids"] = [batch["completion_ids"][-1]] + batch["completion_ids"][:-1]
                    return batch
                dataset = dataset.map(add_kl_completion_ids, batched=True,
                                      batch_size=args.per_device_train_batch_size)
            return dataset

    return PretokenizedKTOTrainer


def make_trainer(model, args: dict, train_ds, val_ds, tokenizer, peft_config, callbacks, section):
    from trl import KTOConfig

    if section.loss_type == "kto" and section.batch_size < 2:
        raise InputError("kto.batch_size must be 2 or more: the KTO loss estimates its KL term from the other "
                         "answers of the same batch; pass --batch-size 2 (or more)")
    config = KTOConfig(**args, desirable_weight=section.desirable_weight,
                       undesirable_weight=section.undesirable_weight)
    return _trainer_class()(model=model, args=config, train_dataset=train_ds, eval_dataset=val_ds,
                            processing_class=tokenizer, peft_config=peft_config, callbacks=callbacks)


METHOD = Method(
    name="kto", title="Kahneman-Tversky optimization", tokenize=tokenize_unpaired, make_trainer=make_trainer,
    panels=[("loss", ["loss"]),
            ("reward (beta x log-ratio)", ["rewards/chosen", "rewards/rejected", "rewards/margins"]),
            ("KL estimate", ["kl"])],
    val_metrics=label_logps,
)


def kto(model: str, data, out, cfg: ProjectConfig, resume: bool = False, val=None) -> dict:
    """KTO-tune `model` on the rated answers in `data`; write OUT; return the metrics (see module docstring)."""
    return run(METHOD, model, data, Path(out), cfg, resume=resume, val=val)
