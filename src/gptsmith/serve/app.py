"""`gptsmith serve`: an OpenAI-compatible API, a web chat UI and the store behind both.

    gptsmith serve --model runs/sft --port 8000                       # local model, continuous batching
    gptsmith serve --backend-url http://localhost:11434/v1            # front Ollama / vLLM / a hosted API

Every answer, from the UI or from /v1, is written to the store while it streams: the user's message before
generation starts, the answer's row when it starts and its text every `serve.store_flush_seconds`, so a
server killed mid-answer still holds the question and the partial answer.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid
from contextlib import aclosing, asynccontextmanager
from dataclasses import replace
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from gptsmith.config import ProjectConfig
from gptsmith.serve.auth import Auth, Guard
from gptsmith.serve.backends import Backend, ExternalBackend, GenParams, LocalBackend, Prompt, model_version
from gptsmith.serve.schemas import (APIError, ChatCompletion, ChatCompletionRequest, CompletionRequest,
                                    ConversationCreate, ConversationPatch, ErrorResponse, FeedbackIn, ModelCard,
                                    ModelList, SamplingFields, SendMessage, TextCompletion, UISettings)
from gptsmith.serve.security import RequestShield
from gptsmith.serve.store import Store

log = logging.getLogger("gptsmith.serve")
STATIC = Path(__file__).parent / "static"
ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 429)}
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


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


class Server:
    """What the routes share: config, backend, store, and the one generation loop they all use."""

    def __init__(self, cfg: ProjectConfig, backend: Backend, store: Store):
        self.cfg, self.sc, self.backend, self.store = cfg, cfg.serve, backend, store
        self._unsaved: dict[int, list[str]] = {}  # message id -> its streaming pieces, not yet in the store
        self._flusher: asyncio.Task | None = None

    # ---------------------------------------------------------------------------------------- store flushes
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

    async def close(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()

    # ---------------------------------------------------------------------------------------- checks
    def check_model(self, model: str) -> None:
        if model != self.backend.name:
            raise APIError(404, f"The model '{model}' does not exist on this server; it serves "
                                f"'{self.backend.name}' (see GET /v1/models).", "model", "model_not_found")

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

    def params(self, temperature: float | None, top_p: float | None, max_tokens: int | None,
               stop: list[str] | None = None, seed: int | None = None) -> GenParams:
        g = self.cfg.generate  # the server's defaults for whatever the client leaves out
        return GenParams(max_tokens=max_tokens, temperature=g.temperature if temperature is None else temperature,
                         top_p=g.top_p if top_p is None else top_p, stop=stop or [],
                         seed=g.seed if seed is None else seed)

    # ---------------------------------------------------------------------------------------- generation
    async def new_answer(self, conv_id: str, parent_id: int | None, prompt: Prompt, params: GenParams,
                         regeneration_of: int | None = None) -> dict:
        return await asyncio.to_thread(
            self.store.add_message, conv_id, "assistant", "", parent_id, regeneration_of_id=regeneration_of,
            model_name=self.backend.name, model_version=self.backend.version,
            sampling={"temperature": params.temperature, "top_p": params.top_p, "max_tokens": params.max_tokens,
                      "stop": params.stop, "seed": params.seed}, prompt_tokens=prompt.n_tokens)

    async def run_choice(self, prompt: Prompt, params: GenParams, msg_id: int, t0: float, emit=None) -> dict:
        """Generate one answer into stored message `msg_id`, calling `emit(text)` for every piece.

        The text is saved every `store_flush_seconds` while it streams and once more at the end, whatever
        the end is: finished, cancelled (client gone, stop button) or failed."""
        pieces: list[str] = []
        out = {"ttft_s": None, "finish_reason": None, "prompt_tokens": prompt.n_tokens, "completion_tokens": 0}
        batched = self.sc.store_flush_seconds > 0  # 0: save after every piece, inline

        def fields() -> dict:
            return out | {"content": "".join(pieces), "latency_s": round(time.monotonic() - t0, 4)}

        try:
            stream = await self.backend.open(prompt, params)
            async with aclosing(stream):
                async for ch in stream:
                    now = time.monotonic()
                    if ch.text:
                        if out["ttft_s"] is None:
                            out["ttft_s"] = round(now - t0, 4)
                        pieces.append(ch.text)
                        if emit is not None:
                            emit(ch.text)
                        if batched:
                            self._mark_unsaved(msg_id, pieces)
                        else:
                            await asyncio.to_thread(self.store.update_message, msg_id, content="".join(pieces))
                    if ch.prompt_tokens is not None:
                        out["prompt_tokens"] = ch.prompt_tokens
                    if ch.completion_tokens is not None:
                        out["completion_tokens"] = ch.completion_tokens
                    if ch.finish_reason:
                        out["finish_reason"] = ch.finish_reason
        except BaseException as e:
            self._unsaved.pop(msg_id, None)
            out["finish_reason"] = "error" if isinstance(e, Exception) else "cancelled"
            # synchronous on purpose: this task may be being cancelled, and the partial answer must land
            self.store.update_message(msg_id, **fields())
            raise
        self._unsaved.pop(msg_id, None)
        out["finish_reason"] = out["finish_reason"] or "stop"
        result = fields()
        await asyncio.to_thread(self.store.update_message, msg_id, **result)
        return result

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

    async def respond(self, request: Request, kind: str, body: SamplingFields,
                      targets: list[tuple[str, int | None, Prompt]], params: GenParams):
        """Run body.n choices for every (conversation, parent, prompt) target; answer as OpenAI does."""
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        created, t0, model = int(time.time()), time.monotonic(), self.backend.name
        jobs = []  # (choice index, prompt, params, stored message id)
        for i, (conv_id, parent_id, prompt) in enumerate(targets):
            for j in range(body.n):
                # seed + j: the n choices differ from each other, and the same request gives the same n answers
                p = params if params.seed is None else replace(params, seed=params.seed + j)
                msg = await self.new_answer(conv_id, parent_id, prompt, p)
                jobs.append((i * body.n + j, prompt, p, msg["id"]))
        def usage(results: list[dict]) -> dict:  # results in job order; the prompt counts once per target
            pt = sum(pr.n_tokens if pr.n_tokens is not None else (results[i * body.n]["prompt_tokens"] or 0)
                     for i, (_, _, pr) in enumerate(targets))
            ct = sum(r["completion_tokens"] or 0 for r in results)
            return {"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct}

        def chunk(idx: int, text: str | None = None, finish: str | None = None, first: bool = False) -> dict:
            if kind == "chat":
                delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
                choice = {"index": idx, "delta": delta, "logprobs": None, "finish_reason": finish}
                obj = "chat.completion.chunk"
            else:
                choice = {"index": idx, "text": text or "", "logprobs": None, "finish_reason": finish}
                obj = "text_completion"
            out = {"id": rid, "object": obj, "created": created, "model": model,
                   "system_fingerprint": self.backend.version, "choices": [choice]}
            if include_usage:
                out["usage"] = None
            return out

        templates: dict[int, tuple[str, str]] = {}

        def text_sse(idx: int, text: str) -> str:
            """sse(chunk(idx, text)) with the JSON around the text serialised once per choice, not per piece."""
            if idx not in templates:
                marker = "\ue000text\ue000"
                before, after = sse(chunk(idx, text=marker)).split(json.dumps(marker, ensure_ascii=False))
                templates[idx] = before, after
            before, after = templates[idx]
            return before + json.dumps(text, ensure_ascii=False) + after

        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        if not body.stream:
            tasks = [asyncio.create_task(self.run_choice(pr, p, mid, t0)) for _, pr, p, mid in jobs]
            try:
                await self.wait_all(request, tasks)
            except ClientGone:
                return Response(status_code=499)
            results = [t.result() for t in tasks]
            if kind == "chat":
                choices = [{"index": idx, "message": {"role": "assistant", "content": r["content"]},
                            "finish_reason": r["finish_reason"]} for (idx, *_), r in zip(jobs, results)]
                return ChatCompletion(id=rid, created=created, model=model, system_fingerprint=self.backend.version,
                                      choices=choices, usage=usage(results))
            choices = [{"index": idx, "text": r["content"], "finish_reason": r["finish_reason"]}
                       for (idx, *_), r in zip(jobs, results)]
            return TextCompletion(id=rid, created=created, model=model, system_fingerprint=self.backend.version,
                                  choices=choices, usage=usage(results))

        queue: asyncio.Queue = asyncio.Queue()

        async def job(idx, pr, p, mid):
            try:
                r = await self.run_choice(pr, p, mid, t0, emit=lambda text: queue.put_nowait((idx, "text", text)))
                queue.put_nowait((idx, "done", r))
            except APIError as e:
                queue.put_nowait((idx, "error", e))

        async def events():
            tasks = [asyncio.create_task(job(*j)) for j in jobs]
            results: dict[int, dict] = {}
            try:
                if kind == "chat":
                    for idx, *_ in jobs:
                        yield sse(chunk(idx, first=True))
                last_check = time.monotonic()
                while len(results) < len(jobs):
                    items = await drain(queue)
                    if time.monotonic() - last_check > 0.5:
                        last_check = time.monotonic()
                        if await request.is_disconnected():
                            return
                    out, pending = [], {}  # pending: text per choice, merged until something else comes
                    for idx, what, val in items + [(None, "flush", None)]:
                        if what == "text":
                            pending[idx] = pending.get(idx, "") + val
                            continue
                        out += [text_sse(i, t) for i, t in pending.items()]
                        pending.clear()
                        if what == "done":
                            results[idx] = val
                            out.append(sse(chunk(idx, finish=val["finish_reason"])))
                        elif what == "error":
                            yield "".join(out) + sse(val.body())
                            return
                    if out:
                        yield "".join(out)
                if include_usage:
                    ordered = [results[idx] for idx, *_ in jobs]
                    yield sse({"id": rid, "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
                               "created": created, "model": model, "system_fingerprint": self.backend.version,
                               "choices": [], "usage": usage(ordered)})
                yield "data: [DONE]\n\n"
            finally:
                for t in tasks:  # client gone or stream closed early: stop generating for it
                    t.cancel()

        return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)


def _error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errs = exc.errors()
    if not errs:
        return "Invalid request.", None
    e = errs[0]
    if e.get("type") == "json_invalid":
        return (f"The request body is not valid JSON ({e.get('ctx', {}).get('error', 'decode error')}). Send a "
                "JSON object with Content-Type: application/json.", None)
    loc = [str(p) for p in e.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    if e.get("type") == "missing":
        return f"Missing required parameter: '{param}'.", param
    if e.get("type") in ("model_attributes_type", "dict_type") and not loc:
        return "The request body must be a JSON object (Content-Type: application/json).", None
    return f"Invalid value for '{param}': {e.get('msg')} (got {e.get('input')!r:.100}).", param


def set_torch_threads(n: int) -> int:
    """Torch's CPU thread pool busy-waits between ops; when it spans every core it spins against the event
    loop thread (and anything else on the machine), and on a 2-core box that made 16 streams cost 2-3x more
    CPU per token and, under outside load, decode 10-50x slower (benchmarks/bench_serve.py --torch-threads).
    Auto (0) keeps one core free for the event loop."""
    import torch

    if n <= 0:
        n = max(1, min(torch.get_num_threads(), (os.cpu_count() or 1) - 1))
    torch.set_num_threads(n)
    log.info("torch CPU threads: %d", n)
    return n


def build_backend(cfg: ProjectConfig, model_dir=None, engine=None) -> Backend:
    sc = cfg.serve
    if sc.backend_url:
        return ExternalBackend(sc.backend_url, os.environ.get("GPTSMITH_BACKEND_API_KEY"), sc.backend_model)
    if engine is None:
        if model_dir is None:
            raise ValueError("serve needs a model directory (--model) or a backend URL (--backend-url)")
        from gptsmith.engine import Engine
        engine = Engine.load(model_dir, device=sc.device)
        if engine.device.type == "cpu":
            set_torch_threads(sc.torch_threads)
    if model_dir is not None:
        name, version = Path(model_dir).resolve().name, model_version(Path(model_dir))
    else:
        name = Path(str(getattr(engine.model.config, "name_or_path", "") or "model")).name or "model"
        version = name
    g = cfg.generate
    return LocalBackend(engine, name, version, sc.max_batch_size, top_k=g.top_k,
                        repetition_penalty=g.repetition_penalty, stream_interval=sc.stream_interval_s)


def create_app(cfg: ProjectConfig, model_dir=None, engine=None, backend: Backend | None = None) -> FastAPI:
    """The whole server as an ASGI app. `engine` (an already loaded gptsmith Engine) skips loading
    `model_dir`; `backend` replaces both (tests, other backends)."""
    sc = cfg.serve
    backend = backend or build_backend(cfg, model_dir, engine)
    store = Store(sc.db)
    srv = Server(cfg, backend, store)

    @asynccontextmanager
    async def lifespan(app):
        await backend.start()
        log.info("serving %s (%s); store %s", backend.name, backend.version, sc.db)
        try:
            yield
        finally:
            await srv.close()
            await backend.close()
            store.close()

    app = FastAPI(title="gptsmith", version="1", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.server = srv
    auth = app.state.auth = Auth(sc.api_key, sc.session_hours, sc.auth_failures_per_minute)
    app.add_middleware(Guard, auth=auth, max_body_bytes=sc.max_body_bytes,
                       rate_limit_per_minute=sc.rate_limit_per_minute)
    if sc.cors_origins:  # added after Guard = outside it, so preflight requests are answered before the key check
        app.add_middleware(CORSMiddleware, allow_origins=sc.cors_origins, allow_methods=["*"],
                           allow_headers=["*"], allow_credentials=True)
    app.add_middleware(RequestShield, allowed_hosts=sc.allowed_hosts, cors_origins=sc.cors_origins)  # outermost

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return _error_response(APIError(400, message, param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        codes = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}
        msg = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 404 and msg == "Not Found":
            msg = f"Unknown URL {request.method} {request.url.path}; see GET /docs for the routes."
        return _error_response(APIError(exc.status_code, msg, code=codes.get(exc.status_code)))

    @app.exception_handler(Exception)
    async def _crash(request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return _error_response(APIError(500, f"Internal error: {type(exc).__name__}: {exc}", type="server_error"))

    # ------------------------------------------------------------------------------------------ OpenAI API
    @app.get("/health")
    async def health():
        return {"status": "ok", "model": backend.name}

    @app.get("/v1/models", response_model=ModelList)
    async def models():
        return ModelList(data=[ModelCard(id=backend.name, created=int(time.time()))])

    @app.get("/v1/models/{model}", response_model=ModelCard, responses=ERRORS)
    async def model_card(model: str):
        srv.check_model(model)
        return ModelCard(id=backend.name, created=int(time.time()))

    @app.post("/v1/chat/completions", response_model=ChatCompletion, responses=ERRORS)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        srv.check_model(body.model)
        msgs = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
        max_tokens = body.max_completion_tokens or body.max_tokens
        srv.check_request(body, max_tokens, n_messages=len(msgs))
        prompt, max_tokens = await backend.prepare(Prompt(messages=msgs), max_tokens,
                                                   cfg.generate.max_new_tokens, fit=False)
        params = srv.params(body.temperature, body.top_p, max_tokens, body.stop_list(), body.seed)
        conv = await asyncio.to_thread(store.create_conversation, source="api",
                                       settings={"endpoint": "chat.completions", "user": body.user})
        parent = await asyncio.to_thread(store.add_chain, conv["id"], msgs)
        return await srv.respond(request, "chat", body, [(conv["id"], parent, prompt)], params)

    @app.post("/v1/completions", response_model=TextCompletion, responses=ERRORS)
    async def completions(body: CompletionRequest, request: Request):
        srv.check_model(body.model)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise APIError(400, "prompt is an empty list; send a string or a list of strings", "prompt")
        srv.check_request(body, body.max_tokens, n_prompts=len(prompts))
        targets, max_tokens = [], body.max_tokens
        for text in prompts:
            prompt, mt = await backend.prepare(Prompt(text=text), body.max_tokens, cfg.generate.max_new_tokens,
                                               fit=False)
            max_tokens = mt if max_tokens is None else min(max_tokens, mt)
            conv = await asyncio.to_thread(store.create_conversation, source="api",
                                           settings={"endpoint": "completions", "user": body.user})
            parent = await asyncio.to_thread(store.add_chain, conv["id"], [{"role": "user", "content": text}])
            targets.append((conv["id"], parent, prompt))
        params = srv.params(body.temperature, body.top_p, max_tokens, body.stop_list(), body.seed)
        return await srv.respond(request, "text", body, targets, params)

    # ------------------------------------------------------------------------------------------ the UI's API
    @app.get("/api/info")
    async def info():
        g = cfg.generate
        return {"model": backend.name, "version": backend.version, "max_context": backend.max_context,
                "max_tokens_limit": sc.max_tokens_limit, "auth": bool(sc.api_key),
                "defaults": {"temperature": g.temperature, "top_p": g.top_p, "max_tokens": g.max_new_tokens}}

    @app.get("/api/conversations")
    async def list_conversations(q: str = "", source: str | None = None, limit: int = 200):
        return await asyncio.to_thread(store.list_conversations, q, min(max(limit, 1), 1000), source)

    @app.post("/api/conversations")
    async def create_conversation(body: ConversationCreate):
        return await asyncio.to_thread(store.create_conversation, body.title, body.system_prompt,
                                       body.settings.model_dump(exclude_none=True))

    async def _conversation(conv_id: str, all_messages: bool = False) -> dict:
        conv = await asyncio.to_thread(store.get_conversation, conv_id, all_messages)
        if conv is None:
            raise APIError(404, f"conversation '{conv_id}' not found", "conversation_id", "not_found")
        return conv

    @app.get("/api/conversations/{conv_id}")
    async def get_conversation(conv_id: str, all: bool = False):
        return await _conversation(conv_id, all)

    @app.patch("/api/conversations/{conv_id}")
    async def patch_conversation(conv_id: str, body: ConversationPatch):
        settings = None if body.settings is None else body.settings.model_dump(exclude_none=True)
        conv = await asyncio.to_thread(store.update_conversation, conv_id, title=body.title,
                                       system_prompt=body.system_prompt, settings=settings)
        if conv is None:
            raise APIError(404, f"conversation '{conv_id}' not found", "conversation_id", "not_found")
        return conv

    @app.delete("/api/conversations/{conv_id}")
    async def delete_conversation(conv_id: str):
        if not await asyncio.to_thread(store.delete_conversation, conv_id):
            raise APIError(404, f"conversation '{conv_id}' not found", "conversation_id", "not_found")
        return {"deleted": conv_id}

    @app.post("/api/conversations/{conv_id}/messages")
    async def send_message(conv_id: str, body: SendMessage, request: Request):
        """Add a user message (new, or an edit of an earlier one) or regenerate an answer, and stream the
        answer as SSE events: start (both stored rows), delta (text), done (the final row) or error."""
        conv = await _conversation(conv_id, all_messages=True)
        by_id = {m["id"]: m for m in conv["messages"]}
        regeneration_of, content = None, None
        if body.regenerate_of is not None:
            orig = by_id.get(body.regenerate_of)
            if orig is None or orig["role"] != "assistant":
                raise APIError(404, f"no assistant message {body.regenerate_of} in this conversation",
                               "regenerate_of", "not_found")
            parent_id, regeneration_of = orig["parent_id"], orig["id"]
        else:
            content = (body.content or "").strip()
            if not content:
                raise APIError(400, "the message is empty; type something", "content")
            if body.edit_of is not None:
                orig = by_id.get(body.edit_of)
                if orig is None or orig["role"] != "user":
                    raise APIError(404, f"no user message {body.edit_of} in this conversation", "edit_of", "not_found")
                parent_id = orig["parent_id"]
            elif body.parent_id is not None:
                if body.parent_id not in by_id:
                    raise APIError(404, f"no message {body.parent_id} in this conversation", "parent_id", "not_found")
                parent_id = body.parent_id
            else:
                parent_id = max(by_id) if by_id else None
        settings = UISettings.model_validate({**(conv["settings"] or {}),
                                              **(body.settings.model_dump(exclude_none=True) if body.settings else {})})
        srv.check_request(SamplingFields(), settings.max_tokens)
        if body.system_prompt is not None or body.settings is not None:
            await asyncio.to_thread(store.update_conversation, conv_id, system_prompt=body.system_prompt,
                                    settings=settings.model_dump(exclude_none=True))
        user_msg = None
        if content is not None:  # stored before generation: a crash mid-answer keeps the question
            user_msg = await asyncio.to_thread(store.add_message, conv_id, "user", content, parent_id)
            parent_id = user_msg["id"]
        history = await asyncio.to_thread(store.context_for, conv_id, parent_id)
        prompt, max_tokens = await backend.prepare(Prompt(messages=history), settings.max_tokens,
                                                   cfg.generate.max_new_tokens, fit=True)
        params = srv.params(settings.temperature, settings.top_p, max_tokens)
        t0 = time.monotonic()
        answer = await srv.new_answer(conv_id, parent_id, prompt, params, regeneration_of)
        queue: asyncio.Queue = asyncio.Queue()

        async def job():
            try:
                queue.put_nowait(("done", await srv.run_choice(prompt, params, answer["id"], t0,
                                                               emit=lambda t: queue.put_nowait(("delta", t)))))
            except APIError as e:
                queue.put_nowait(("error", e))

        async def events():
            task = asyncio.create_task(job())
            try:
                yield sse({"type": "start", "user_message": user_msg, "assistant_message": answer})
                last_check = time.monotonic()
                while True:
                    items = await drain(queue)
                    if time.monotonic() - last_check > 0.5:
                        last_check = time.monotonic()
                        if await request.is_disconnected():
                            return
                    text = "".join(val for what, val in items if what == "delta")
                    if text:
                        yield sse({"type": "delta", "text": text})
                    for what, val in items:
                        if what == "done":
                            final = await asyncio.to_thread(store.get_message, answer["id"])
                            yield sse({"type": "done", "message": final})
                            return
                        if what == "error":
                            yield sse({"type": "error"} | val.body())
                            return
            finally:
                task.cancel()  # the UI's stop button aborts the request: stop generating, keep the partial answer

        return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)

    @app.post("/api/messages/{msg_id}/feedback")
    async def feedback(msg_id: int, body: FeedbackIn):
        fields = body.model_dump(exclude_unset=True)
        if not fields:
            raise APIError(400, "send at least one of rating (+1/-1/0), comment, correction", "rating")
        fb = await asyncio.to_thread(store.set_feedback, msg_id, **fields)
        if fb is None:
            raise APIError(404, f"message {msg_id} not found", "message_id", "not_found")
        return fb

    # ------------------------------------------------------------------------------------------ pages
    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/login", include_in_schema=False)
    async def login_page():
        return FileResponse(STATIC / "login.html")

    @app.post("/login", include_in_schema=False)
    async def login(request: Request):
        return await auth.login(request)

    @app.post("/logout", include_in_schema=False)
    async def logout(request: Request):
        return auth.logout(request)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def serve(model_dir, cfg: ProjectConfig) -> None:
    """Run the server (blocking) on cfg.serve.host:port."""
    import uvicorn

    sc = cfg.serve
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if sc.host not in ("127.0.0.1", "localhost", "::1") and not sc.api_key:
        log.warning("listening on %s without an API key: anyone who can reach this port can use the model and "
                    "read the stored conversations; set --api-key or GPTSMITH_API_KEY", sc.host)
    if sc.backend_url:
        from gptsmith.serve.backends import check_backend
        check_backend(sc.backend_url, os.environ.get("GPTSMITH_BACKEND_API_KEY"))
    app = create_app(cfg, model_dir)
    name = app.state.server.backend.name or sc.backend_url
    print(f"gptsmith serve: {name} on http://{sc.host}:{sc.port}  (chat UI at /, OpenAI API at /v1, store {sc.db})",
          flush=True)
    uvicorn.run(app, host=sc.host, port=sc.port, log_level="info", timeout_graceful_shutdown=5)
