"""Answers as replies: an OpenAI completion (whole, or as chat.completion.chunk / text_completion SSE chunks)
and the web UI's own event stream (start, delta, done, error). Every stream ends, whatever fails: with its
last event and, for OpenAI streams, `data: [DONE]`.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, replace

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel

from gptsmith.serve.backends import GenParams, Prompt
from gptsmith.serve.schemas import (APIError, ChatChoice, ChatChunkChoice, ChatCompletion, ChatCompletionChunk,
                                    ChunkDelta, SamplingFields, TextChoice, TextCompletion, TextCompletionChunk,
                                    Usage)
from gptsmith.serve.server import AssistPlan, ClientGone, Served, Server, as_api_error, dropped_dict, drain

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DONE = "data: [DONE]\n\n"
TEXT_MARKER = "\ue000text\ue000"  # a private-use character pair no model text contains


def sse(obj: BaseModel | dict, exclude: set[str] | None = None) -> str:
    data = obj.model_dump_json(exclude=exclude) if isinstance(obj, BaseModel) else json.dumps(obj, ensure_ascii=False)
    return f"data: {data}\n\n"


def event_stream(events) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)


@dataclass
class Target:
    """One prompt of a request, with the stored conversation and message its answers follow."""
    conv_id: str
    parent_id: int | None
    prompt: Prompt


@dataclass
class Job:
    """One choice to generate: its index in the reply and the stored message it fills."""
    index: int
    prompt: Prompt
    params: GenParams
    msg_id: int


class Completion:
    """One /v1 request: `n` choices for every target, answered whole or streamed as OpenAI does."""

    def __init__(self, srv: Server, kind: str, body: SamplingFields, targets: list[Target],
                 served: Served | None = None, plan: AssistPlan | None = None, include_reasoning: bool = False):
        self.srv, self.kind, self.body, self.targets = srv, kind, body, targets
        self.served, self.plan = served or srv.served[0], plan
        self.include_reasoning = include_reasoning  # a CoT answer's reasoning is sent only when asked for
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        self.created, self.t0 = int(time.time()), time.monotonic()
        self.model, self.fingerprint = self.served.name, self.served.backend.version
        self.include_usage = bool(body.stream_options and body.stream_options.include_usage)
        self.jobs: list[Job] = []
        self._text_templates: dict[int, tuple[str, str]] = {}

    async def store_answers(self, params: GenParams) -> None:
        """An empty stored answer per choice, before generation starts."""
        for i, t in enumerate(self.targets):
            for j in range(self.body.n):
                # seed + j: the n choices differ from each other, and the same request gives the same n answers
                p = params if params.seed is None else replace(params, seed=params.seed + j)
                msg = await self.srv.new_answer(t.conv_id, t.parent_id, t.prompt, p, served=self.served,
                                                plan=self.plan)
                self.jobs.append(Job(i * self.body.n + j, t.prompt, p, msg["id"]))

    def usage(self, results: list[dict]) -> Usage:
        """`results` in job order; the prompt counts once per target."""
        n = self.body.n
        pt = sum(t.prompt.n_tokens if t.prompt.n_tokens is not None else (results[i * n]["prompt_tokens"] or 0)
                 for i, t in enumerate(self.targets))
        ct = sum(r["completion_tokens"] or 0 for r in results)
        return Usage(prompt_tokens=pt, completion_tokens=ct, total_tokens=pt + ct)

    def run(self, job: Job, emit=None):
        return self.srv.run_choice(job.prompt, job.params, job.msg_id, self.t0, emit=emit, request_id=self.id,
                                   served=self.served, plan=self.plan)

    def extras(self) -> dict:
        """An assistant's sources and what its context budget dropped (sent once: whole reply, first chunk)."""
        if self.plan is None:
            return {}
        return {"sources": self.plan.sources, "dropped": dropped_dict(self.plan.dropped)}

    def message(self, result: dict) -> dict:
        reasoning = result.get("reasoning") if self.include_reasoning else None
        return {"content": result["content"], "reasoning_content": reasoning}

    # ------------------------------------------------------------------------------------------ whole reply
    async def reply(self, request: Request) -> ChatCompletion | TextCompletion | Response:
        tasks = [asyncio.create_task(self.run(job)) for job in self.jobs]
        try:
            await self.srv.wait_all(request, tasks)
        except ClientGone:
            return Response(status_code=499)
        results = [t.result() for t in tasks]
        common = dict(id=self.id, created=self.created, model=self.model, system_fingerprint=self.fingerprint,
                      usage=self.usage(results))
        if self.kind == "chat":
            return ChatCompletion(**common, **self.extras(), choices=[
                ChatChoice(index=job.index, message=self.message(r), finish_reason=r["finish_reason"])
                for job, r in zip(self.jobs, results)])
        return TextCompletion(**common, choices=[
            TextChoice(index=job.index, text=r["content"], finish_reason=r["finish_reason"])
            for job, r in zip(self.jobs, results)])

    # ------------------------------------------------------------------------------------------ stream
    def chunk(self, idx: int | None, text: str | None = None, finish: str | None = None, first: bool = False,
              usage: Usage | None = None, reasoning: str | None = None) -> ChatCompletionChunk | TextCompletionChunk:
        """One chunk for choice `idx`, or (idx None) the final usage-only chunk. The first chunk of a choice
        carries an assistant's sources."""
        common = dict(id=self.id, created=self.created, model=self.model, system_fingerprint=self.fingerprint,
                      usage=usage)
        if self.kind == "chat":
            if first:
                delta = ChunkDelta(role="assistant", content="")
                if idx == 0:  # once per reply, not once per choice
                    common |= self.extras()
            else:
                delta = ChunkDelta(content=text or None, reasoning_content=reasoning or None)
            choices = [] if idx is None else [ChatChunkChoice(index=idx, delta=delta, finish_reason=finish)]
            return ChatCompletionChunk(**common, choices=choices)
        choices = [] if idx is None else [TextChoice(index=idx, text=text or "", finish_reason=finish)]
        return TextCompletionChunk(**common, choices=choices)

    def chunk_sse(self, chunk: BaseModel) -> str:
        return sse(chunk, exclude=None if self.include_usage else {"usage"})

    def text_sse(self, idx: int, text: str) -> str:
        """chunk_sse(chunk(idx, text)) with the JSON around the text serialised once per choice, not per piece."""
        if idx not in self._text_templates:
            before, after = self.chunk_sse(self.chunk(idx, text=TEXT_MARKER)).split(json.dumps(TEXT_MARKER,
                                                                                                ensure_ascii=False))
            self._text_templates[idx] = before, after
        before, after = self._text_templates[idx]
        return before + json.dumps(text, ensure_ascii=False) + after

    def stream(self, request: Request) -> StreamingResponse:
        return event_stream(self._events(request))

    async def _events(self, request: Request):
        queue: asyncio.Queue = asyncio.Queue()
        tasks = [asyncio.create_task(self._job(job, queue)) for job in self.jobs]
        results: dict[int, dict] = {}
        try:
            if self.kind == "chat":
                yield "".join(self.chunk_sse(self.chunk(job.index, first=True)) for job in self.jobs)
            last_check = time.monotonic()
            while len(results) < len(self.jobs):
                items = await drain(queue)
                if time.monotonic() - last_check > 0.5:
                    last_check = time.monotonic()
                    if await request.is_disconnected():
                        return
                out, error = self._render(items, results)
                if error is not None:  # one choice failed: the whole reply ends, as a non-streaming one would
                    yield out + sse(error.body()) + DONE
                    return
                if out:
                    yield out
            if self.include_usage:
                yield self.chunk_sse(self.chunk(None, usage=self.usage([results[j.index] for j in self.jobs])))
            yield DONE
        finally:
            for t in tasks:  # client gone or stream closed early: stop generating for it
                t.cancel()

    async def _job(self, job: Job, queue: asyncio.Queue) -> None:
        try:
            result = await self.run(job, emit=lambda text, kind: queue.put_nowait((job.index, kind, text)))
            queue.put_nowait((job.index, "done", result))
        except Exception as e:  # every failure reaches the client, or its stream would wait forever
            queue.put_nowait((job.index, "error", as_api_error(e, self.id)))

    def _render(self, items: list, results: dict[int, dict]) -> tuple[str, APIError | None]:
        """SSE text for a batch of queued items; text per choice is merged until something else comes."""
        out, pending, thinking = [], {}, {}
        for idx, what, val in items + [(None, "flush", None)]:
            if what == "content":
                pending[idx] = pending.get(idx, "") + val
                continue
            if what == "reasoning":  # a CoT answer's reasoning: only to a client that asked for it
                if self.include_reasoning:
                    thinking[idx] = thinking.get(idx, "") + val
                continue
            out += [self.chunk_sse(self.chunk(i, reasoning=t)) for i, t in thinking.items()]
            out += [self.text_sse(i, t) for i, t in pending.items()]
            pending.clear()
            thinking.clear()
            if what == "done":
                results[idx] = val
                out.append(self.chunk_sse(self.chunk(idx, finish=val["finish_reason"])))
            elif what == "error":
                return "".join(out), val
        return "".join(out), None


