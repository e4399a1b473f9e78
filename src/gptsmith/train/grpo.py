"""`gptsmith grpo`: reinforcement learning from rewards on the model's own answers (TRL's GRPOTrainer).

    gptsmith grpo --model chat --data prompts.jsonl --out chat-grpo --reward numeric
    gptsmith grpo --model chat --data prompts.jsonl --out chat-grpo --reward-fn my_rewards.py:brevity \
        --reward-model chat-rm --reward-weights 1 0.5

For each prompt the model samples `num_generations` answers; each answer's reward is compared with the others of
its group (the advantage), and the model is moved towards the better ones. Nothing but the model is needed to
generate: TRL samples with the model's own generate (CPU or GPU). With `--vllm` (grpo.use_vllm) TRL samples with vLLM
inside the training process instead, on CUDA with the vllm package installed.

Prompts file (.jsonl, or a .json list), one line per prompt:
    {"prompt": "What is 6 * 7?", "answer": "42"}          a string is one user turn (the model answers through its
    {"prompt": [{"role": "user", "content": "..."}], ...}  chat template, as it is served), or messages ending with
                                                           a user turn
Every other field of a line (here "answer"; also "id") is handed to the reward functions as a keyword list, as TRL
does. `--answers FILE` takes the answers from a separate JSONL of {"id": ..., "answer": ...} lines instead, matched
to the prompts' "id".

Rewards (several add up, weighted by grpo.reward_weights in the order --reward, --reward-fn, --reward-model):
    --reward exact|contains|regex|numeric     1 when the answer passes the check against the line's "answer"
                                              (train/rewards.py; the rules of `gptsmith eval` generation suites)
    --reward-fn path/to/file.py:function      your function(prompts, completions, **kwargs) -> list[float]
    --reward-model DIR                        the score of a reward model from `gptsmith reward`

Output as for sft/dpo: a HF model dir, or with --lora an adapter dir, with gptsmith.yaml, gptsmith_lineage.json
(method "grpo": parent, data with sha256, rewards), metrics.jsonl (reward mean/std per step, per reward too),
loss.png, runs/ (TensorBoard), checkpoints/ (--resume).
"""

from __future__ import annotations

import importlib.util
import random
import time
from collections import Counter
from pathlib import Path

from gptsmith.config import ProjectConfig, save_config
from gptsmith.data.chat_formats import _records
from gptsmith.data.preference_formats import _prompt
from gptsmith.errors import InputError
from gptsmith.files import atomic_write_json
from gptsmith.tokenizer import encode_chat
from gptsmith.train import rewards as R
from gptsmith.train.tuning import (MetricsTrail, StopAfterMinutes, file_identity, load_model, lora_config,
                                   trainer_args, prepare_chat_template, resolve_device, save_curves_plot,
                                   save_trained, start_run)

TITLE = "GRPO (rewards of sampled answers)"
PROMPT_FIX = ('each line is {"prompt": "..." | [{"role": "user", "content": "..."}], "answer": ...} (answer: what '
              "the --reward checks compare with; other fields are passed to --reward-fn functions)")


# ---------------------------------------------------------------------------------------------- data

