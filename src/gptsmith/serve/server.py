"""The serving logic every route shares: request checks, sampling parameters, and the one generation loop that
turns a prompt into a stored, streamed answer. The routes (serve/routes/) only parse requests and shape replies.

When is an answer on disk? Its row is created (empty) before generation starts. Its first piece of text is
written before that piece is handed to the client; after that, the text on disk lags what the client was sent
by at most `serve.store_flush_seconds` (one batched write for all streaming answers per period, on a worker
thread), and the final text and counts are written when the answer ends, however it ends. So a server killed
with SIGKILL keeps the question, at least the first piece of every answer a client saw, and all but the last
`store_flush_seconds` of the rest. Every store write runs on a worker thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from gptsmith.config import ProjectConfig
from gptsmith.errors import InputError
from gptsmith.generation_defaults import DEFAULTS
from gptsmith.serve.backends import Backend, Chunk, GenParams, Prompt
from gptsmith.serve.schemas import APIError, SamplingFields
from gptsmith.serve.store import MessageGone, Store

log = logging.getLogger("gptsmith.serve")


class ClientGone(Exception):
    pass


async def drain(queue: asyncio.Queue, wait: float = 0.5) -> list:
    """Everything queued now (waiting up to `wait` s for the first item): under load many pieces arrive between
    two turns of the event loop, and sending them in one write costs one syscall instead of one per token."""
    if queue.empty():  # a timeout scope is one timer handle; wait_for would cost a task per call
        try:
            async with asyncio.timeout(wait):
                items = [await queue.get()]
        except TimeoutError:
            return []
    else:
        items = []
    while not queue.empty():
        items.append(queue.get_nowait())
    return items


def internal_error(request_id: str) -> APIError:
    """What a client sees of a failure we did not foresee: no exception text (it can leak paths and data), an
    id to find the traceback in the server's log."""
    return APIError(500, f"Internal server error (request {request_id}); the server's log has the details.",
                    code="internal_error", type="server_error")


def as_api_error(e: Exception, request_id: str) -> APIError:
    if isinstance(e, APIError):
        return e
    if isinstance(e, MessageGone):  # the answer's conversation was deleted while it streamed
        return APIError(409, f"{e}; the answer was not saved.", code="conversation_deleted")
    log.error("request %s failed", request_id, exc_info=e)
    return internal_error(request_id)


@dataclass
class Served:
    """One model name this server answers to: a backend, and the assistant (gptsmith.assist.Assistant) that wraps
    it, or None for the plain model. Assistants over the same model directory share one backend (one scheduler,
    one copy of the weights)."""
    backend: Backend
    assistant: Any = None
    label: str | None = None  # the assistant's name; None: the backend's own name (known once it has started)
    index_dir: str | None = None  # the assistant's RAG index, refreshed by the folder watch

    @property
    def name(self) -> str:
        return self.label or self.backend.name


@dataclass
class AssistPlan:
    """What an assistant made of one request: the messages the model sees, its sources (numbered [1]..[n]),
    what the context budget dropped, its sampling defaults, and whether the answer reasons first."""
    messages: list[dict]
    sources: list[dict] | None
    dropped: dict
    sampling: dict
    reasoning: bool
    split: Callable[[str], tuple[str, str]] | None = None  # (reasoning, answer) of a finished CoT text


# The context an assistant budgets for behind a backend that does not say its own (an external server), unless
# its profile sets max_context
EXTERNAL_CONTEXT = 4096


def source_dict(index: int, hit) -> dict:
    """A retrieved chunk as clients see it (the response's `sources` and the store)."""
    c = hit.chunk
    return {"index": index, "citation": c.citation(), "source": c.source, "heading": c.heading, "start": c.start,
            "end": c.end, "unit": c.unit, "text": c.text, "score": round(float(hit.score), 6), "id": hit.id}


def dropped_dict(dropped: dict | None) -> dict | None:
    """Only what was actually dropped; None when the context budget dropped nothing."""
    d = {k: v for k, v in (dropped or {}).items() if v}
    return d or None


class ReasoningSplitter:
    """A streamed answer's pieces as (kind, text): kind "content", or "reasoning" for the reasoning of a
    chain-of-thought answer (split while it streams by gptsmith.assist's ReasoningFilter, which holds back only
    what may still be a label, so nothing sent is ever taken back)."""

    def __init__(self, cot: bool):
        self.filter = None
        if cot:
            from gptsmith.assist import ReasoningFilter

            self.filter = ReasoningFilter()

    def feed(self, piece: str, final: bool = False) -> list[tuple[str, str]]:
        if self.filter is None:
            return [("content", piece)] if piece else []
        parts = self.filter.push(piece) + (self.filter.finish() if final else [])
        return [("content" if kind == "answer" else kind, text) for kind, text in parts]


