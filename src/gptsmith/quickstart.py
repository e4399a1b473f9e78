"""`gptsmith quickstart`: every stage in order on the embedded defaults, no network, no GPU.

    OUT/data   prepared Python documentation (clean text, tokenizer, token shards)
    OUT/base   the pretrained base model (a standard Hugging Face directory)
    OUT/chat   the base model fine-tuned on the chatterbot-corpus English dialogs

The time budget (`--minutes`) is shared out between the stages; the model it makes is small and says so.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from gptsmith.config import ProjectConfig, save_config
from gptsmith.files import atomic_write_text

# Share of the budget each training stage gets; data preparation and samples take the rest (~1-1.5 min).
PRETRAIN_SHARE, SFT_SHARE = 0.7, 0.2
SAMPLE_PROMPTS = ["The list", "def ", "An exception"]
SAMPLE_QUESTIONS = ["Hello, how are you?", "What is your name?", "Do you like Python?"]


def _banner(text: str) -> None:
    print(f"\n=== {text} " + "=" * max(0, 70 - len(text)), flush=True)


def _smoke_corpus(out: Path) -> Path:
    """A small slice of the embedded corpus (pydoc topics only) so --smoke finishes in well under a minute."""
    import pydoc_data.topics

    path = out / "smoke_corpus.jsonl"
    texts = [t for t in pydoc_data.topics.topics.values() if len(t) > 200][:120]
    atomic_write_text(path, "".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def _user_keys(cfg: ProjectConfig) -> set[str]:
    """Dotted keys the user set in a config file or on the command line."""
    return {f"{name}.{key}" for name in cfg.model_fields_set for key in getattr(cfg, name).model_fields_set}


def _quickstart_config(cfg: ProjectConfig, minutes: float, smoke: bool) -> ProjectConfig:
    """Defaults sized for the time budget; any key the user set in a config file or override still wins."""
    if smoke:
        defaults = {"model.preset": "test", "tokenizer.vocab_size": 512,
                    "pretrain.max_steps": 30, "pretrain.eval_every": 15, "pretrain.save_every": 30,
                    "pretrain.seq_len": 64, "pretrain.batch_size": 8, "pretrain.warmup_steps": 5,
                    "sft.max_steps": 10, "sft.eval_every": 5, "sft.save_every": 10, "sft.max_seq_len": 128}
    else:
        defaults = {"tokenizer.vocab_size": 4096,
                    # the time budget stops pretraining; the LR schedule is stretched over that budget
                    "pretrain.max_steps": 100_000, "pretrain.max_minutes": minutes * PRETRAIN_SHARE,
                    "pretrain.seq_len": 256, "pretrain.batch_size": 16, "pretrain.eval_every": 100,
                    "pretrain.save_every": 200, "pretrain.warmup_steps": 50,
                    "sft.max_minutes": minutes * SFT_SHARE, "sft.epochs": 4, "sft.max_seq_len": 256,
                    "sft.lr": 1e-3, "sft.batch_size": 16}
    user = _user_keys(cfg)
    tree = cfg.model_dump()
    for key, value in defaults.items():
        if key not in user:
            section, leaf = key.split(".")
            tree[section][leaf] = value
    return ProjectConfig.model_validate(tree)


def quickstart(out: str | Path, cfg: ProjectConfig, minutes: float = 8.0, smoke: bool = False) -> dict:
    from gptsmith.data.pipeline import prepare
    from gptsmith.engine import Engine, SamplingParams
    from gptsmith.train.pretrain import pretrain
    from gptsmith.train.sft import sft

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = _quickstart_config(cfg, minutes, smoke)
    save_config(cfg, out)
    t0 = time.perf_counter()
    results: dict = {}

    _banner("1/4 data: Python's own documentation -> clean text, tokenizer, token shards")
    inputs = [str(_smoke_corpus(out))] if smoke else ["python-docs"]
    manifest = prepare(inputs, out / "data", cfg)
    results["bytes_per_token"] = manifest.get("bytes_per_token")

    _banner("2/4 pretrain: a small GPT from scratch (next-token prediction)")
    base = pretrain(out / "data", out / "base", cfg)
    results["base"] = base
    print(f"validation bits-per-byte: {base.get('val_bpb_before', float('nan')):.3f} before training -> "
          f"{base['val_bpb']:.3f} after")

    _banner("3/4 fine-tune: chatterbot-corpus English dialogs, loss on the assistant's turns only")
    chat = sft(out / "base", "chatterbot", out / "chat", cfg)
    results["chat"] = chat
    print(f"chat validation bits-per-byte (assistant tokens): {chat.get('val_bpb_before', float('nan')):.3f} "
          f"before fine-tuning -> {chat['val_bpb']:.3f} after")

    _banner("4/4 samples")
    params = SamplingParams(max_new_tokens=24 if smoke else 48, temperature=0.7, top_k=40, top_p=0.95,
                            repetition_penalty=1.1, seed=0)
    engine = Engine.load(out / "base", device="cpu")
    for prompt, c in zip(SAMPLE_PROMPTS, engine.generate([engine.encode(p) for p in SAMPLE_PROMPTS], params)):
        print(f"[base] {prompt}{c.text}".replace("\n", " ")[:200])
    engine = Engine.load(out / "chat", device="cpu")
    prompts = [engine.encode_chat([{"role": "user", "content": q}], params.max_new_tokens) for q in SAMPLE_QUESTIONS]
    for q, c in zip(SAMPLE_QUESTIONS, engine.generate(prompts, params)):
        print(f"[chat] you: {q}\n       bot: {c.text.strip()}")

    results["minutes"] = round((time.perf_counter() - t0) / 60, 2)
    _banner(f"done in {results['minutes']} min")
    print("This model is tiny (a few million parameters, minutes of CPU): it babbles Python-doc-like text and "
          "chats in short phrases. The README shows the one-GPU recipe for a real one.\n")
    print(f"Chat with it:   gptsmith chat --model {out / 'chat'}")
    print(f"Serve it:       gptsmith serve --model {out / 'chat'}")
    return results
