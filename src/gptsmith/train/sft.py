"""Supervised fine-tuning on conversations, loss on the assistant's tokens only: full, LoRA or QLoRA.

TRL's SFTTrainer does the work: labels from assistant masks (tokenizer.encode_chat computes them from the
`{% generation %}` markers in the template, keeping message text text), packing, PEFT wrapping, evaluation,
TensorBoard logging, checkpoints and exact resume (model, optimizer, scheduler, RNG, data position). What is ours
is the glue a user would otherwise write by hand: reading any conversation format, giving a model without a chat
template one, CPU-sane defaults, an exact assistant-token val loss and bits-per-byte, a loss plot, lineage,
atomic output.

Output (OUT):
  full fine-tune: a standard HF model dir (config.json, model.safetensors, tokenizer, chat template, generation config)
  --lora/--qlora: a PEFT adapter dir (adapter_config.json, adapter_model.safetensors, tokenizer + chat template);
                  `gptsmith merge-lora --adapter OUT --out MERGED` turns it into a plain model dir.
  both: gptsmith.yaml (effective config), gptsmith_lineage.json, loss.png, runs/ (TensorBoard), checkpoints/.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from gptsmith.config import ProjectConfig, save_config
from gptsmith.data.chat_formats import CHATTERBOT, Messages, conversation_hash, load_chat_data, split_conversations
from gptsmith.errors import InputError
from gptsmith.files import atomic_write_json, atomic_write_text, sha256_file, write_dir
from gptsmith.model import LINEAGE_FILENAME, default_generation_config, read_lineage, save_model_dir
from gptsmith.tokenizer import ASSISTANT, CHAT_TEMPLATE, END_OF_TURN, PAD, SYSTEM, USER, encode_chat

RUN_FILENAME = "sft_run.json"  # what a resumed run must match (data and base model)


def resolve_device(device: str) -> str:
    from gptsmith.device import select_device
    return str(select_device(device, setting="sft.device"))


def _load_base(model_id: str, cfg, device: str):
    """Model in float32 (TRL's default too: mixed precision autocasts from fp32 master weights), or 4-bit for QLoRA."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    s = cfg.sft
    kwargs = {"dtype": torch.float32}
    if s.qlora:
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
       (Llama 3, Qwen 2.5/3, Gemma, Phi-3, ...); otherwise we mask by rendering each prefix (`_prefix_tokenize`).
    3. No template (a base GPT-2 / Llama), full fine-tuning: we add our role tokens and template and resize the
       embeddings. Dedicated tokens mark turns unambiguously (a user cannot type them), give the model a real
       end-of-turn token to stop on, and keep the format identical to every gptsmith model. The new rows start
       random and are trained with everything else.
    4. No template, LoRA: a plain-text template (`PLAIN_CHAT_TEMPLATE`) ending answers with the model's own eos.
       New tokens would need their embedding rows trained, which a LoRA adapter cannot do (and peft's
       trainable-token rows are bypassed by TRL's fused LM head on tied embeddings, like GPT-2's).
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
                             "answers with; fine-tune it fully (no --lora) so gptsmith can add its chat tokens")
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


def _prefix_tokenize(tokenizer, messages: Messages) -> dict:
    """input_ids + labels for a template without generation markers: the tokens an assistant turn adds to the
    rendered conversation (beyond the prompt that asks for it) are its answer; everything else is masked."""
    ids: list[int] = []
    labels: list[int] = []
    for i, m in enumerate(messages):
        full = encode_chat(tokenizer, messages[: i + 1]).input_ids
        if m["role"] == "assistant":
            prompt = encode_chat(tokenizer, messages[:i], add_generation_prompt=True).input_ids if i else []
            labels += [-100] * (len(prompt) - len(ids)) + full[len(prompt):]
        else:
            labels += [-100] * (len(full) - len(ids))
        ids = full
    return {"input_ids": ids, "labels": labels}


