"""`gptsmith ask`: one question to an assistant, the answer streamed, then its numbered sources."""

from __future__ import annotations

import json
import sys

from gptsmith.assist.answer import Reply, answer, format_dropped, open_model, source_dicts
from gptsmith.assist.profile import load_assistant
from gptsmith.assist.prompt import Assistant
from gptsmith.assist.reasoning import NO_ANSWER

EMPTY_ANSWER = "[the model gave an empty answer]"


def print_sources(reply: Reply, out=None) -> None:
    out = out or sys.stdout
    if reply.sources:
        out.write("\nSources:\n" + "".join(f"[{s['n']}] {s['citation']}\n" for s in source_dicts(reply.sources)))
    if format_dropped(reply.dropped):
        out.write(f"[to fit the model's context, left out: {format_dropped(reply.dropped)}]\n")
    out.flush()


class StreamPrinter:
    """Writes the answer as it streams; the reasoning too (before it, labelled) when asked to show it."""

    def __init__(self, out, show_reasoning: bool):
        self.out, self.show_reasoning = out, show_reasoning
        self.kind = None

    def __call__(self, kind: str, text: str) -> None:
        if kind == "reasoning" and not self.show_reasoning:
            return
        if kind != self.kind:
            self.out.write(("\n\n" if self.kind else "") + ("Reasoning: " if kind == "reasoning" else
                                                            "Answer: " if self.show_reasoning else ""))
            self.kind = kind
        self.out.write(text)
        self.out.flush()

    def end(self, reply: Reply) -> None:
        if not reply.answer:
            self.out.write(("\n" if self.kind else "") + (NO_ANSWER if reply.reasoning else EMPTY_ANSWER))
        self.out.write("\n")
        self.out.flush()


def ask(profile_path, question: str, show_reasoning: bool = False, as_json: bool = False,
        device: str = "auto", out=None) -> Reply:
    out = out or sys.stdout
    profile = load_assistant(profile_path)
    assistant = Assistant.open(profile)
    model = open_model(profile, device)
    printer = None if as_json else StreamPrinter(out, show_reasoning)
    reply = answer(assistant, model, [{"role": "user", "content": question}], on_text=printer)
    if as_json:
        out.write(json.dumps({"assistant": profile.name, "question": question, "answer": reply.answer,
                              "reasoning": reply.reasoning if reply.reasoning_mode else None,
                              "sources": source_dicts(reply.sources), "dropped": reply.dropped,
                              "finish_reason": reply.finish_reason, "prompt_tokens": reply.prompt_tokens},
                             ensure_ascii=False, indent=2) + "\n")
        return reply
    printer.end(reply)
    print_sources(reply, out)
    return reply