@dataclass
class Answer:
    """One answer as it streams: its text and the numbers stored with it."""
    t0: float
    prompt_tokens: int | None
    pieces: list[str] = field(default_factory=list)
    ttft_s: float | None = None
    finish_reason: str | None = None
    completion_tokens: int = 0
    split: Callable[[str], tuple[str, str]] | None = None  # a CoT answer: stored as reasoning + answer

    def add(self, ch: Chunk) -> None:
        if ch.text:
            if self.ttft_s is None:
                self.ttft_s = round(time.monotonic() - self.t0, 4)
            self.pieces.append(ch.text)
        if ch.prompt_tokens is not None:
            self.prompt_tokens = ch.prompt_tokens
        if ch.completion_tokens is not None:
            self.completion_tokens = ch.completion_tokens
        if ch.finish_reason:
            self.finish_reason = ch.finish_reason

    def fields(self) -> dict:
        text = "".join(self.pieces)
        reasoning = None
        if self.split is not None:
            reasoning, text = self.split(text)
        return {"content": text, "reasoning": reasoning or None, "ttft_s": self.ttft_s,
                "finish_reason": self.finish_reason, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "latency_s": round(time.monotonic() - self.t0, 4)}


class Server:
    """What the routes share: config, the served models (name -> backend and assistant), store, and the one
    generation loop they all use. `backend` is the default model's (the first served): the UI's and /health's."""

    def __init__(self, cfg: ProjectConfig, backend: Backend | None, store: Store, served: list[Served] | None = None):
        self.served = served or [Served(backend)]
        self.cfg, self.sc, self.backend, self.store = cfg, cfg.serve, self.served[0].backend, store
        self._unsaved: dict[int, list[str]] = {}  # message id -> its streaming pieces, not yet in the store
        self._flusher: asyncio.Task | None = None
        self._final_writes: set[asyncio.Future] = set()  # final saves of cancelled answers, still running
        self._defaults = {id(s.backend): self._sampling_defaults(s.backend) for s in self.served}
        self._max_new = {id(s.backend): self._model_max_new(s.backend) for s in self.served}

    @property
    def backends(self) -> list[Backend]:
        """Each backend once, however many names it is served under."""
        return list({id(s.backend): s.backend for s in self.served}.values())

    def replace_served(self, old: Served, new: Served) -> None:
        """Serve `new` in `old`'s place (serve --registry switching versions). Requests that already hold `old`
        finish on it; the next check_model returns `new`."""
        self._defaults[id(new.backend)] = self._sampling_defaults(new.backend)
        self._max_new[id(new.backend)] = self._model_max_new(new.backend)
        self.served[self.served.index(old)] = new
        self.backend = self.served[0].backend

    def _model_max_new(self, backend: Backend) -> int:
        """An answer's length when nothing says: generate.max_new_tokens when set, else the model's
        generation_config.json (LocalBackend.sampling_defaults), else gptsmith's default."""
        if self.cfg.generate.max_new_tokens is not None:
            return self.cfg.generate.max_new_tokens
        return getattr(backend, "sampling_defaults", dict)().get("max_new_tokens") or DEFAULTS.max_new_tokens

    def _sampling_defaults(self, backend: Backend) -> dict:
        """Temperature and top_p for a request that leaves them out: the config's when set, else the model's
        (its generation_config.json, else gptsmith's defaults: LocalBackend.sampling_defaults); None behind an
        external backend, which then applies its own. Shown in the UI and stored with every answer."""
        model = getattr(backend, "sampling_defaults", dict)()
        g = self.cfg.generate
        return {k: getattr(g, k) if getattr(g, k) is not None else model.get(k) for k in ("temperature", "top_p")}

    # ---------------------------------------------------------------------------------------- store writes
    async def _flush_loop(self) -> None:
        """Every `store_flush_seconds`, save the text of ALL streaming answers in one transaction on a worker
        thread: one round trip per period instead of one ORM session per answer per period, which at 16
        streams took the GIL from the decoding thread for ~15% of a core."""
        while True:
            await asyncio.sleep(self.sc.store_flush_seconds)
            if self._unsaved:
                contents = {mid: "".join(pieces) for mid, pieces in self._unsaved.items()}
                self._unsaved.clear()
                try:
                    await asyncio.to_thread(self.store.update_streaming, contents)
                except Exception:  # a busy or broken store must not kill the flusher; the final save still runs
                    log.exception("store flush failed")

    def _mark_unsaved(self, msg_id: int, pieces: list[str]) -> None:
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush_loop())
        self._unsaved[msg_id] = pieces

    async def _save_final_quietly(self, msg_id: int, fields: dict) -> None:
        """The last save of an answer that failed or was cancelled. On a worker thread like every write, and
        shielded: a second cancellation (server shutdown) must not lose the partial answer; close() waits."""
        def save():
            try:
                self.store.update_message(msg_id, **fields)
            except MessageGone as e:
                log.info("%s; nothing to save", e)
            except Exception:
                log.exception("could not save the end of answer %s", msg_id)

        write = asyncio.ensure_future(asyncio.to_thread(save))
        self._final_writes.add(write)
        write.add_done_callback(self._final_writes.discard)
        try:
            await asyncio.shield(write)
        except asyncio.CancelledError:
            pass  # the write goes on in its thread

    async def close(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
        if self._final_writes:
            await asyncio.gather(*self._final_writes, return_exceptions=True)

    # ---------------------------------------------------------------------------------------- checks
    def check_model(self, model: str | None) -> Served:
        """The served model (or assistant) called `model`; None: the default one (the UI before it picks)."""
        if model is None:
            return self.served[0]
        for s in self.served:
            if s.name == model:
                return s
        names = ", ".join(f"'{s.name}'" for s in self.served)
        raise APIError(404, f"The model '{model}' does not exist on this server; it serves {names} "
                            "(see GET /v1/models).", "model", "model_not_found")

    def assistant_max_tokens(self, served: Served) -> int:
        """An assistant's answer length when the request does not say: its profile's, else the server's."""
        return served.assistant.profile.sampling.max_tokens or self.default_max_tokens(served)

    def defaults_for(self, served: Served) -> dict:
        return self._defaults[id(served.backend)]

    async def assist(self, served: Served, messages: list[dict], max_tokens: int | None,
                     reasoning: bool | None = None) -> AssistPlan | None:
        """The assistant's prompt for `messages` (system prompt, examples, retrieved chunks, history, all under
        the context budget), or None for a plain model. Retrieval and embedding run on a worker thread."""
        if served.assistant is None:
            return None
        from gptsmith.assist import ContextError, approx_count_tokens, split_reasoning

        backend = served.backend
        max_context = served.assistant.profile.max_context or backend.max_context or EXTERNAL_CONTEXT
        budget = min(max_tokens or self.assistant_max_tokens(served), max_context // 2)
        count = getattr(backend, "count_tokens", None) or approx_count_tokens
        try:
            ap = await asyncio.to_thread(served.assistant.prepare, messages, count, max_context, budget, reasoning)
        except ContextError as e:  # the question and the system prompt alone do not fit the model's context
            raise APIError(400, str(e), "messages", "context_length_exceeded") from None
        except InputError as e:  # e.g. the last message is not the user's question
            raise APIError(400, str(e), "messages") from None
        # an assistant without an index has no sources to give (None), one with an index may find none ([])
        sources = [source_dict(i, h) for i, h in enumerate(ap.sources, 1)] if served.index_dir else None
        return AssistPlan(ap.messages, sources, ap.dropped, dict(ap.sampling or {}), bool(ap.reasoning),
                          split_reasoning if ap.reasoning else None)

    def check_request(self, body: SamplingFields, max_tokens: int | None, n_messages: int = 0,
                      n_prompts: int = 1) -> None:
        sc = self.sc
        if n_messages > sc.max_messages:
            raise APIError(400, f"{n_messages} messages is more than this server accepts ({sc.max_messages}, "
                                "serve.max_messages); send fewer.", "messages", "too_many_messages")
        if body.n * n_prompts > sc.max_n:
            raise APIError(400, f"n={body.n} x {n_prompts} prompt(s) asks for {body.n * n_prompts} choices; this "
                                f"server allows at most {sc.max_n} per request (serve.max_n).", "n")
        if max_tokens is not None and max_tokens > sc.max_tokens_limit:
            raise APIError(400, f"max_tokens={max_tokens} is more than this server allows ({sc.max_tokens_limit}, "
                                "serve.max_tokens_limit); ask for fewer.", "max_tokens", "max_tokens_too_large")
        if len(body.stop_list()) > 4:
            raise APIError(400, f"stop has {len(body.stop_list())} strings; at most 4 are allowed.", "stop")

    def default_max_tokens(self, served: Served | None = None) -> int:
        """An answer's length when the client does not say (_model_max_new), never over the limit a client could
        ask for (the backend cuts it further to the context that remains)."""
        return min(self._max_new[id((served or self.served[0]).backend)], self.sc.max_tokens_limit)

    async def prepare(self, prompt: Prompt, max_tokens: int | None, fit: bool,
                      served: Served | None = None) -> tuple[Prompt, int | None]:
        backend = (served or self.served[0]).backend
        return await backend.prepare(prompt, max_tokens, self.default_max_tokens(served), fit=fit)

    def params(self, temperature: float | None, top_p: float | None, max_tokens: int | None,
               stop: list[str] | None = None, seed: int | None = None, served: Served | None = None,
               plan: AssistPlan | None = None) -> GenParams:
        # whatever the client leaves out: the assistant's sampling, else the server's defaults for that model
        mine = {k: v for k, v in (plan.sampling if plan else {}).items() if v is not None}
        d = self.defaults_for(served or self.served[0]) | {k: mine[k] for k in ("temperature", "top_p") if k in mine}
        if seed is None:
            seed = mine.get("seed", self.cfg.generate.seed)
        return GenParams(max_tokens=max_tokens, temperature=d["temperature"] if temperature is None else temperature,
                         top_p=d["top_p"] if top_p is None else top_p, stop=stop or list(mine.get("stop") or []),
                         seed=seed, top_k=mine.get("top_k"), repetition_penalty=mine.get("repetition_penalty"))

    # ---------------------------------------------------------------------------------------- generation
    async def new_answer(self, conv_id: str, parent_id: int | None, prompt: Prompt, params: GenParams,
                         regeneration_of: int | None = None, served: Served | None = None,
                         plan: AssistPlan | None = None) -> dict:
        served = served or self.served[0]
        extra = {}
        if plan is not None:  # what the answer was built from, stored with it (the UI shows it as citations)
            extra = {"sources": plan.sources, "dropped": dropped_dict(plan.dropped)}
        return await asyncio.to_thread(
            self.store.add_message, conv_id, "assistant", "", parent_id, regeneration_of_id=regeneration_of,
            model_name=served.name, model_version=served.backend.version,
            sampling={"temperature": params.temperature, "top_p": params.top_p, "max_tokens": params.max_tokens,
                      "stop": params.stop, "seed": params.seed}
            | {k: v for k, v in (("top_k", params.top_k), ("repetition_penalty", params.repetition_penalty)) if v}
            | ({"chain_of_thought": plan.reasoning} if plan is not None else {}),
            prompt_tokens=prompt.n_tokens, **extra)

    async def run_choice(self, prompt: Prompt, params: GenParams, msg_id: int, t0: float, emit=None,
                         request_id: str = "", served: Served | None = None, plan: AssistPlan | None = None) -> dict:
        """Generate one answer into stored message `msg_id`, calling `emit(text, kind)` for every piece (kind
        "content", or "reasoning" for the reasoning of a chain-of-thought answer); returns the stored fields.
        Whatever the end (finished, cancelled by a client gone or the stop button, failed), the text is saved
        with its finish reason; any failure comes out as an APIError."""
        split = plan.split if plan is not None else None
        answer = Answer(t0, prompt.n_tokens, split=split)
        try:
            await self._generate(prompt, params, msg_id, answer, emit, (served or self.served[0]).backend,
                                 ReasoningSplitter(split is not None))
            answer.finish_reason = answer.finish_reason or "stop"
            result = answer.fields()
            self._unsaved.pop(msg_id, None)
            await asyncio.to_thread(self.store.update_message, msg_id, **result)
            return result
        except BaseException as e:
            self._unsaved.pop(msg_id, None)
            answer.finish_reason = "error" if isinstance(e, Exception) else "cancelled"
            await self._save_final_quietly(msg_id, answer.fields())
            if isinstance(e, Exception) and not isinstance(e, APIError):
                raise as_api_error(e, request_id or f"answer {msg_id}") from e
            raise

    async def _generate(self, prompt: Prompt, params: GenParams, msg_id: int, answer: Answer, emit,
                        backend: Backend, splitter: ReasoningSplitter) -> None:
        stream = await backend.open(prompt, params)
        async with aclosing(stream):
            async for ch in stream:
                first = ch.text and not answer.pieces
                answer.add(ch)
                if not ch.text:
                    continue
                if first or self.sc.store_flush_seconds <= 0:
                    # the first piece reaches the disk before the client (see the module's docstring)
                    await asyncio.to_thread(self.store.update_streaming, {msg_id: "".join(answer.pieces)})
                else:
                    self._mark_unsaved(msg_id, answer.pieces)
                if emit is not None:
                    for kind, text in splitter.feed(ch.text):
                        emit(text, kind)
        if emit is not None:  # the rest of a CoT answer held back while it streamed
            for kind, text in splitter.feed("", final=True):
                emit(text, kind)

    async def wait_all(self, request: Request, tasks: list[asyncio.Task]) -> None:
        """Wait for the tasks; cancel them all when one fails or when the client disconnects."""
        try:
            pending = set(tasks)
            while pending:
                done, pending = await asyncio.wait(pending, timeout=0.5, return_when=asyncio.FIRST_EXCEPTION)
                for t in done:
                    if t.exception() is not None:
                        raise t.exception()
                if pending and await request.is_disconnected():
                    raise ClientGone()
        finally:
            for t in tasks:
                t.cancel()
