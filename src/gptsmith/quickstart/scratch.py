"""`gptsmith quickstart --from-scratch`: every stage in order on the embedded defaults, no network, no GPU, to see
how a GPT is made.

    OUT/data   prepared Python documentation (clean text, tokenizer, token shards)
    OUT/base   the pretrained base model (a standard Hugging Face directory)
    OUT/chat   the base model fine-tuned on the chatterbot-corpus English dialogs
    OUT/pydocs the Python reference topics as .rst files, OUT/index their retrieval index (rag), and
    OUT/assistant.yaml an assistant over the chat model that answers Python questions with its sources
    OUT/{base,chat}/eval  the built-in suites' results (Python knowledge, chat sanity) and, beside each model,
    report.md + report.html: its report card

Its time budget (`--minutes`) is shared out between the stages; the model it makes is small and says so.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import yaml

from gptsmith.config import ProjectConfig, save_config
from gptsmith.files import atomic_write_text
from gptsmith.quickstart.common import banner as _banner
from gptsmith.quickstart.common import write_pydocs

# Share of the budget each training stage gets; data preparation and samples take the rest (~1-1.5 min).
PRETRAIN_SHARE, SFT_SHARE = 0.7, 0.2
SAMPLE_PROMPTS = ["The list", "def ", "An exception"]
SAMPLE_QUESTIONS = ["Hello, how are you?", "What is your name?", "Do you like Python?"]
ASSISTANT_QUESTION = "How do I catch an exception?"
# --smoke indexes only these reference topics so the embedding takes seconds; a full run indexes all ~80.
EVAL_LIMIT, EVAL_LIMIT_SMOKE = 100, 8  # items per suite the last step scores: a quick reading, not the full suite
SMOKE_TOPICS = ["try", "exceptions", "raise", "for", "while", "if", "import", "lambda", "with", "class"]


def _smoke_corpus(out: Path) -> Path:
    """A small slice of the embedded corpus (pydoc topics only) so --smoke finishes in well under a minute."""
    import pydoc_data.topics

    path = out / "smoke_corpus.jsonl"
    texts = [t for t in pydoc_data.topics.topics.values() if len(t) > 200][:120]
    atomic_write_text(path, "".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def _assistant(out: Path, smoke: bool) -> Path:
    """Index the Python docs and write an assistant over the chat model: small chunks, because the tiny model's
    context (512 tokens) must hold the system prompt, the sources and the question."""
    from gptsmith.config import RagConfig
    from gptsmith.rag.index import build_index

    docs = write_pydocs(out / "pydocs", SMOKE_TOPICS if smoke else None)
    build_index([str(docs)], out / "index", RagConfig(chunk_tokens=64, chunk_overlap=8))
    profile = {"name": "pydocs", "model": str((out / "chat").resolve()),
               "system_prompt": "You answer questions about Python and cite your sources.",
               "rag": {"index": str((out / "index").resolve()), "top_k": 3},
               "sampling": {"temperature": 0.7, "max_tokens": 24 if smoke else 48}}
    path = out / "assistant.yaml"
    atomic_write_text(path, "# gptsmith ask --assistant " + str(path) + " \"QUESTION\"\n" +
                      yaml.safe_dump(profile, sort_keys=False))
    return path


def _evaluate(out: Path, smoke: bool) -> dict:
    """Both models on the built-in suites (`gptsmith eval`): the base model on Python knowledge, the chat model on
    that and on chat sanity; results go to MODEL/eval/, and each report card is written again to show them."""
    from gptsmith.eval.report import write_report
    from gptsmith.eval.results import print_result
    from gptsmith.eval.run import evaluate
    from gptsmith.eval.targets import open_target

    scores = {}
    for name, suites in (("base", ["python-docs"]), ("chat", ["python-docs", "chat-sanity"])):
        target = open_target(model=out / name, device="cpu")
        try:
            result = evaluate(target, suites, out_dir=out / name / "eval", limit=EVAL_LIMIT_SMOKE if smoke else
                              EVAL_LIMIT, max_tokens=32 if smoke else 64, update_card=False)  # written below
        finally:
            target.close()
        print_result(result)
        scores[name] = {s["name"]: s["metrics"][s["primary"]] for s in result["suites"]}
        write_report(out / name, samples=0 if smoke else 2, device="cpu")
    return scores


def _user_keys(cfg: ProjectConfig) -> set[str]:
    """Dotted keys the user set in a config file or on the command line."""
    return {f"{name}.{key}" for name in cfg.model_fields_set for key in getattr(cfg, name).model_fields_set}


def _quickstart_config(cfg: ProjectConfig, minutes: float, smoke: bool) -> ProjectConfig:
    """Defaults sized for the time budget; any key the user set in a config file or override still wins."""
    if smoke:
        defaults = {"model.preset": "test", "model.max_seq_len": 512, "tokenizer.vocab_size": 512,
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


def from_scratch(out: str | Path, cfg: ProjectConfig, minutes: float = 8.0, smoke: bool = False) -> dict:
    """`gptsmith quickstart --from-scratch`: data -> tokenizer -> pretrain -> sft -> samples -> assistant -> eval."""
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

    _banner("1/6 data: Python's own documentation -> clean text, tokenizer, token shards")
    inputs = [str(_smoke_corpus(out))] if smoke else ["python-docs"]
    manifest = prepare(inputs, out / "data", cfg)
    results["bytes_per_token"] = manifest.get("bytes_per_token")

    _banner("2/6 pretrain: a small GPT from scratch (next-token prediction)")
    base = pretrain(out / "data", out / "base", cfg)
    results["base"] = base
    print(f"validation bits-per-byte: {base.get('val_bpb_before', float('nan')):.3f} before training -> "
          f"{base['val_bpb']:.3f} after")

    _banner("3/6 fine-tune: chatterbot-corpus English dialogs, loss on the assistant's turns only")
    chat = sft(out / "base", "chatterbot", out / "chat", cfg)
    results["chat"] = chat
    print(f"chat validation bits-per-byte (assistant tokens): {chat.get('val_bpb_before', float('nan')):.3f} "
          f"before fine-tuning -> {chat['val_bpb']:.3f} after")

    _banner("4/6 samples")
    params = SamplingParams(max_new_tokens=24 if smoke else 48, temperature=0.7, top_k=40, top_p=0.95,
                            repetition_penalty=1.1, seed=0)
    engine = Engine.load(out / "base", device="cpu")
    for prompt, c in zip(SAMPLE_PROMPTS, engine.generate([engine.encode(p) for p in SAMPLE_PROMPTS], params)):
        print(f"[base] {prompt}{c.text}".replace("\n", " ")[:200])
    engine = Engine.load(out / "chat", device="cpu")
    prompts = [engine.encode_chat([{"role": "user", "content": q}], params.max_new_tokens) for q in SAMPLE_QUESTIONS]
    for q, c in zip(SAMPLE_QUESTIONS, engine.generate(prompts, params)):
        print(f"[chat] you: {q}\n       bot: {c.text.strip()}")

    _banner("5/6 assistant: the Python docs indexed for retrieval, answers with numbered sources")
    from gptsmith.assist.cli import ask
    assistant = _assistant(out, smoke)
    print(f"you: {ASSISTANT_QUESTION}\nbot: ", end="", flush=True)
    reply = ask(assistant, ASSISTANT_QUESTION, device="cpu")
    results["assistant"] = {"question": ASSISTANT_QUESTION, "answer": reply.answer,
                            "sources": [h.chunk.citation() for h in reply.sources]}

    _banner("6/6 evaluate: Python knowledge (multiple choice) and chat sanity, then the report cards")
    results["eval"] = _evaluate(out, smoke)

    results["minutes"] = round((time.perf_counter() - t0) / 60, 2)
    _banner(f"done in {results['minutes']} min")
    from gptsmith.train.budget import training_verdict

    # what the runs bought: a busy machine can cut a time-budgeted run to a fraction of its plan, and the message
    # about the model must say so instead of promising what a full run gives
    verdicts = [training_verdict(base, stage="pretrain"), training_verdict(chat, stage="fine-tune")]
    for line in verdicts:
        print(line)
    results["verdicts"] = verdicts
    print("\nThis model is tiny (a few million parameters, minutes of CPU): at best it writes Python-doc-like text and "
          "chats in short phrases. `gptsmith quickstart` (no --from-scratch) builds an assistant on a pretrained "
          "model instead; the README shows the one-GPU recipe for a real one trained from scratch.\n")
    print("The assistant's prose is as weak as the model; its sources come from retrieval and are the part to trust.")
    print(f"Chat with it:   gptsmith chat --model {out / 'chat'}")
    print(f"Ask the docs:   gptsmith ask --assistant {assistant} \"{ASSISTANT_QUESTION}\"")
    print(f"Serve it:       gptsmith serve --model {out / 'chat'}")
    print(f"Its report:     {out / 'chat' / 'report.html'}")
    return results