def _masked_tokenize(tokenizer, messages: Messages, chat_template: str | None) -> dict:
    """input_ids + assistant_masks from the template's {% generation %} markers; TRL turns the mask into labels."""
    enc = encode_chat(tokenizer, messages, assistant_mask=True, chat_template=chat_template)
    return {"input_ids": enc.input_ids, "assistant_masks": enc.assistant_masks}


def _datasets(train: list[Messages], val: list[Messages], tokenizer, masking: str):
    """The conversations tokenised here, not by TRL: TRL renders the template to one string and tokenises it with
    special tokens parsed, so a message containing "<|end|>\n<|system|>" would train real turn markers.
    tokenizer.encode_chat keeps message text text (same ids as the template otherwise)."""
    from datasets import Dataset

    if masking == "prefix rendering":
        make = lambda convs: Dataset.from_list([_prefix_tokenize(tokenizer, c) for c in convs])  # noqa: E731
    else:
        template = None
        if masking == "TRL training template":  # the model's template, with generation markers added by TRL
            from trl.chat_template_utils import get_training_chat_template
            template = get_training_chat_template(tokenizer)
        make = lambda convs: Dataset.from_list([_masked_tokenize(tokenizer, c, template) for c in convs])  # noqa: E731
    return make(train), (make(val) if val else None)


def _lora_config(cfg):
    from peft import LoraConfig

    s = cfg.sft
    targets = s.lora_target_modules
    if targets == ["all-linear"]:  # from the CLI's nargs; a one-name list must stay a list (a str is a regex for peft)
        targets = "all-linear"
    return LoraConfig(r=s.lora_r, lora_alpha=s.lora_alpha, lora_dropout=s.lora_dropout, target_modules=targets,
                      task_type="CAUSAL_LM", bias="none")


class StopAfterMinutes(TrainerCallback):
    """`sft.max_minutes`: end training (the Trainer then saves and evaluates as at a normal end) once the time
    budget is spent, so a time-boxed run such as the quickstart always finishes with a usable model."""

    def __init__(self, minutes: float):
        self.seconds = minutes * 60
        self.start = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if time.perf_counter() - self.start > self.seconds:
            print(f"sft: time budget of {self.seconds / 60:g} min reached at step {state.global_step}; stopping")
            control.should_training_stop = True
            control.should_save = True
        return control


# Config fields with which a model transforms its logits after the LM head (Gemma's softcapping, Cohere's scale,
# ...): TRL's kernel applies them; models that have one keep it.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                     "logits_scaling")


COMPACT_LM_HEAD = "compact (assistant tokens only)"


def trl_has_fused_lm_head(model) -> bool:
    """Whether the installed TRL has the internals the compact head plugs into: `FusedCausalLMOutput`, and a model
    forward that SFTTrainer patched to take `fused_lm_head=` (`add_fused_lm_head`). TRL's main branch has neither
    (its SFTTrainer takes the loss from the model's own forward). Detected on the objects themselves, not from a
    version number, so any TRL that has them gets the speed-up and any other trains on TRL's own path."""
    import inspect

    try:
        from trl.trainer.utils import FusedCausalLMOutput  # noqa: F401
    except ImportError:
        return False
    # TRL's patched forward wraps the model's signature (functools.wraps); its own parameters are the wrapper's
    return "fused_lm_head" in inspect.signature(model.forward, follow_wrapped=False).parameters


