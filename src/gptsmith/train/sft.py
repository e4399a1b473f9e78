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

import math
import time
from pathlib import Path

import torch

from gptsmith.config import ProjectConfig, save_config
from gptsmith.data.chat_formats import CHATTERBOT, Messages, conversation_hash, load_chat_data, split_conversations
from gptsmith.errors import InputError
from gptsmith.files import atomic_write_json
from gptsmith.model import read_lineage, save_model_dir
from gptsmith.tokenizer import encode_chat
# shared with dpo/kto (train/tuning.py); re-exported under the names sft has always had
from gptsmith.train.tuning import (PLAIN_CHAT_TEMPLATE, StopAfterMinutes, file_identity, latest_checkpoint,  # noqa: F401
                                   load_model, lora_config, prepare_chat_template, resolve_device,
                                   save_trained, start_run, what_the_run_bought)
from gptsmith.train.budget import training_verdict
from gptsmith.train.tuning import generation_config as _generation_config
from gptsmith.train.tuning import MetricsTrail, trainer_args

RUN_FILENAME = "sft_run.json"  # what a resumed run must match (data and base model)


def _load_base(model_id: str, cfg, device: str):
    return load_model(model_id, device, qlora=cfg.sft.qlora)


def _prefix_tokenize(tokenizer, messages: Messages) -> dict:
    """input_ids + labels for a template without generation markers (SmolLM2's and most pulled models' ChatML):
    an assistant turn's tokens are found by rendering prefixes. The turn is what the rendering of messages[:i+1]
    adds beyond the prompt that asks for it (messages[:i] + the generation prompt), up to and including the last
    control token it adds (`<|im_end|>`, `<|eot_id|>`, `</s>`, ...): the answer and the end token the model must
    learn to stop with. The template's glue after that token (ChatML's newline between turns) is never generated,
    so it is not trained. Message text never becomes a control token (encode_chat), so the end token found is the
    template's. Everything else (system prompt, user turns, role headers) is masked."""
    from gptsmith.tokenizer import control_tokens

    ids = encode_chat(tokenizer, messages).input_ids
    controls = {tokenizer.convert_tokens_to_ids(t) for t in control_tokens(tokenizer)}
    labels = [-100] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        turn = encode_chat(tokenizer, messages[: i + 1]).input_ids
        if ids[:len(turn)] != turn:
            raise InputError(f"the chat template of {tokenizer.name_or_path} renders earlier turns differently once "
                             "later ones follow, so gptsmith cannot tell which tokens are the assistant's. Fix: use "
                             "a template that marks answers with {% generation %} ... {% endgeneration %} "
                             "(chat_template.jinja in the model directory)")
        prompt = encode_chat(tokenizer, messages[:i], add_generation_prompt=True).input_ids if i else []
        start = 0  # the answer starts where the prompt and the turn diverge (a token may merge across the seam)
        while start < min(len(prompt), len(turn)) and prompt[start] == turn[start]:
            start += 1
        ends = [k for k in range(start, len(turn)) if turn[k] in controls]
        stop = ends[-1] + 1 if ends else len(turn)
        labels[start:stop] = ids[start:stop]
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
    return lora_config(cfg.sft)


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
    if s.qlora:
        from peft import prepare_model_for_kbit_training
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=s.gradient_checkpointing)
    args = SFTConfig(
        **trainer_args(s, out, device, val_ds is not None),
        max_length=s.max_seq_len, packing=s.packing, eval_packing=False,
        assistant_only_loss=False,  # the datasets come tokenised with their masks (_datasets); TRL builds labels
        train_sampling_strategy="group_by_length" if s.group_by_length and not s.packing else "random",
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


def _data_identity(data, loaded) -> dict:
    if str(data) == CHATTERBOT and not Path(data).exists():
        from importlib.metadata import version
        digest = conversation_hash([m for c in loaded.conversations for m in c])
        return {"path": CHATTERBOT, "package": f"chatterbot-corpus {version('chatterbot-corpus')}", "sha256": digest}
    return file_identity(data)


def sft(model: str, data, out, cfg: ProjectConfig, resume: bool = False) -> dict:
    """Fine-tune `model` (HF dir or hub id) on conversations `data` (file or 'chatterbot'); write OUT; return metrics."""
    from transformers.integrations import TensorBoardCallback
    from torch.utils.tensorboard import SummaryWriter

    s = cfg.sft
    out = Path(out)
    model_id = str(Path(model).resolve()) if Path(model).is_dir() else str(model)
    loaded = load_chat_data(data, on_error=cfg.data.on_error)
    train, val = split_conversations(loaded.conversations, s.val_fraction)
    identity = {"parent_model": model_id, "data": _data_identity(data, loaded)}
    print(f"sft: {len(train)} train / {len(val)} validation conversations ({loaded.format}; skipped {loaded.skipped}"
          + (f": {dict(loaded.problems)}" if loaded.problems else "") + f") from {data}")

    ckpt = start_run(out, identity, resume, RUN_FILENAME, "sft")
    save_config(cfg, out)

    writer = SummaryWriter(str(out / "runs"))
    trail = MetricsTrail(out, save_loss_plot)  # metrics.jsonl + loss.png while it trains
    trainer, info = build_trainer(model_id, train, val, out, cfg, callbacks=[TensorBoardCallback(writer), trail])
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
               "trainable_params": n_trainable, "total_params": n_total, **what_the_run_bought(trainer)}
    metrics["verdict"] = training_verdict(metrics)
    if trainer.eval_dataset is not None:
        metrics.update(assistant_metrics(trainer.model, trainer.processing_class, trainer.eval_dataset, s.batch_size))
        if before is not None:
            metrics.update(val_loss_before=before["val_loss"], val_bpb_before=before["val_bpb"])

    tokenizer = trainer.processing_class
    lineage = {"stage": "sft", **identity, "data_format": loaded.format, "mode": "qlora" if s.qlora else "lora" if s.lora else "full",
               "chat_template": info["chat_template"], "loss_mask": info["masking"], "config": cfg.model_dump(mode="json"),
               "metrics": metrics, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    save_trained(trainer.model, tokenizer, out, lineage, adapter=s.lora or s.qlora, model_id=model_id)
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
        raise InputError(f"{adapter}: no adapter_config.json; give the directory written by `gptsmith sft --lora` (or dpo/kto --lora)")
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
