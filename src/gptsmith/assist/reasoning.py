"""Chain of thought: ask the model to reason step by step before its answer, and keep the reasoning apart.

The format is two plain-text labels, which a small model follows from one instruction (and which are no special
tokens, so message text can never forge a turn):

    Reasoning: a list is mutable, a tuple is not, so ...
    Answer: use a tuple.

How a reply is split (the same rules whether it arrives whole, `split_reasoning`, or piece by piece while it
streams, `ReasoningFilter`):
- leading whitespace is ignored; labels are case-insensitive and may be bold (`**Reasoning:**`);
- a reply that starts with `Reasoning:` is reasoning up to the first line that starts with `Answer:`; the rest is
  the answer. Reasoning models' `<think> ... </think>` works the same way (served through backend_url);
- a reply that starts with `Answer:` is all answer (the label removed);
- a reply that starts with neither is all answer: the model did not follow the format, nothing is hidden;
- reasoning that never reaches `Answer:` (cut by max_tokens) has an empty answer: callers show NO_ANSWER.
"""

from __future__ import annotations

import re

COT_INSTRUCTION = ("Think step by step before you answer. First write 'Reasoning:' followed by your reasoning, "
                   "then on a new line write 'Answer:' followed by the final answer only.")
NO_ANSWER = "[the model reasoned but gave no answer (it ran out of tokens?); show the reasoning to see it]"

_START = re.compile(r"\s*(?:[*#]+\s*)?(reasoning|answer)\s*\**\s*:\**[ \t]*|\s*<think>", re.I)
_ANSWER_LINE = re.compile(r"^[ \t]*(?:[*#]+[ \t]*)?answer[ \t]*\**[ \t]*:\**[ \t]*", re.I | re.M)
_THINK_END = "</think>"
_LABELS = ("reasoning:", "answer:", "<think>")


def _could_start_label(buffer: str) -> bool:
    """True while the reply so far could still become a starting label ('Reas' may be 'Reasoning:')."""
    bare = re.sub(r"[\s*#]", "", buffer).lower()
    return len(bare) < 12 and any(label.startswith(bare) for label in _LABELS)


class ReasoningFilter:
    """Splits a streamed reply into reasoning and answer as it arrives. `push(piece)` returns the new
    `[("reasoning" | "answer", text), ...]` parts; `finish()` returns what was held back. Text that could still be
    a label is held back (at most one line), so a client can hide the reasoning and show the answer as it
    streams; `answer_started` says when the answer part has begun."""

    def __init__(self) -> None:
        self.state = "start"  # start -> reasoning (label | think) -> answer
        self.think = False
        self.buffer = ""
        self.reasoning = ""
        self.answer = ""

    @property
    def answer_started(self) -> bool:
        return self.state == "answer"

    def _emit(self, kind: str, text: str, out: list) -> None:
        if kind == "answer" and not self.answer:
            text = text.lstrip()  # the answer starts at its first visible character
        if not text:
            return
        if kind == "answer":
            self.answer += text
        else:
            self.reasoning += text
        out.append((kind, text))

    def push(self, piece: str) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        self.buffer += piece
        self._advance(out, final=False)
        return out

    def finish(self) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        self._advance(out, final=True)
        if self.buffer:
            self._emit("answer" if self.state in ("start", "answer") else "reasoning", self.buffer, out)
            self.buffer = ""
        return out

    def _advance(self, out: list, final: bool) -> None:
        if self.state == "start":
            match = _START.match(self.buffer)
            if match is None and not final and _could_start_label(self.buffer):
                return  # wait: 'Reas' may still become 'Reasoning:'
            if match is None:
                self.state = "answer"
            elif match.group(1) and match.group(1).lower() == "answer":
                self.state, self.buffer = "answer", self.buffer[match.end():]
            else:
                self.state, self.think, self.buffer = "reasoning", match.group(1) is None, self.buffer[match.end():]
        if self.state == "reasoning":
            self._reasoning(out, final)
        if self.state == "answer" and self.buffer:
            self._emit("answer", self.buffer, out)
            self.buffer = ""

    def _reasoning(self, out: list, final: bool) -> None:
        if self.think:
            at = self.buffer.find(_THINK_END)
            if at >= 0:
                self._emit("reasoning", self.buffer[:at], out)
                self.state, self.buffer = "answer", self.buffer[at + len(_THINK_END):]
            elif not final:
                keep = len(_THINK_END) - 1  # the tail could be the start of '</think>'
                self._emit("reasoning", self.buffer[:-keep], out)
                self.buffer = self.buffer[-keep:]
            return
        match = _ANSWER_LINE.search(self.buffer)
        if match is not None:
            self._emit("reasoning", self.buffer[:match.start()], out)
            self.state, self.buffer = "answer", self.buffer[match.end():]
        elif not final:
            cut = self.buffer.rfind("\n") + 1  # the unfinished last line may still become 'Answer:'
            self._emit("reasoning", self.buffer[:cut], out)
            self.buffer = self.buffer[cut:]


def split_reasoning(text: str) -> tuple[str, str]:
    """(reasoning, answer) of a whole reply, by the rules in this module's docstring; both stripped. A reply in
    no chain-of-thought format is ("", reply); reasoning with no answer is (reasoning, "")."""
    f = ReasoningFilter()
    f.push(text)
    f.finish()
    return f.reasoning.strip(), f.answer.strip()