def use_compact_lm_head(model) -> bool:
    """On CPU (and MPS) score only the assistant tokens, with the model's own LM head and torch's cross-entropy.

    TRL's SFTTrainer gives the model a fused LM head (`add_fused_lm_head`) so the (tokens x vocab) logits are never
    materialised. On CUDA its Triton kernel scores only the positions that carry loss. Without Triton it scores every
    position, padding and prompt included (so shapes stay fixed for XLA-like backends), and folds the tiles with
    a dozen elementwise torch passes, recomputing the projection in backward: on the `tiny` preset that head was
    ~40% of a CPU training step (benchmarks/bench_sft.py). Here the same `fused_lm_head=True` call runs the
    backbone, projects only the positions whose label is not -100 and scores them with `F.cross_entropy`.
    TRL's compute_loss is untouched, so the loss (summed over assistant tokens, divided by their count or by
    `num_items_in_batch`), the entropy / mean_token_accuracy metrics and DDP wrapping are the same; logits exist
    only for the assistant tokens, never more memory than the model's plain forward. Returns whether it applied.
    """
    import functools
    import types

    if not trl_has_fused_lm_head(model):
        return False
    from trl.trainer.utils import FusedCausalLMOutput

    text_config = model.config.get_text_config()
    if any(getattr(text_config, k, None) is not None for k in _LOGIT_TRANSFORMS) or \
            getattr(text_config, "output_router_logits", False):
        return False  # logit transforms and MoE aux losses: TRL's kernel handles them
    trl_forward = model.forward  # TRL's fused forward; with fused_lm_head=False it is the model's own

    @functools.wraps(type(model).forward)  # generate() validates its kwargs against this signature
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        if not fused_lm_head or shift_labels is not None or kwargs.get("output_router_logits"):
            return trl_forward(*args, fused_lm_head=fused_lm_head, labels=labels, shift_labels=shift_labels,
                               num_items_in_batch=num_items_in_batch, **kwargs)
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state[:, :-1]
        labels = labels[:, 1:].to(hidden.device)
        mask = labels != -100
        target = labels[mask]
        # the module, not its weight: a LoRA adapter on lm_head (if targeted) takes part
        logp = self.get_output_embeddings()(hidden[mask]).float().log_softmax(-1)
        token_lp = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)  # what cross_entropy computes, logp kept
        with torch.no_grad():  # TRL's logged metrics, on the scored tokens only
            entropy = -(logp.exp() * logp).sum(-1)
            is_top1 = logp.argmax(-1) == target
        # masked_scatter keeps an all-masked micro-batch connected to the graph (a zero loss, not a backward error)
        log_probs = hidden.new_zeros(mask.shape, dtype=token_lp.dtype).masked_scatter(mask, token_lp)
        loss = -log_probs.sum() / (mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch)
        return FusedCausalLMOutput(loss=loss, log_probs=log_probs, label_mask=mask,
                                   entropy=torch.zeros_like(log_probs).masked_scatter(mask, entropy),
                                   is_top1=torch.zeros_like(mask).masked_scatter(mask, is_top1))

    model.forward = types.MethodType(forward, model)
    return True


def build_trainer(model_id: str, train: list[Messages], val: list[Messages], out: Path, cfg: ProjectConfig,
                  callbacks: list | None = None):
    """The SFTTrainer for this run (model loaded, template prepared, datasets tokenised with assistant masks)."""
    from trl import SFTConfig, SFTTrainer

    s = cfg.sft
    device = resolve_device(s.device)
    model, tokenizer = _load_base(model_id, cfg, device)
    info = prepare_chat_template(model, tokenizer, lora=s.lora or s.qlora)
    train_ds, val_ds = _datasets(train, val, tokenizer, info["masking"])
    cuda = device.startswith("cuda")
    bf16 = cuda and torch.cuda.is_bf16_supported()
    if s.qlora:
        from peft import prepare_model_for_kbit_training
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=s.gradient_checkpointing)
    args = SFTConfig(
        output_dir=str(out / "checkpoints"),
        num_train_epochs=s.epochs, max_steps=s.max_steps,
        per_device_train_batch_size=s.batch_size, per_device_eval_batch_size=s.batch_size,
        gradient_accumulation_steps=s.grad_accum,
        learning_rate=s.lr, lr_scheduler_type="cosine", warmup_steps=s.warmup_ratio, weight_decay=s.weight_decay,
        max_length=s.max_seq_len, packing=s.packing, eval_packing=False,
        assistant_only_loss=False,  # the datasets come tokenised with their masks (_datasets); TRL builds labels
        train_sampling_strategy="group_by_length" if s.group_by_length and not s.packing else "random",
        # no half precision on CPU (slow or unsupported there); bf16 autocast on GPUs that have it, else fp16
        bf16=bf16, fp16=cuda and not bf16, use_cpu=not cuda,
        activation_checkpointing=s.gradient_checkpointing,
        dataloader_num_workers=0, dataset_num_proc=None,
        eval_strategy="steps" if val_ds is not None else "no", eval_steps=s.eval_every,
        save_strategy="steps", save_steps=s.save_every, save_total_limit=s.keep_checkpoints,
        logging_steps=s.log_every, logging_first_step=True, report_to="none",
        seed=s.seed, data_seed=s.seed, disable_tqdm=False,
    )
    if s.max_minutes is not None:
        callbacks = [*(callbacks or []), StopAfterMinutes(s.max_minutes)]
    trainer = SFTTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=val_ds,
                         processing_class=tokenizer, peft_config=_lora_config(cfg) if s.lora or s.qlora else None,
                         callbacks=callbacks)
    info["lm_head"] = _choose_lm_head(trainer.model, device)
    print(f"sft: LM head: {info['lm_head']}")
    return trainer, info


