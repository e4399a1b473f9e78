"""`gptsmith chat`: a multi-turn terminal chat that streams the model's answers.

Ctrl-C while an answer streams stops it; the part already shown is kept as the assistant's turn (so the
model sees what the user saw). Ctrl-C or Ctrl-D at the prompt leaves. Plain input() with readline gives line
editing and history and works through any terminal, pipes and pseudo-terminals included.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from gptsmith.files import atomic_write_text

if TYPE_CHECKING:
    from gptsmith.engine import Engine, SamplingParams


def __getattr__(name: str):
    # gptsmith.engine imports torch and transformers (seconds): `chat --assistant` over a backend URL needs
    # neither, so the engine is imported when a local model is chatted with (or when these names are asked for)
    if name in ("Engine", "SamplingParams"):
        import gptsmith.engine
        return getattr(gptsmith.engine, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

HELP = """commands:
  /reset         forget the conversation (the system prompt stays)
  /system TEXT   set the system prompt (/system alone shows it)
  /save FILE     write the conversation as OpenAI messages: FILE.jsonl (one {"messages": [...]} line) or FILE.json
  /help          this help
  /quit          leave (Ctrl-D or Ctrl-C at the prompt also leave; Ctrl-C during an answer stops the answer)"""

USER_PROMPT = "you> "
BOT_PROMPT = "bot> "


def save_conversation(path: str | Path, messages: list[dict]) -> None:
    path = Path(path)
    if path.suffix == ".jsonl":
        atomic_write_text(path, json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
    else:
        atomic_write_text(path, json.dumps({"messages": messages}, ensure_ascii=False, indent=2) + "\n")


def _answer(engine: Engine, messages: list[dict], params: SamplingParams, out) -> str:
    """Stream one answer to `out`; returns the text shown (all of it, or the part before Ctrl-C)."""
    shown: list[str] = []
    stream = engine.stream(engine.encode_chat(messages, params.max_new_tokens), params)
    try:
        out.write(BOT_PROMPT)
        out.flush()
        for event in stream:
            out.write(event.text)
            out.flush()
            shown.append(event.text)
        out.write("\n")
    except KeyboardInterrupt:
        stream.close()
        out.write(" [stopped]\n")
    out.flush()
    return "".join(shown)


def _assistant_replier(path, device: str, show_reasoning: bool, out):
    """`chat --assistant FILE`: each answer from the assistant (its sources after it); returns (reply function,
    banner). The reasoning of a chain-of-thought answer is kept in the saved turn's "reasoning" field."""
    from gptsmith.assist.answer import answer, open_model
    from gptsmith.assist.cli import StreamPrinter, print_sources
    from gptsmith.assist.prompt import Assistant

    assistant = Assistant.open(path)
    model = open_model(assistant.profile, device)

    def reply(convo: list[dict]) -> dict:
        printer = StreamPrinter(out, show_reasoning)
        out.write(BOT_PROMPT)
        r = answer(assistant, model, convo, on_text=printer, interruptible=True)
        printer.end(r)
        print_sources(r, out)
        return {"role": "assistant", "content": r.answer, **({"reasoning": r.reasoning} if r.reasoning else {})}

    return reply, f"chatting with assistant {assistant.name} (context {model.max_context} tokens)"


def run_chat(model_dir, gen_cfg, system: str | None = None, device: str = "auto", assistant=None,
             show_reasoning: bool = False) -> None:
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    out = sys.stdout
    if assistant is not None:
        reply, banner = _assistant_replier(assistant, device, show_reasoning, out)
    else:
        from gptsmith.engine import Engine, SamplingParams

        engine = Engine.load(model_dir, device=device)
        params = engine.resolve(SamplingParams.from_config(gen_cfg))  # unset: the model's generation_config.json
        banner = f"chatting with {model_dir} (context {engine.max_context} tokens)"

        def reply(convo: list[dict]) -> dict:
            return {"role": "assistant", "content": _answer(engine, convo, params, out)}
    messages: list[dict] = []
    print(f"{banner}. /help for commands, Ctrl-D to leave.")
    while True:
        try:
            line = input(USER_PROMPT)
        except (EOFError, KeyboardInterrupt):
            print()
            return
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            cmd, _, arg = text.partition(" ")
            arg = arg.strip()
            if cmd in ("/quit", "/exit"):
                return
            elif cmd == "/help":
                print(HELP)
            elif cmd == "/reset":
                messages = []
                print("[conversation cleared]")
            elif cmd == "/system":
                if arg:
                    system = arg
                    print("[system prompt set]")
                else:
                    print(f"[system prompt: {system!r}]")
            elif cmd == "/save":
                if not arg:
                    print("usage: /save FILE.jsonl or /save FILE.json")
                    continue
                full = ([{"role": "system", "content": system}] if system else []) + messages
                try:
                    save_conversation(arg, full)
                except OSError as e:
                    print(f"[could not save to {arg}: {e.strerror}]")
                else:
                    print(f"[saved {len(full)} messages to {arg}]")
            else:
                print(f"unknown command {cmd}; /help lists them")
            continue
        messages.append({"role": "user", "content": line})
        convo = ([{"role": "system", "content": system}] if system else []) + messages
        try:
            turn = reply(convo)
        except ValueError as e:  # e.g. the message alone does not fit the context
            messages.pop()
            print(f"\n[error: {e}]")
            continue
        messages.append(turn)