def load_prompts(path, on_error: str = "error") -> tuple[list[dict], list[str], int, Counter]:
    """(rows, where each row came from (file:line), skipped, problems): each row the line's fields, its "prompt" as
    messages and its "id" (when given) as text."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file; give a .jsonl file of prompts: {PROMPT_FIX}")
    rows, wheres, skipped, problems = [], [], 0, Counter()
    for where, rec in _records(path):
        try:
            if isinstance(rec, Exception):
                raise ValueError(f"invalid JSON ({rec.msg})")
            if not isinstance(rec, dict):
                raise ValueError("a line must be a JSON object")
            if "prompt" not in rec:
                raise ValueError("missing field 'prompt'")
            row = {**rec, "prompt": _prompt(rec["prompt"])}
            if "id" in row:
                row["id"] = str(row["id"])
        except ValueError as e:
            if on_error != "skip":
                raise InputError(f"{where}: {e}. Fix: {PROMPT_FIX} (or pass --on-error skip to skip bad "
                                 "lines)") from None
            skipped += 1
            problems[str(e).split(" (")[0]] += 1
            continue
        rows.append(row)
        wheres.append(where)
    if not rows:
        raise InputError(f"{path}: no prompts (skipped {skipped}: {dict(problems)}). Fix: {PROMPT_FIX}")
    return rows, wheres, skipped, problems


def attach_answers(rows: list[dict], wheres: list[str], answers_path) -> int:
    """Set each row's "answer" from the --answers file ({"id", "answer"} lines) by the row's "id"; returns how many
    answers were used."""
    if not Path(answers_path).is_file():
        raise InputError(f"--answers {answers_path}: no such file; give a .jsonl of "
                         '{"id": ..., "answer": ...} lines')
    answers, seen_at = {}, {}
    for where, rec in _records(Path(answers_path)):
        if isinstance(rec, Exception) or not isinstance(rec, dict) or "id" not in rec or "answer" not in rec:
            raise InputError(f'{where}: each --answers line is {{"id": ..., "answer": ...}} (the id of a prompt line '
                             "of --data)")
        key = str(rec["id"])
        if key in answers:
            raise InputError(f"{where}: id {key!r} is given twice (first at {seen_at[key]}); keep one answer per id "
                             "(a list of strings accepts several)")
        answers[key], seen_at[key] = rec["answer"], where
    for row, where in zip(rows, wheres):
        if "id" not in row:
            raise InputError(f'{where}: no "id", which --answers {answers_path} needs to find this prompt\'s answer; '
                             'give every prompt line an "id"')
        if row["id"] not in answers:
            raise InputError(f"{where}: id {row['id']!r} has no line in --answers {answers_path}; add "
                             f'{{"id": "{row["id"]}", "answer": ...}} there')
        row["answer"] = answers[row["id"]]
    return len(rows)


def check_answers(rows: list[dict], wheres: list[str], kinds: list[str], on_error: str) -> tuple[list, list, int]:
    """Drop (on_error=skip) or refuse rows whose "answer" a --reward check cannot use (missing, a bad regex, not a
    number for numeric)."""
    kept, kept_wheres, skipped = [], [], 0
    for row, where in zip(rows, wheres):
        problem = next((p for k in kinds if (p := R.check_answer(k, row.get("answer"), where))), None)
        if problem is None:
            kept.append(row)
            kept_wheres.append(where)
        elif on_error == "skip":
            skipped += 1
        else:
            raise InputError(problem + " (or pass --on-error skip to skip such lines)")
    if not kept:
        raise InputError(f"no prompt has an answer the --reward {', '.join(kinds)} check can use; see the messages "
                         "above, or pass --on-error error to see the first problem")
    return kept, kept_wheres, skipped


def to_dataset(rows: list[dict]):
    """One datasets column per field; lines without a field get null there (reward functions see None). When lines
    mix kinds of "answer" (a string here, a number or a list there), every answer becomes a list of strings."""
    from datasets import Dataset

    keys = list(dict.fromkeys(k for r in rows for k in r))
    kinds = {"number" if isinstance(r["answer"], (int, float)) else type(r["answer"]).__name__
             for r in rows if r.get("answer") is not None}
    if len(kinds) > 1:  # "42" on one line, 42 or ["42", "forty-two"] on another: one column needs one type
        rows = [{**r, "answer": None if r.get("answer") is None else R.answer_list(r["answer"])} for r in rows]
    try:
        return Dataset.from_list([{k: r.get(k) for k in keys} for r in rows])
    except Exception as e:  # pyarrow's type errors: a field holding different kinds of value on different lines
        raise InputError(f"the prompts file's fields must keep one type on every line (e.g. \"answer\" always a "
                         f"string, or always a list of strings): {e}") from None


# ---------------------------------------------------------------------------------------------- rewards

def reward_functions(s, device: str) -> tuple[list, list[str]]:
    """(TRL reward functions, their descriptions) in the order rewards, reward_fns, reward_model."""
    funcs, described = [], []
    for kind in s.rewards:
        funcs.append(R.matcher_reward(kind))
        described.append(f"{kind} (answer check)")
    for spec in s.reward_fns:
        funcs.append(R.load_reward_fn(spec))
        described.append(f"{spec} (function)")
    if s.reward_model:
        funcs.append(R.RewardModelReward(s.reward_model, device=device))
        described.append(f"{s.reward_model} (reward model)")
    if not funcs:
        raise InputError("grpo needs a reward: --reward exact|contains|regex|numeric (checks each prompt's "
                         "\"answer\"), --reward-fn path/to/file.py:function, and/or --reward-model DIR")
    if s.reward_weights is not None and len(s.reward_weights) != len(funcs):
        raise InputError(f"--reward-weights has {len(s.reward_weights)} weights for {len(funcs)} rewards "
                         f"({'; '.join(described)}); give one weight per reward, in that order")
    return funcs, described


# ---------------------------------------------------------------------------------------------- training

def _trainer_class():
    from trl import GRPOTrainer

    class ChatGRPOTrainer(GRPOTrainer):
        """GRPOTrainer whose chat prompts are tokenised with message text kept text (tokenizer.encode_chat): TRL's
        own path renders the template and parses special tokens in it, so a prompt containing "<|end|>" would put a
        real end-of-turn token in front of the model."""

        def _tokenize_prompts(self, prompts: list):
            if self.tools or self.environment_factories is not None or self._is_vlm:
                return super()._tokenize_prompts(prompts)
            ids = [encode_chat(self.processing_class, p, add_generation_prompt=True).input_ids for p in prompts]
            return ids, None, {}

    return ChatGRPOTrainer


def check_batch(s) -> None:
    """TRL's batch rule, said with our keys before any model is loaded."""
    if (s.batch_size * s.grad_accum) % s.num_generations:
        fit = s.num_generations * max(1, s.batch_size // s.num_generations)
        raise InputError(f"grpo.batch_size x grpo.grad_accum ({s.batch_size} x {s.grad_accum}) must be a multiple of "
                         f"grpo.num_generations ({s.num_generations}): each step takes whole groups of answers to "
                         f"one prompt; e.g. --batch-size {fit}")


def check_vllm(s, device: str) -> None:
    if not s.use_vllm:
        return
    if not device.startswith("cuda"):
        raise InputError("--vllm (grpo.use_vllm) samples on a CUDA GPU; on this device leave it off (the model's "
                         "own generate is used)")
    if importlib.util.find_spec("vllm") is None:
        raise InputError("--vllm (grpo.use_vllm) needs the vllm package: pip install vllm (or leave --vllm off)")


def build_trainer(model_id: str, dataset, funcs: list, device: str, out: Path, cfg: ProjectConfig, callbacks: list):
    from trl import GRPOConfig as TRLGRPOConfig

    s = cfg.grpo
    model, tokenizer = load_model(model_id, device)
    # lora=True: a model without a chat template gets the plain-text one, never new tokens (see its docstring)
    info = prepare_chat_template(model, tokenizer, lora=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    info["padding_side"] = tokenizer.padding_side  # put back before saving: serving keeps the model's own
    tokenizer.padding_side = "left"  # generation pads prompts on the left (TRL's requirement)
    common = trainer_args(s, out, device, has_val=False)  # no held-out prompts: the reward curve is the signal
    for key in ("per_device_eval_batch_size", "dataset_num_proc"):  # GRPOConfig has neither (it generates online)
        common.pop(key)
    args = TRLGRPOConfig(
        **common,
        num_generations=s.num_generations, max_completion_length=s.max_completion_length,
        temperature=s.temperature, top_p=s.top_p, beta=s.beta, epsilon=s.epsilon, num_iterations=s.num_iterations,
        loss_type=s.loss_type, scale_rewards=s.scale_rewards, mask_truncated_completions=s.mask_truncated_completions,
        reward_weights=s.reward_weights, use_vllm=s.use_vllm, vllm_mode="colocate",
    )
    if s.max_minutes is not None:
        callbacks = [*callbacks, StopAfterMinutes(s.max_minutes, stage="grpo")]
    peft_config = lora_config(s) if s.lora else None
    trainer = _trainer_class()(model=model, reward_funcs=funcs, args=args, train_dataset=dataset,
                               processing_class=tokenizer, peft_config=peft_config, callbacks=callbacks)
    return trainer, info


def panels(trainer) -> list[tuple[str, list[str]]]:
    names = [f"rewards/{n}/mean" for n in trainer.reward_func_names]
    out = [("reward (weighted sum)", ["reward", "reward_std"])]
    if len(names) > 1:
        out.append(("each reward", names))
    out.append(("loss", ["loss"]))
    out.append(("KL to the start", ["kl"]))
    out.append(("answer length (tokens)", ["completions/mean_length"]))
    return out


def _reward_summary(log_history: list[dict]) -> dict:
    """Reward at the first and the last logged step (each the mean over that step's sampled answers)."""
    logged = [h for h in log_history if "reward" in h]
    if not logged:
        return {}
    return {"reward_first": logged[0]["reward"], "reward_last": logged[-1]["reward"],
            "reward_std_last": logged[-1].get("reward_std")}


def reward_model_identity(reward_dir) -> dict:
    """The reward model as lineage records it: where it is, what it was trained from, how well it ranked."""
    from gptsmith.model import read_lineage

    theirs = read_lineage(reward_dir)
    return {"path": str(Path(reward_dir).resolve()), "parent_model": theirs.get("parent_model"),
            "data": theirs.get("data"), "val_accuracy": theirs.get("metrics", {}).get("val_accuracy")}


def grpo(model: str, data, out, cfg: ProjectConfig, resume: bool = False, answers=None) -> dict:
    """GRPO-tune `model` (HF dir or hub id) on the prompts in `data` with the rewards of cfg.grpo (answers from the
    lines, or from `answers`); write OUT (a HF model dir, or a LoRA adapter dir); return the metrics."""
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    s, out = cfg.grpo, Path(out)
    model_id = str(Path(model).resolve()) if Path(model).is_dir() else str(model)
    device = resolve_device(s.device, setting="grpo.device")
    check_batch(s)
    check_vllm(s, device)
    funcs, described = reward_functions(s, device)  # every reward checked before anything is written
    rows, wheres, skipped, problems = load_prompts(data, on_error=cfg.data.on_error)
    if answers is not None:
        attach_answers(rows, wheres, answers)
    if s.rewards:
        rows, wheres, no_answer = check_answers(rows, wheres, list(s.rewards), cfg.data.on_error)
        skipped += no_answer
        problems.update({"answer unusable by --reward": no_answer} if no_answer else {})
    random.Random(s.seed).shuffle(rows)  # TRL shuffles too; this keeps the file's order out of a run's first steps
    dataset = to_dataset(rows)
    identity = {"parent_model": model_id, "data": file_identity(data),
                **({"answers": file_identity(answers)} if answers is not None else {})}
    print(f"grpo: {len(rows)} prompts (skipped {skipped}" + (f": {dict(problems)}" if problems else "")
          + f") from {data}" + (f", answers from {answers}" if answers is not None else ""))

    ckpt = start_run(out, identity, resume, "grpo_run.json", "grpo")
    save_config(cfg, out)
    writer = SummaryWriter(str(out / "runs"))
    trail = MetricsTrail(out)
    trainer, info = build_trainer(model_id, dataset, funcs, device, out, cfg, [TensorBoardCallback(writer), trail])
    shown_panels = panels(trainer)
    trail.plot = lambda history, path: save_curves_plot(history, path, shown_panels, TITLE)
    weights = s.reward_weights or [1.0] * len(described)
    n_trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in trainer.model.parameters())
    print(f"grpo: {'LoRA' if s.lora else 'full'} tuning, {n_trainable:,} of {n_total:,} parameters trainable; "
          f"{s.num_generations} answers per prompt, sampled with "
          f"{'vLLM' if s.use_vllm else 'the model'}; rewards: "
          + "; ".join(f"{d} x {w:g}" for d, w in zip(described, weights))
          + f"; chat template: {info['chat_template']}" + (f"; resuming from {ckpt.name}" if ckpt else ""))

    t0 = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
    metrics = {"train_loss": result.training_loss, "steps": trainer.state.global_step,
               "train_seconds": round(time.perf_counter() - t0, 2), "prompts": len(rows), "skipped": skipped,
               "trainable_params": n_trainable, "total_params": n_total,
               **_reward_summary(trainer.state.log_history)}
    writer.close()
    save_curves_plot(trainer.state.log_history, out / "loss.png", shown_panels, TITLE)

    lineage = {"stage": "grpo", "method": "grpo", **identity, "mode": "lora" if s.lora else "full",
               "rewards": [{"reward": d, "weight": w} for d, w in zip(described, weights)],
               "reward_files": [file_identity(spec.rpartition(":")[0]) for spec in s.reward_fns],
               **({"reward_model": reward_model_identity(s.reward_model)} if s.reward_model else {}),
               "chat_template": info["chat_template"], "config": cfg.model_dump(mode="json"), "metrics": metrics,
               "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    trainer.processing_class.padding_side = info["padding_side"]
    save_trained(trainer.model, trainer.processing_class, out, lineage, adapter=s.lora, model_id=model_id)
    atomic_write_json(out / "grpo_metrics.json", metrics)
    shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}
    print(f"grpo: wrote {out} {shown}")
    from gptsmith.eval.report import report_after_training
    report_after_training(out, device=s.device)
    return metrics
