"""Answering with an assistant from the command line (`gptsmith ask`, `gptsmith chat --assistant`): a local model
through the engine, or another OpenAI-compatible server over HTTP. The server (gptsmith.serve) has its own
batched backends and calls `Assistant.prepare` directly."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from gptsmith.assist.profile import AssistantProfile
from gptsmith.assist.prompt import Assistant, approx_count_tokens
from gptsmith.assist.reasoning import ReasoningFilter
from gptsmith.errors import InputError
from gptsmith.files import split_lines
from gptsmith.rag.types import Hit

DEFAULT_BACKEND_CONTEXT = 4096


@dataclass
class Reply:
    answer: str
    reasoning: str = ""  # the chain-of-thought part, kept apart ("" when reasoning is off or the model gave none)
    sources: list[Hit] = field(default_factory=list)  # [1]..[n] as the model saw them
    dropped: dict = field(default_factory=dict)
    finish_reason: str | None = None  # stop, length, interrupted
    prompt_tokens: int = 0
    reasoning_mode: bool = False


class LocalModel:
    """A model folder run in this process by the engine."""

    def __init__(self, model_dir=None, device: str = "auto", engine=None):
        """Load `model_dir`, or use an `engine` already loaded (eval's targets: no second copy of the weights)."""
        from gptsmith.engine import Engine, SamplingParams

        self.engine = engine if engine is not None else Engine.load(model_dir, device=device)
        self.max_context = self.engine.max_context
        self.default_max_tokens = self.engine.resolve(SamplingParams()).max_new_tokens
        self.finish_reason = None

    def count_tokens(self, messages: list[dict]) -> int:
        return len(self.engine.chat_template_ids(messages))

    def stream(self, messages: list[dict], sampling: dict, max_new_tokens: int) -> Iterator[str]:
        from gptsmith.engine import SamplingParams

        params = self.engine.resolve(SamplingParams(
            max_new_tokens=max_new_tokens, temperature=sampling.get("temperature"), top_p=sampling.get("top_p"),
            top_k=sampling.get("top_k"), repetition_penalty=sampling.get("repetition_penalty"),
            stop=list(sampling.get("stop") or []), seed=sampling.get("seed")))
        ids = self.engine.encode_chat(messages, max_new_tokens)
        events = self.engine.stream(ids, params)
        try:
            for event in events:
                self.finish_reason = event.finish_reason
                if event.text:
                    yield event.text
        finally:
            events.close()


class RemoteModel:
    """Another OpenAI-compatible server: POST {backend_url}/chat/completions, streamed."""

    def __init__(self, profile: AssistantProfile, timeout: float = 600.0, transport=None):
        import httpx

        base = profile.backend_url.rstrip("/")
        self.base = base if base.endswith("/v1") else base + "/v1"
        key = os.environ.get(profile.api_key_env)
        self.client = httpx.Client(base_url=self.base, headers={"Authorization": f"Bearer {key}"} if key else {},
                                   timeout=httpx.Timeout(timeout, connect=10.0), transport=transport)
        self.model = profile.backend_model or self._first_model()
        self.max_context = profile.max_context or DEFAULT_BACKEND_CONTEXT
        self.default_max_tokens = 512
        self.count_tokens = approx_count_tokens
        self.finish_reason = None

    def _get(self, path: str):
        import httpx

        try:
            r = self.client.get(path)
        except httpx.HTTPError as e:
            raise InputError(f"backend {self.base} is not reachable ({e}); start it or fix backend_url") from None
        if r.status_code != 200:
            raise InputError(f"backend {self.base}{path} answered {r.status_code}: {r.text[:300]}")
        return r.json()

    def _first_model(self) -> str:
        ids = [m.get("id") for m in self._get("/models").get("data", []) if m.get("id")]
        if not ids:
            raise InputError(f"backend {self.base} lists no models; set backend_model in the assistant file")
        return ids[0]

    def stream(self, messages: list[dict], sampling: dict, max_new_tokens: int) -> Iterator[str]:
        import httpx

        body = {"model": self.model, "messages": messages, "max_tokens": max_new_tokens, "stream": True,
                **{k: v for k, v in sampling.items() if k != "max_tokens"}}
        try:
            with self.client.stream("POST", "/chat/completions", json=body) as r:
                if r.status_code != 200:
                    r.read()
                    raise InputError(f"backend {self.base}/chat/completions answered {r.status_code}: "
                                     f"{r.text[:300]}")
                for line in split_lines(r.iter_text()):  # not iter_lines: it splits at U+2028 too
                    if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                        continue
                    choice = (json.loads(line[5:]).get("choices") or [{}])[0]
                    self.finish_reason = choice.get("finish_reason") or self.finish_reason
                    text = (choice.get("delta") or {}).get("content")
                    if text:
                        yield text
        except httpx.HTTPError as e:
            raise InputError(f"backend {self.base} failed mid-answer ({e})") from None


def open_model(profile: AssistantProfile, device: str = "auto"):
    return LocalModel(profile.model, device) if profile.model is not None else RemoteModel(profile)


def answer(assistant: Assistant, model, messages: list[dict], reasoning: bool | None = None,
           on_text: Callable[[str, str], None] | None = None, interruptible: bool = False) -> Reply:
    """Answer the last user message. `on_text(kind, text)` gets the reply as it streams, kind "reasoning" or
    "answer". With `interruptible`, Ctrl-C ends the answer and keeps what came (finish_reason "interrupted")."""
    requested = assistant.profile.sampling.max_tokens
    max_new = requested or min(model.default_max_tokens, model.max_context // 2)
    prompt = assistant.prepare(messages, model.count_tokens, model.max_context, max_new, reasoning)
    split = ReasoningFilter() if prompt.reasoning else None
    reply = Reply("", sources=prompt.sources, dropped=prompt.dropped, prompt_tokens=prompt.n_tokens,
                  reasoning_mode=prompt.reasoning)
    text: list[str] = []
    shown = {"answer": False}

    def emit(parts: list[tuple[str, str]]) -> None:
        for kind, piece in parts:
            if kind == "answer" and not shown["answer"]:  # the answer starts at its first visible character
                piece = piece.lstrip()
                shown["answer"] = bool(piece)
            if on_text and piece:
                on_text(kind, piece)

    stream = model.stream(prompt.messages, prompt.sampling, max_new)
    try:
        for piece in stream:
            text.append(piece)
            emit(split.push(piece) if split else [("answer", piece)])
        reply.finish_reason = model.finish_reason
    except KeyboardInterrupt:
        stream.close()
        if not interruptible:
            raise
        reply.finish_reason = "interrupted"
    if split:
        emit(split.finish())
        reply.reasoning, reply.answer = split.reasoning.strip(), split.answer.strip()
    else:
        reply.answer = "".join(text).strip()
    return reply


def source_dicts(hits: list[Hit]) -> list[dict]:
    """The sources as JSON-ready dicts, numbered as the model saw them."""
    return [{"n": i, "citation": h.chunk.citation(), "source": h.chunk.source, "heading": h.chunk.heading,
             "start": h.chunk.start, "end": h.chunk.end, "unit": h.chunk.unit, "score": h.score, "id": h.id,
             "text": h.chunk.text} for i, h in enumerate(hits, 1)]


def format_dropped(dropped: dict) -> str:
    """'2 history turns, 1 chunk' (empty when nothing was dropped)."""
    names = {"history_turns": "history turn", "chunks": "retrieved chunk", "examples": "few-shot example"}
    return ", ".join(f"{n} {names.get(k, k)}{'s' if n != 1 else ''}" for k, n in dropped.items() if n)
