"""The OpenAI-compatible API: /v1/models, /v1/chat/completions, /v1/completions, /v1/embeddings and /health.

Every served name is a model here: the plain model (--model / --backend-url) and each assistant
(--assistant FILE). An assistant's chat completion carries its retrieved passages in an extra top-level
`sources` field (and `dropped` when its context budget left something out); clients that do not know them
ignore them."""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Request

from gptsmith.serve.backends import Prompt
from gptsmith.serve.routes import ServerDep
from gptsmith.serve.embeddings import count_tokens, embedding_inputs, encode_vector
from gptsmith.serve.schemas import (APIError, ChatCompletion, ChatCompletionRequest, CompletionRequest, Embedding,
                                    EmbeddingList, EmbeddingRequest, EmbeddingUsage, ErrorResponse, ModelCard,
                                    ModelList, TextCompletion)
from gptsmith.serve.streams import Completion, Target

ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 429)}
router = APIRouter()


@router.get("/health")
async def health(srv: ServerDep):
    return {"status": "ok", "model": srv.served[0].name}


@router.get("/v1/models", response_model=ModelList)
async def models(srv: ServerDep):
    return ModelList(data=[ModelCard(id=s.name, created=int(time.time())) for s in srv.served])


@router.get("/v1/models/{model}", response_model=ModelCard, responses=ERRORS)
async def model_card(model: str, srv: ServerDep):
    return ModelCard(id=srv.check_model(model).name, created=int(time.time()))


@router.post("/v1/chat/completions", response_model=ChatCompletion, responses=ERRORS)
async def chat_completions(body: ChatCompletionRequest, request: Request, srv: ServerDep):
    served = srv.check_model(body.model)
    msgs = body.chat()
    max_tokens = body.max_completion_tokens or body.max_tokens
    srv.check_request(body, max_tokens, n_messages=len(msgs))
    plan = await srv.assist(served, msgs, max_tokens)  # an assistant's prompt; None for a plain model
    if plan is not None:
        max_tokens = max_tokens or plan.sampling.get("max_tokens")
    prompt, max_tokens = await srv.prepare(Prompt(messages=plan.messages if plan else msgs), max_tokens, fit=False,
                                           served=served)
    params = srv.params(body.temperature, body.top_p, max_tokens, body.stop_list(), body.seed, served, plan)
    conv = await asyncio.to_thread(srv.store.create_conversation, source="api",
                                   settings={"endpoint": "chat.completions", "user": body.user, "model": served.name})
    parent = await asyncio.to_thread(srv.store.add_chain, conv["id"], msgs)  # what the client sent, as it sent it
    completion = Completion(srv, "chat", body, [Target(conv["id"], parent, prompt)], served, plan,
                            body.include_reasoning)
    return await _answer(srv, request, completion, params)


@router.post("/v1/completions", response_model=TextCompletion, responses=ERRORS)
async def completions(body: CompletionRequest, request: Request, srv: ServerDep):
    served = srv.check_model(body.model)
    if served.assistant is not None:
        raise APIError(400, f"'{served.name}' is an assistant: it answers chats; use POST /v1/chat/completions.",
                       "model", "assistant_needs_chat")
    texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if not texts:
        raise APIError(400, "prompt is an empty list; send a string or a list of strings", "prompt")
    srv.check_request(body, body.max_tokens, n_prompts=len(texts))
    prompts, max_tokens = [], body.max_tokens
    for text in texts:  # every prompt is checked before anything is stored
        prompt, mt = await srv.prepare(Prompt(text=text), body.max_tokens, fit=False, served=served)
        prompts.append(prompt)
        max_tokens = mt if max_tokens is None else min(max_tokens, mt)
    targets = []
    for text, prompt in zip(texts, prompts):
        conv = await asyncio.to_thread(srv.store.create_conversation, source="api",
                                       settings={"endpoint": "completions", "user": body.user})
        parent = await asyncio.to_thread(srv.store.add_chain, conv["id"], [{"role": "user", "content": text}])
        targets.append(Target(conv["id"], parent, prompt))
    params = srv.params(body.temperature, body.top_p, max_tokens, body.stop_list(), body.seed, served)
    return await _answer(srv, request, Completion(srv, "text", body, targets, served), params)


async def _answer(srv, request: Request, completion: Completion, params):
    await completion.store_answers(params)
    return completion.stream(request) if completion.body.stream else await completion.reply(request)


@router.post("/v1/embeddings", response_model=EmbeddingList, responses=ERRORS)
async def embeddings(body: EmbeddingRequest, srv: ServerDep):
    """OpenAI's embeddings: `model` is an assistant (its index's embedder) or an embedder's name
    (see serve/embeddings.py); float lists, or base64 float32 as the `openai` package asks for by default."""
    texts = embedding_inputs(body.input)
    embedder = await srv.embedders.get(body.model)
    if body.dimensions is not None and body.dimensions != embedder.dim:
        raise APIError(400, f"'{body.model}' makes {embedder.dim}-dimensional vectors and cannot shorten them; "
                            "leave dimensions out", "dimensions")
    vectors, n = await asyncio.to_thread(lambda: (embedder.embed(texts), sum(count_tokens(embedder, t) for t in texts)))
    data = [Embedding(index=i, embedding=encode_vector(v, body.encoding_format)) for i, v in enumerate(vectors)]
    return EmbeddingList(data=data, model=body.model, usage=EmbeddingUsage(prompt_tokens=n, total_tokens=n))
