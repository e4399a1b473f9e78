"""The assistant's prompt, under one context budget.

What the model sees, in order:
1. one system message: the profile's system prompt (+ a system message the caller sent), the chain-of-thought
   instruction when reasoning is on, and the retrieved chunks as numbered sources ("[1] citation\\ntext") with an
   instruction to cite them as [n];
2. the few-shot examples most like the question, as earlier user/assistant turns (most similar last, nearest the
   question);
3. the conversation so far (history);
4. the question: the last user message, as sent.

Everything must fit `max_context - max_new_tokens` tokens (counted by the caller's `count_tokens`: the local
model's tokenizer, or an approximation for another server). When it does not, parts are dropped in this order,
one at a time, until it fits:
  1. the oldest history turns (a user turn with the answers after it, so history still starts with a user turn);
  2. then retrieved chunks, lowest ranked first (the others keep their numbers);
  3. then few-shot examples, least similar first.
The system prompt and the question are never cut: if they alone do not fit, `prepare` raises ContextError.
`AssistantPrompt.dropped` says how many of each were dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from gptsmith.assist.fewshot import Example, FewShotLibrary
from gptsmith.assist.profile import AssistantProfile
from gptsmith.assist.reasoning import COT_INSTRUCTION
from gptsmith.errors import InputError
from gptsmith.rag.types import Hit

CountTokens = Callable[[list[dict]], int]

SOURCES_HEADER = "Sources (cite them by number, like [1], after the sentence that uses them):"
NO_SOURCES = "No sources were found for this question; say so if you cannot answer from what you know."


class ContextError(InputError):
    """The system prompt and the question alone do not fit the model's context."""


@dataclass
class AssistantPrompt:
    messages: list[dict]  # what the model sees
    sources: list[Hit]  # numbered [1]..[n] in this order, as given to the model
    dropped: dict[str, int]  # {"history_turns": n, "chunks": n, "examples": n} dropped to fit the context
    sampling: dict  # the profile's sampling settings that are set (temperature, top_p, max_tokens, ...)
    reasoning: bool  # the chain-of-thought instruction is in the prompt: split the reply with split_reasoning
    examples: list[Example] = field(default_factory=list)  # the few-shot examples in the prompt
    n_tokens: int = 0  # the prompt's size by count_tokens


