"""What every fine-tuning command on a TRL trainer shares (sft, dpo, kto): loading the starting model, its chat
template, LoRA settings, precision, resume rules, the time budget, the metrics trail and the output directory.

Each command keeps only what is its own: how its data is tokenised, which TRL trainer and config it builds, and
the metrics it adds (sft's assistant-token bpb, dpo/kto's reward curves and preference accuracy).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from gptsmith.errors import InputError
from gptsmith.files import atomic_write_json, atomic_write_text, sha256_file, write_dir
from gptsmith.model import LINEAGE_FILENAME, default_generation_config, save_model_dir
from gptsmith.tokenizer import ASSISTANT, CHAT_TEMPLATE, END_OF_TURN, PAD, SYSTEM, USER


def resolve_device(device: str, setting: str = "sft.device") -> str:
    from gptsmith.device import select_device
    return str(select_device(device, setting=setting))


def precision_args(device: str) -> dict:
    """TrainingArguments for the device: no half precision on CPU (slow or unsupported there; TRL's configs default
    to bf16, so it is turned off explicitly); bf16 autocast on GPUs that have it, else fp16."""
    cuda = device.startswith("cuda")
    bf16 = cuda and torch.cuda.is_bf16_supported()
    return {"bf16": bf16, "fp16": cuda and not bf16, "use_cpu": not cuda}


def trainer_args(s, out: Path, device: str, has_val: bool) -> dict:
    """The TrainingArguments every gptsmith TRL trainer (sft, dpo, kto, reward, grpo) shares, from its config section
    `s`: checkpoints under OUT/checkpoints, a cosine schedule, the device's precision, when to evaluate, save and
    log, and the seeds. Each trainer adds its method's own arguments."""
    evaluation = dict(eval_strategy="steps", eval_steps=s.eval_every) if has_val else dict(eval_strategy="no")
    return dict(
        output_dir=str(out / "checkpoints"),
        num_train_epochs=s.epochs, max_steps=s.max_steps,
        per_device_train_batch_size=s.batch_size, per_device_eval_batch_size=s.batch_size,
        gradient_accumulation_steps=s.grad_accum,
        learning_rate=s.lr, lr_scheduler_type="cosine", warmup_steps=s.warmup_ratio, weight_decay=s.weight_decay,
        **precision_args(device),  # fp32 on CPU (TRL's configs default to bf16); bf16 autocast where the GPU has it
        activation_checkpointing=s.gradient_checkpointing,  # TRL defaults it on; ours is a setting, off by default
        dataloader_num_workers=0, dataset_num_proc=None,
        **evaluation,
        save_strategy="steps", save_steps=s.save_every, save_total_limit=s.keep_checkpoints,
        logging_steps=s.log_every, logging_first_step=True, report_to="none",
        seed=s.seed, data_seed=s.seed, disable_tqdm=False,
    )