# ---------------------------------------------------------------------------------------------- the web UI
@dataclass
class UITurn:
    """A UI answer about to be generated: the stored user message (None for a regeneration) and answer row."""
    user_msg: dict | None
    answer: dict
    prompt: Prompt
    params: GenParams
    t0: float
    served: Served | None = None
    plan: AssistPlan | None = None


def ui_stream(srv: Server, request: Request, turn: UITurn) -> StreamingResponse:
    """SSE events: start (both stored rows), delta (text), then done (the final row) or error."""
    return event_stream(_ui_events(srv, request, turn))


async def _ui_events(srv: Server, request: Request, turn: UITurn):
    queue: asyncio.Queue = asyncio.Queue()
    task = asyncio.create_task(_ui_job(srv, turn, queue))
    try:
        yield sse({"type": "start", "user_message": turn.user_msg, "assistant_message": turn.answer})
        last_check = time.monotonic()
        while True:
            items = await drain(queue)
            if time.monotonic() - last_check > 0.5:
                last_check = time.monotonic()
                if await request.is_disconnected():
                    return
            thinking = "".join(val for what, val in items if what == "reasoning")
            if thinking:  # a CoT answer's reasoning, which the UI keeps behind its "show reasoning" toggle
                yield sse({"type": "reasoning", "text": thinking})
            text = "".join(val for what, val in items if what == "delta")
            if text:
                yield sse({"type": "delta", "text": text})
            for what, val in items:
                if what == "done":
                    yield sse({"type": "done", "message": await asyncio.to_thread(srv.store.get_message, val)})
                    return
                if what == "error":
                    yield sse({"type": "error"} | val.body())
                    return
    finally:
        task.cancel()  # the UI's stop button aborts the request: stop generating, keep the partial answer


async def _ui_job(srv: Server, turn: UITurn, queue: asyncio.Queue) -> None:
    msg_id = turn.answer["id"]
    try:
        await srv.run_choice(turn.prompt, turn.params, msg_id, turn.t0, request_id=f"answer {msg_id}",
                             served=turn.served, plan=turn.plan,
                             emit=lambda t, kind: queue.put_nowait(("delta" if kind == "content" else kind, t)))
        queue.put_nowait(("done", msg_id))
    except Exception as e:  # every failure reaches the client, or its stream would wait forever
        queue.put_nowait(("error", as_api_error(e, f"answer {msg_id}")))
