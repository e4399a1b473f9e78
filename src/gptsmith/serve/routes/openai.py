"""The OpenAI-compatible API: /v1/models, /v1/chat/completions, /v1/completions, and /health."""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Request

from gptsmith.serve.backends import Prompt
from gptsmith.serve.routes import ServerDep
from gptsmith.serve.schemas import (APIError, ChatCompletion, ChatCompletionRequest, CompletionRequest, ErrorResponse,
                                    ModelCard, ModelList, TextCompletion)
from gptsmith.serve.streams import Completion, Target

ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 429)}
router = APIRouter()


@router.get("/health")
async def health(srv: ServerDep):
    return {"status": "ok", "model": srv.backend.name}


@router.get("/v1/models", response_model=ModelList)
async def models(srv: ServerDep):
    return ModelList(data=[ModelCard(id=srv.backend.name, created=int(time.time()))])


@router.get("/v1/models/{model}", response_model=ModelCard, responses=ERRORS)
async def model_card(model: str, srv: ServerDep):
    srv.check_model(model)
    return ModelCard(id=srv.backend.name, created=int(time.time()))


@router.post("/v1/chat/completions", response_model=ChatCompletion, responses=ERRORS)
async def chat_completions(body: ChatCompletionRequest, request: Request, srv: ServerDep):
    srv.check_model(body.model)
    msgs = body.chat()
    max_tokens = body.max_completion_tokens or body.max_tokens
    srv.check_request(body, max_tokens, n_messages=len(msgs))
    prompt, max_tokens = await srv.prepare(Prompt(messages=msgs), max_tokens, fit=False)
    params = srv.params(body.temperature, body.top_p, max_tokens, body.stop_list(), body.seed)
    conv = await asyncio.to_thread(srv.store.create_conversation, source="api",
                                   settings={"endpoint": "chat.completions", "user": body.user})
    parent = await asyncio.to_thread(srv.store.add_chain, conv["id"], msgs)
    return await _answer(srv, request, Completion(srv, "chat", body, [Target(conv["id"], parent, prompt)]), params)


@router.post("/v1/completions", response_model=TextCompletion, responses=ERRORS)
async def completions(body: CompletionRequest, request: Request, srv: ServerDep):
    srv.check_model(body.model)
    texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if not texts:
        raise APIError(400, "prompt is an empty list; send a string or a list of strings", "prompt")
    srv.check_request(body, body.max_tokens, n_prompts=len(texts))
    prompts, max_tokens = [], body.max_tokens
    for text in texts:  # every prompt is checked before anything is stored
        prompt, mt = await srv.prepare(Prompt(text=text), body.max_tokens, fit=False)
        prompts.append(prompt)
        max_tokens = mt if max_tokens is None else min(max_tokens, mt)
    targets = []
    for text, prompt in zip(texts, prompts):
        conv = await asyncio.to_thread(srv.store.create_conversation, source="api",
                                       settings={"endpoint": "completions", "user": body.user})
        parent = await asyncio.to_thread(srv.store.add_chain, conv["id"], [{"role": "user", "content": text}])
        targets.append(Target(conv["id"], parent, prompt))
    params = srv.params(body.temperature, body.top_p, max_tokens, body.stop_list(), body.seed)
    return await _answer(srv, request, Completion(srv, "text", body, targets), params)


async def _answer(srv, request: Request, completion: Completion, params):
    await completion.store_answers(params)
    return completion.stream(request) if completion.body.stream else await completion.reply(request)