def load_model(model_id: str, device: str, qlora: bool = False):
    """Model in float32 (TRL's default too: mixed precision autocasts from fp32 master weights), or 4-bit for QLoRA."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"dtype": torch.float32}
    if qlora:
        # Checked before touching bitsandbytes: it is a CUDA-only package and need not be installed on CPU machines.
        if not device.startswith("cuda"):
            raise InputError("--qlora needs a CUDA GPU: the 4-bit base weights run on bitsandbytes' CUDA kernels. "
                             "On this machine use --lora (same adapter, base weights kept in float32).")
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise InputError("--qlora needs the bitsandbytes package: pip install 'gptsmith[qlora]' "
                             "(or pip install bitsandbytes)") from None
        from transformers import BitsAndBytesConfig
        bf16 = torch.cuda.is_bf16_supported()
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if bf16 else torch.float16)
        kwargs["device_map"] = {"": torch.device(device).index or 0}
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_id)
        model = AutoModelForCausalLM.from_pretrained(model_id, **kwargs)
    except OSError as e:
        raise InputError(f"{model_id}: cannot load a model: {e}. Fix: give a local Hugging Face model directory "
                         "(config.json + weights + tokenizer), or a hub id when online") from None
    return model, tokenizer


# For LoRA on a model without a chat template: plain-text role headers and the model's own eos, so no new tokens
# (a LoRA adapter cannot learn new embedding rows, and merging needs no resize).
PLAIN_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '### Assistant:\n' -}}{%- generation -%}{{- message['content'] + eos_token -}}{%- endgeneration -%}{{- '\n\n' -}}"
    "{%- else -%}"
    "{{- '### ' + message['role'] | capitalize + ':\n' + message['content'] + '\n\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '### Assistant:\n' -}}{%- endif -%}"
)


def prepare_chat_template(model, tokenizer, lora: bool = False) -> dict:
    """Make sure the tokenizer can render conversations with assistant masks; returns what was done.

    1. The model's own template with `{% generation %}` markers (all gptsmith models): used as is.
    2. Its own template without markers: TRL swaps in its training variant when it knows the template
       (Llama 3, Qwen 2.5/3, Gemma, Phi-3, ...); otherwise sft masks by rendering each prefix.
    3. No template (a base GPT-2 / Llama), full fine-tuning: we add our role tokens and template and resize the
       embeddings. Dedicated tokens mark turns unambiguously (a user cannot type them), give the model a real
       end-of-turn token to stop on, and keep the format identical to every gptsmith model. The new rows start
       random and are trained with everything else.
    4. No template, `lora=True`: a plain-text template (`PLAIN_CHAT_TEMPLATE`) ending answers with the model's own
       eos. New tokens would need their embedding rows trained, which a LoRA adapter cannot do (and peft's
       trainable-token rows are bypassed by TRL's fused LM head on tied embeddings, like GPT-2's). Preference
       tuning always takes this branch: it only reweighs answers the model can already write, so random new rows
       would learn nothing, and its reference model (loaded again from the same path) must keep the same vocabulary.
    """
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    info = {"chat_template": "own", "masking": "generation markers"}
    if tokenizer.chat_template:
        if has_generation_markers(tokenizer.chat_template):
            return info
        try:
            get_training_chat_template(tokenizer)
            info["masking"] = "TRL training template"
        except ValueError:
            info["masking"] = "prefix rendering"
        return info
    if lora:
        if tokenizer.eos_token is None:
            raise InputError(f"{tokenizer.name_or_path}: the tokenizer has no chat template and no eos token to end "
                             "answers with; fine-tune it fully with `gptsmith sft` (no --lora) first so gptsmith "
                             "can add its chat tokens")
        tokenizer.chat_template = PLAIN_CHAT_TEMPLATE
        info["chat_template"] = "plain text (### User / ### Assistant, answers end with eos)"
        return info
    tokenizer.add_special_tokens({"additional_special_tokens": [SYSTEM, USER, ASSISTANT, END_OF_TURN]})
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": PAD})
    tokenizer.eos_token = END_OF_TURN  # chat engines stop at eos: make it the end of a turn
    tokenizer.chat_template = CHAT_TEMPLATE
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    info["chat_template"] = "gptsmith (added role tokens)"
    return info


def lora_config(section):
    """peft's LoraConfig from a config section's lora_* keys (sft, dpo and kto share their names)."""
    from peft import LoraConfig

    targets = section.lora_target_modules
    if targets == ["all-linear"]:  # from the CLI's nargs; a one-name list must stay a list (a str is a regex for peft)
        targets = "all-linear"
    return LoraConfig(r=section.lora_r, lora_alpha=section.lora_alpha, lora_dropout=section.lora_dropout,
                      target_modules=targets, task_type="CAUSAL_LM", bias="none")


class StopAfterMinutes(TrainerCallback):
    """`<stage>.max_minutes`: end training (the Trainer then saves and evaluates as at a normal end) once the time
    budget is spent, so a time-boxed run such as the quickstart always finishes with a usable model."""

    def __init__(self, minutes: float, stage: str = "sft"):
        self.seconds = minutes * 60
        self.stage = stage
        self.start = None
        self.stopped_at: int | None = None  # the step it ended training at, for the run's stop_reason

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if time.perf_counter() - self.start > self.seconds:
            print(f"{self.stage}: time budget of {self.seconds / 60:g} min reached at step {state.global_step}; "
                  "stopping")
            control.should_training_stop = True
            control.should_save = True
            self.stopped_at = state.global_step
        return control


def what_the_run_bought(trainer) -> dict:
    """steps_done, steps_planned and stop_reason of a finished Trainer run, for train.budget.training_verdict: a
    run its time budget cut short says so (its LR schedule was planned for steps_planned and did not finish)."""
    budget = next((c for c in trainer.callback_handler.callbacks if isinstance(c, StopAfterMinutes)), None)
    stopped = budget is not None and budget.stopped_at is not None
    return {"steps_done": trainer.state.global_step, "steps_planned": trainer.state.max_steps,
            "stop_reason": f"time budget ({budget.seconds / 60:g} min)" if stopped else "max_steps"}


def latest_checkpoint(out: Path) -> Path | None:
    """The newest checkpoint that finished saving. The Trainer writes trainer_state.json last, so a checkpoint dir
    without a readable one was cut off by a kill and is skipped."""
    ckpts = []
    for d in (Path(out) / "checkpoints").glob("checkpoint-*"):
        try:
            json.loads((d / "trainer_state.json").read_text())
            ckpts.append((int(d.name.rsplit("-", 1)[1]), d))
        except (OSError, ValueError):
            continue
    return max(ckpts)[1] if ckpts else None


def start_run(out: Path, identity: dict, resume: bool, run_filename: str, stage: str) -> Path | None:
    """The resume rules every trainer follows; returns the checkpoint to continue from (None: start anew).

    A user's checkpoints are never deleted unasked (--overwrite does it); --resume continues only the same data and
    model (recorded in OUT/<run_filename>); checkpoints cut off by a kill are cleared so the Trainer's rotation does
    not count them."""
    ckpt = latest_checkpoint(out)
    if ckpt is not None and not resume:
        raise InputError(f"{out} already holds checkpoints of a run (latest {ckpt.name}); pass --resume to continue "
                         "it, choose another --out, or pass --overwrite to delete them and start over")
    if resume:
        prev = json.loads((out / run_filename).read_text()) if (out / run_filename).is_file() else None
        if ckpt is None:
            print(f"{stage}: no finished checkpoint under {out / 'checkpoints'}; starting from the beginning")
        elif prev is not None and prev != identity:
            raise InputError(f"{out}: --resume with different data or base model than the run being resumed "
                             f"({prev['data']['path']} @ {prev['parent_model']}); use the same --data and --model, "
                             "or drop --resume to start over")
    if ckpt is None and (out / "checkpoints").exists():
        shutil.rmtree(out / "checkpoints")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / run_filename, identity)
    return ckpt


def file_identity(path) -> dict:
    """A data file as lineage records it: absolute path and content hash."""
    return {"path": str(Path(path).resolve()), "sha256": sha256_file(path)}


def generation_config(model, tokenizer, model_id: str):
    """Keep the parent's generation settings (a foreign model's stop tokens), making sure the eos we trained stops it."""
    has_own = Path(model_id, "generation_config.json").is_file() or not Path(model_id).exists()
    gen = model.generation_config if has_own and model.generation_config is not None else default_generation_config(tokenizer)
    eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id] if gen.eos_token_id is not None else []
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
        gen.eos_token_id = [tokenizer.eos_token_id, *eos]
    if gen.pad_token_id is None:
        gen.pad_token_id = tokenizer.pad_token_id
    return gen


def save_trained(model, tokenizer, out: Path, lineage: dict, adapter: bool, model_id: str) -> None:
    """OUT as a standard HF model dir, or (adapter=True) a PEFT adapter dir with the tokenizer and chat template,
    swapped in whole (files.write_dir) so a crash never leaves a half-written model."""
    if adapter:
        def write(tmp: Path) -> None:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            atomic_write_json(tmp / LINEAGE_FILENAME, lineage)
        write_dir(out, write)
    else:
        save_model_dir(model, tokenizer, out, lineage=lineage,
                       generation_config=generation_config(model, tokenizer, model_id))


class MetricsTrail(TrainerCallback):
    """OUT/metrics.jsonl (one record per Trainer log: loss, learning rate, the trainer's own metrics such as DPO's
    rewards/*) and a PNG of chosen curves, rewritten at every log/save. Written from the Trainer's log_history, which
    a resumed run restores from its checkpoint, so the files hold the history up to the checkpoint plus what came
    after, never the steps of the run that was killed."""

    def __init__(self, out: Path, plot=None, plot_every_s: float = 30.0):
        self.out = Path(out)
        self.plot = plot  # plot(log_history, path) or None
        self.plot_every_s = plot_every_s
        self.last_plot = 0.0

    def write(self, state, force_plot: bool = False) -> None:
        lines = "".join(json.dumps(h, ensure_ascii=False) + "\n" for h in state.log_history)
        atomic_write_text(self.out / "metrics.jsonl", lines)
        if self.plot is not None and (force_plot or time.monotonic() - self.last_plot >= self.plot_every_s):
            self.plot(state.log_history, self.out / "loss.png")
            self.last_plot = time.monotonic()

    def on_log(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.write(state)

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.write(state, force_plot=True)


def save_curves_plot(log_history: list[dict], path: Path, panels: list[tuple[str, list[str]]], title: str) -> None:
    """One PNG, one panel per (y label, metric names) with a line per metric: train values as lines, the same
    metric at evaluation ("eval_" + name) as dots. Panels with no values are left out; nothing is written before
    the first logged value."""
    series = []
    for ylabel, names in panels:
        lines = []
        for color, name in enumerate(names):  # a metric's validation dots take its training line's colour
            for key, style in ((name, "-"), (f"eval_{name}", "o--")):
                pts = [(h["step"], h[key]) for h in log_history if key in h]
                if pts:
                    lines.append((f"validation {name}" if key != name else name, style, f"C{color}", pts))
        if lines:
            series.append((ylabel, lines))
    if not series:
        return
    import io

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gptsmith.files import atomic_write_bytes

    fig, axes = plt.subplots(len(series), 1, figsize=(7, 2.6 * len(series)), sharex=True, squeeze=False)
    for ax, (ylabel, lines) in zip(axes[:, 0], series):
        for label, style, color, pts in lines:
            ax.plot(*zip(*pts), style, color=color, label=label, linewidth=1)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[-1, 0].set_xlabel("step")
    axes[0, 0].set_title(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(Path(path), buf.getvalue())