def _choose_lm_head(model, device: str) -> str:
    """Apply the compact CPU head where it can run; returns which LM head path this run takes (for the log)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not trl_has_fused_lm_head(base):
        return "TRL standard (this TRL has no fused-LM-head internals for the compact CPU head)"
    if not (device == "cpu" or device.startswith("mps")):  # CUDA: TRL's Triton kernel is already compact
        return "TRL fused (its GPU kernel scores the assistant tokens only)"
    if use_compact_lm_head(base):
        return COMPACT_LM_HEAD
    return "TRL fused (the compact head does not apply: the model transforms its logits or routes experts)"


def latest_checkpoint(out: Path) -> Path | None:
    """The newest checkpoint that finished saving. The Trainer writes trainer_state.json last, so a checkpoint dir
    without a readable one was cut off by a kill and is skipped."""
    ckpts = []
    for d in (out / "checkpoints").glob("checkpoint-*"):
        try:
            json.loads((d / "trainer_state.json").read_text())
            ckpts.append((int(d.name.rsplit("-", 1)[1]), d))
        except (OSError, ValueError):
            continue
    return max(ckpts)[1] if ckpts else None


@torch.no_grad()
def assistant_metrics(model, tokenizer, dataset, batch_size: int = 8) -> dict:
    """Exact validation loss (nats per assistant token) and bits per byte of the assistant's text.

    bpb = total NLL / ln 2 / UTF-8 bytes of the assistant tokens; unlike loss it compares models with different
    tokenizers. Bytes come from decoding each contiguous run of trained tokens without special tokens, so the
    end-of-turn token adds its loss but no bytes (it has no text)."""
    from tqdm.auto import tqdm

    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows = sorted(({"input_ids": r["input_ids"], "labels": r["labels"]} for r in dataset), key=lambda r: len(r["input_ids"]))
    nll = n_tok = n_bytes = 0.0
    for i in tqdm(range(0, len(rows), batch_size), desc="val bpb", leave=False):
        batch = rows[i: i + batch_size]
        width = max(len(r["input_ids"]) for r in batch)
        ids = torch.tensor([r["input_ids"] + [pad] * (width - len(r["input_ids"])) for r in batch], device=device)
        att = torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in batch], device=device)
        lab = torch.tensor([r["labels"] + [-100] * (width - len(r["labels"])) for r in batch], device=device)
        logits = model(input_ids=ids, attention_mask=att).logits[:, :-1].float()
        target = lab[:, 1:]
        nll += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1),
                                                 ignore_index=-100, reduction="sum").item()
        n_tok += (target != -100).sum().item()
        for r in batch:
            span: list[int] = []
            for t in r["labels"][1:] + [-100]:
                if t != -100:
                    span.append(t)
                elif span:
                    n_bytes += len(tokenizer.decode(span, skip_special_tokens=True).encode("utf-8"))
                    span = []
    return {"val_loss": nll / max(n_tok, 1), "val_bpb": nll / math.log(2) / max(n_bytes, 1),
            "val_tokens": int(n_tok), "val_bytes": int(n_bytes)}


def save_loss_plot(log_history: list[dict], path: Path) -> None:
    from gptsmith.train.common import save_loss_plot as plot_losses
    plot_losses(path, train=[(h["step"], h["loss"]) for h in log_history if "loss" in h],
                val=[(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h],
                ylabel="loss (nats / assistant token)", title="supervised fine-tuning")


def _generation_config(model, tokenizer, model_id: str):
    """Keep the parent's generation settings (a foreign model's stop tokens), making sure the eos we trained stops it."""
    has_own = Path(model_id, "generation_config.json").is_file() or not Path(model_id).exists()
    gen = model.generation_config if has_own and model.generation_config is not None else default_generation_config(tokenizer)
    eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id] if gen.eos_token_id is not None else []
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
        gen.eos_token_id = [tokenizer.eos_token_id, *eos]
    if gen.pad_token_id is None:
        gen.pad_token_id = tokenizer.pad_token_id
    return gen


def _data_identity(data, loaded) -> dict:
    if str(data) == CHATTERBOT and not Path(data).exists():
        from importlib.metadata import version
        digest = conversation_hash([m for c in loaded.conversations for m in c])
        return {"path": CHATTERBOT, "package": f"chatterbot-corpus {version('chatterbot-corpus')}", "sha256": digest}
    return {"path": str(Path(data).resolve()), "sha256": sha256_file(data)}


def sft(model: str, data, out, cfg: ProjectConfig, resume: bool = False) -> dict:
    """Fine-tune `model` (HF dir or hub id) on conversations `data` (file or 'chatterbot'); write OUT; return metrics."""
    from transformers.integrations import TensorBoardCallback
    from torch.utils.tensorboard import SummaryWriter

    s = cfg.sft
    out = Path(out)
    model_id = str(Path(model).resolve()) if Path(model).is_dir() else str(model)
    ckpt = latest_checkpoint(out)
    if ckpt is not None and not resume:  # the same rule as pretrain: a user's checkpoints go only when asked
        raise InputError(f"{out} already holds checkpoints of a run (latest {ckpt.name}); pass --resume to continue "
                         "it, choose another --out, or pass --overwrite to delete them and start over")
    loaded = load_chat_data(data, on_error=cfg.data.on_error)
    train, val = split_conversations(loaded.conversations, s.val_fraction)
    identity = {"parent_model": model_id, "data": _data_identity(data, loaded)}
    print(f"sft: {len(train)} train / {len(val)} validation conversations ({loaded.format}; skipped {loaded.skipped}"
          + (f": {dict(loaded.problems)}" if loaded.problems else "") + f") from {data}")

    if resume:
        prev = json.loads((out / RUN_FILENAME).read_text()) if (out / RUN_FILENAME).is_file() else None
        if ckpt is None:
            print(f"sft: no finished checkpoint under {out / 'checkpoints'}; starting from the beginning")
        elif prev is not None and prev != identity:
            raise InputError(f"{out}: --resume with different data or base model than the run being resumed "
                             f"({prev['data']['path']} @ {prev['parent_model']}); use the same --data and --model, "
                             "or drop --resume to start over")
    if ckpt is None and (out / "checkpoints").exists():
        # only saves cut off by a kill (no trainer_state.json): nothing to resume, and the Trainer's checkpoint
        # rotation must not count them
        shutil.rmtree(out / "checkpoints")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / RUN_FILENAME, identity)
    save_config(cfg, out)

    writer = SummaryWriter(str(out / "runs"))
    trainer, info = build_trainer(model_id, train, val, out, cfg, callbacks=[TensorBoardCallback(writer)])
    n_trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in trainer.model.parameters())
    print(f"sft: {'LoRA' if s.lora or s.qlora else 'full'} fine-tuning, {n_trainable:,} of {n_total:,} parameters "
          f"trainable; chat template: {info['chat_template']}; loss mask: {info['masking']}"
          + (f"; resuming from {ckpt.name}" if ckpt else ""))
    before = None
    if trainer.eval_dataset is not None and ckpt is None:  # the baseline the fine-tune must beat
        before = assistant_metrics(trainer.model, trainer.processing_class, trainer.eval_dataset, s.batch_size)
    t0, cpu0 = time.perf_counter(), time.process_time()
    result = trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - cpu0
    writer.close()

    metrics = {"train_loss": result.training_loss, "steps": trainer.state.global_step, "train_seconds": round(seconds, 2),
               "train_cpu_seconds": round(cpu_seconds, 2),
               "train_conversations": len(train), "val_conversations": len(val), "skipped": loaded.skipped,
               "trainable_params": n_trainable, "total_params": n_total}
    if trainer.eval_dataset is not None:
        metrics.update(assistant_metrics(trainer.model, trainer.processing_class, trainer.eval_dataset, s.batch_size))
        if before is not None:
            metrics.update(val_loss_before=before["val_loss"], val_bpb_before=before["val_bpb"])
    save_loss_plot(trainer.state.log_history, out / "loss.png")
    from gptsmith.eval.report import history_records  # the curves in metrics.jsonl, as pretrain writes them
    atomic_write_text(out / "metrics.jsonl",
                      "".join(json.dumps(r) + "\n" for r in history_records(trainer.state.log_history)))

    tokenizer = trainer.processing_class
    lineage = {"stage": "sft", **identity, "data_format": loaded.format, "mode": "qlora" if s.qlora else "lora" if s.lora else "full",
               "chat_template": info["chat_template"], "loss_mask": info["masking"], "config": cfg.model_dump(mode="json"),
               "metrics": metrics, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if s.lora or s.qlora:
        def write(tmp: Path) -> None:
            trainer.model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            atomic_write_json(tmp / LINEAGE_FILENAME, lineage)
        write_dir(out, write)
    else:
        save_model_dir(trainer.model, tokenizer, out, lineage=lineage,
                       generation_config=_generation_config(trainer.model, tokenizer, model_id))
    atomic_write_json(out / "sft_metrics.json", metrics)
    shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}
    print(f"sft: wrote {out} {shown}")
    from gptsmith.eval.report import report_after_training
    report_after_training(out, device=s.device)
    return metrics


def merge_lora(adapter, out, base: str | None = None, cfg: ProjectConfig | None = None) -> Path:
    """Merge a LoRA adapter into its base model and save a plain HF model dir (tokenizer, chat template,
    generation config) that loads without peft; `cfg`, when given, is written beside it as gptsmith.yaml."""
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = Path(adapter)
    if not (adapter / "adapter_config.json").is_file():
        raise InputError(f"{adapter}: no adapter_config.json; give the directory written by `gptsmith sft --lora`")
    pcfg = PeftConfig.from_pretrained(str(adapter))
    base = base or pcfg.base_model_name_or_path
    lineage = read_lineage(adapter)
    tokenizer = AutoTokenizer.from_pretrained(str(adapter))
    try:
        model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    except OSError as e:
        raise InputError(f"{base}: cannot load the base model ({e}); pass --base DIR with the model the adapter "
                         "was trained on") from None
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    new_lineage = {**lineage, "stage": "merge-lora", "adapter": str(adapter.resolve()), "base": str(base)}
    save_model_dir(merged, tokenizer, out, lineage=new_lineage,
                   generation_config=_generation_config(merged, tokenizer, str(base)))
    if cfg is not None:
        save_config(cfg, out)
    print(f"merge-lora: wrote {out}")
    return Path(out)