def approx_count_tokens(messages: list[dict]) -> int:
    """A tokenizer-free estimate for a model served elsewhere: a token per 3 characters, plus 6 a message for the
    chat template. English averages ~4 characters a token, so this errs high and the real prompt fits."""
    return sum(len(str(m.get("content") or "")) // 3 + 6 for m in messages) + 3


def format_sources(hits: list[Hit]) -> str:
    if not hits:
        return NO_SOURCES
    blocks = [f"[{i}] {hit.chunk.citation()}\n{hit.chunk.text.strip()}" for i, hit in enumerate(hits, 1)]
    return SOURCES_HEADER + "\n\n" + "\n\n".join(blocks)


def _split_messages(messages: list[dict]) -> tuple[str, list[dict], str]:
    """(the caller's system text, the history, the question) of a chat request."""
    if not messages:
        raise InputError("messages is empty; send at least one {'role': 'user', 'content': ...} message")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise InputError(f"messages[{i}] needs a role of system, user or assistant")
        if not isinstance(m.get("content"), str):
            raise InputError(f"messages[{i}].content must be a string")
    last = messages[-1]
    if last["role"] != "user" or not last["content"].strip():
        raise InputError("the last message must be the user's question (a non-empty user message)")
    system = "\n\n".join(m["content"] for m in messages[:-1] if m["role"] == "system" and m["content"].strip())
    history = [{"role": m["role"], "content": m["content"]} for m in messages[:-1] if m["role"] != "system"]
    return system, history, last["content"]


def _drop_oldest_turn(history: list[dict]) -> tuple[list[dict], int]:
    """History without its oldest turn: the first message and the assistant answers after it."""
    rest = history[1:]
    while rest and rest[0]["role"] == "assistant":
        rest = rest[1:]
    return rest, len(history) - len(rest)


class Assistant:
    """A profile with its retriever and few-shot library. Build it once, call `prepare` per request."""

    def __init__(self, profile: AssistantProfile, retriever=None, examples: FewShotLibrary | None = None):
        self.profile = profile
        self.retriever = retriever  # anything with .search(query, top_k, mode, rerank, min_score, sources)
        self.examples = examples

    @classmethod
    def open(cls, profile: AssistantProfile | str | Path) -> "Assistant":
        """Open the profile's index and few-shot file (loads the embedder once, shared by both)."""
        from gptsmith.assist.profile import load_assistant

        if not isinstance(profile, AssistantProfile):
            profile = load_assistant(profile)
        retriever, embedder = None, None
        if profile.rag is not None:
            from gptsmith.rag.retrieve import Retriever

            rerank = str(profile.rag.rerank) if profile.rag.rerank is not None else None
            retriever = Retriever.open(profile.rag.index, rerank=rerank)
            embedder = getattr(retriever, "embedder", None)
        examples = None
        if profile.few_shot is not None and profile.few_shot.k > 0:
            examples = FewShotLibrary.load(profile.few_shot.file, embedder)
            if retriever is not None:
                examples.query_vector = retriever.query_vector
        return cls(profile, retriever, examples)

    @property
    def name(self) -> str:
        return self.profile.name

    def retrieve(self, question: str) -> list[Hit]:
        rag = self.profile.rag
        if self.retriever is None or rag is None:
            return []
        # mode and rerank left None follow the index's recorded choice (Retriever.settings)
        return list(self.retriever.search(question, top_k=rag.top_k, mode=rag.mode,
                                          rerank=True if rag.rerank else None, min_score=rag.min_score,
                                          sources=rag.sources))

    def system_text(self, caller_system: str, hits: list[Hit] | None, reasoning: bool) -> str:
        parts = [self.profile.system_prompt.strip(), caller_system.strip()]
        if reasoning:
            parts.append(COT_INSTRUCTION)
        if hits is not None:  # None: the assistant has no index
            parts.append(format_sources(hits))
        return "\n\n".join(p for p in parts if p)

    def prepare(self, messages: list[dict], count_tokens: CountTokens, max_context: int, max_new_tokens: int,
                reasoning: bool | None = None) -> AssistantPrompt:
        """The prompt for answering the last user message of `messages`, fitted to the context (see module doc)."""
        reasoning = self.profile.chain_of_thought if reasoning is None else bool(reasoning)
        caller_system, history, question = _split_messages(messages)
        hits = self.retrieve(question)
        examples = self._examples(question, count_tokens)
        budget = max_context - max_new_tokens
        dropped = {"history_turns": 0, "chunks": 0, "examples": 0}
        with_index = self.retriever is not None and self.profile.rag is not None

        def build() -> list[dict]:
            system = self.system_text(caller_system, hits if with_index else None, reasoning)
            shots = [m for ex in reversed(examples) for m in ex.messages]  # most similar nearest the question
            head = [{"role": "system", "content": system}] if system else []
            return head + shots + history + [{"role": "user", "content": question}]

        prompt = build()
        n = count_tokens(prompt)
        while n > budget:
            if history:
                history, k = _drop_oldest_turn(history)
                dropped["history_turns"] += k
            elif hits:
                hits = hits[:-1]
                dropped["chunks"] += 1
            elif examples:
                examples = examples[:-1]
                dropped["examples"] += 1
            else:
                raise ContextError(
                    f"the question and the assistant's system prompt alone are {n} tokens, and the model's context "
                    f"is {max_context} tokens with {max_new_tokens} kept for the answer: ask a shorter question, "
                    f"shorten {self.name}'s system_prompt, or lower sampling.max_tokens")
            prompt = build()
            n = count_tokens(prompt)
        sampling = self.profile.sampling.model_dump(exclude_none=True)
        if not sampling.get("stop"):
            sampling.pop("stop", None)
        return AssistantPrompt(prompt, hits, dropped, sampling, reasoning, examples, n)

    def _examples(self, question: str, count_tokens: CountTokens) -> list[Example]:
        fs = self.profile.few_shot
        if self.examples is None or fs is None:
            return []
        return self.examples.select(question, fs.k, fs.max_tokens, count_tokens)
