"""The web UI: its page and its JSON API (/api/...): conversations, messages (new, edited, regenerated; the
answer streams as SSE) and feedback."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path as FilePath
from typing import Annotated

from fastapi import APIRouter, Path, Request
from fastapi.responses import FileResponse

from gptsmith.serve.backends import Prompt
from gptsmith.serve.routes import ServerDep
from gptsmith.serve.schemas import (INT64_MAX, APIError, ConversationCreate, ConversationPatch, FeedbackIn,
                                    SamplingFields, SendMessage, UISettings)
from gptsmith.serve.server import Served, Server
from gptsmith.serve.streams import UITurn, ui_stream

STATIC = FilePath(__file__).parent.parent / "static"
router = APIRouter()


@router.get("/", include_in_schema=False)
async def index():
    return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


@router.get("/api/info")
async def info(srv: ServerDep):
    """The default model's facts (top level) and every served model and assistant (`models`, for the picker)."""
    sc = srv.sc
    models = [_model_info(srv, s) for s in srv.served]
    return models[0] | {"model": models[0]["id"], "models": models, "max_tokens_limit": sc.max_tokens_limit,
                        "auth": bool(sc.api_key)}


def _model_info(srv: Server, served: Served) -> dict:
    b, a = served.backend, served.assistant
    max_tokens = srv.assistant_max_tokens(served) if a is not None else srv.default_max_tokens(served)
    mine = {k: getattr(a.profile.sampling, k) for k in ("temperature", "top_p")} if a is not None else {}
    return {"id": served.name, "version": b.version, "max_context": b.max_context, "assistant": a is not None,
            "rag": served.index_dir is not None,
            "defaults": srv.defaults_for(served) | {k: v for k, v in mine.items() if v is not None}
            | {"max_tokens": max_tokens}}


@router.get("/api/conversations")
async def list_conversations(srv: ServerDep, q: str = "", source: str | None = None, limit: int = 200):
    return await asyncio.to_thread(srv.store.list_conversations, q, min(max(limit, 1), 1000), source)


@router.post("/api/conversations")
async def create_conversation(body: ConversationCreate, srv: ServerDep):
    return await asyncio.to_thread(srv.store.create_conversation, body.title, body.system_prompt,
                                   body.settings.model_dump(exclude_none=True))


async def conversation(srv: Server, conv_id: str, all_messages: bool = False) -> dict:
    conv = await asyncio.to_thread(srv.store.get_conversation, conv_id, all_messages)
    if conv is None:
        raise APIError(404, f"conversation '{conv_id}' not found", "conversation_id", "not_found")
    return conv


@router.get("/api/conversations/{conv_id}")
async def get_conversation(conv_id: str, srv: ServerDep, all: bool = False):
    return await conversation(srv, conv_id, all)


@router.patch("/api/conversations/{conv_id}")
async def patch_conversation(conv_id: str, body: ConversationPatch, srv: ServerDep):
    settings = None if body.settings is None else body.settings.model_dump(exclude_none=True)
    conv = await asyncio.to_thread(srv.store.update_conversation, conv_id, title=body.title,
                                   system_prompt=body.system_prompt, settings=settings)
    if conv is None:
        raise APIError(404, f"conversation '{conv_id}' not found", "conversation_id", "not_found")
    return conv


@router.delete("/api/conversations/{conv_id}")
async def delete_conversation(conv_id: str, srv: ServerDep):
    if not await asyncio.to_thread(srv.store.delete_conversation, conv_id):
        raise APIError(404, f"conversation '{conv_id}' not found", "conversation_id", "not_found")
    return {"deleted": conv_id}


@router.post("/api/conversations/{conv_id}/messages")
async def send_message(conv_id: str, body: SendMessage, request: Request, srv: ServerDep):
    """Add a user message (new, or an edit of an earlier one) or regenerate an answer, and stream the answer
    as SSE events: start (both stored rows), delta (text), done (the final row) or error. The whole request is
    checked (ids, settings, the prompt against the context) before anything is stored: a rejected message never
    becomes the parent of the next one."""
    conv = await conversation(srv, conv_id, all_messages=True)
    parent_id, content, regeneration_of = _turn(conv, body)
    settings = UISettings.model_validate({**(conv["settings"] or {}),
                                          **(body.settings.model_dump(exclude_none=True) if body.settings else {})})
    served = srv.check_model(settings.model)  # the conversation's model or assistant (the picker); default: the first
    srv.check_request(SamplingFields(), settings.max_tokens)
    system_prompt = conv["system_prompt"] if body.system_prompt is None else body.system_prompt
    history = await asyncio.to_thread(srv.store.context_for, conv_id, parent_id, system_prompt)
    if content is not None:
        history.append({"role": "user", "content": content})
    plan = await srv.assist(served, history, settings.max_tokens)
    max_tokens = settings.max_tokens or (plan.sampling.get("max_tokens") if plan else None)
    prompt, max_tokens = await srv.prepare(Prompt(messages=plan.messages if plan else history), max_tokens,
                                           fit=True, served=served)
    params = srv.params(settings.temperature, settings.top_p, max_tokens, served=served, plan=plan)
    # checked: now store the settings, the question (before generation: a crash mid-answer keeps it), the answer
    if body.system_prompt is not None or body.settings is not None:
        await asyncio.to_thread(srv.store.update_conversation, conv_id, system_prompt=body.system_prompt,
                                settings=settings.model_dump(exclude_none=True))
    user_msg = None
    if content is not None:
        user_msg = await asyncio.to_thread(srv.store.add_message, conv_id, "user", content, parent_id)
        parent_id = user_msg["id"]
    t0 = time.monotonic()
    answer = await srv.new_answer(conv_id, parent_id, prompt, params, regeneration_of, served, plan)
    return ui_stream(srv, request, UITurn(user_msg, answer, prompt, params, t0, served, plan))


def _turn(conv: dict, body: SendMessage) -> tuple[int | None, str | None, int | None]:
    """(parent id, user text or None for a regeneration, the answer regenerated or None) of a SendMessage."""
    by_id = {m["id"]: m for m in conv["messages"]}
    if body.regenerate_of is not None:
        orig = by_id.get(body.regenerate_of)
        if orig is None or orig["role"] != "assistant":
            raise APIError(404, f"no assistant message {body.regenerate_of} in this conversation",
                           "regenerate_of", "not_found")
        return orig["parent_id"], None, orig["id"]
    content = (body.content or "").strip()
    if not content:
        raise APIError(400, "the message is empty; type something", "content")
    if body.edit_of is not None:
        orig = by_id.get(body.edit_of)
        if orig is None or orig["role"] != "user":
            raise APIError(404, f"no user message {body.edit_of} in this conversation", "edit_of", "not_found")
        return orig["parent_id"], content, None
    if body.parent_id is not None:
        if body.parent_id not in by_id:
            raise APIError(404, f"no message {body.parent_id} in this conversation", "parent_id", "not_found")
        return body.parent_id, content, None
    return (max(by_id) if by_id else None), content, None


@router.post("/api/messages/{msg_id}/feedback")
async def feedback(msg_id: Annotated[int, Path(ge=1, le=INT64_MAX)], body: FeedbackIn, srv: ServerDep):
    fields = body.model_dump(exclude_unset=True)
    if not fields:
        raise APIError(400, "send at least one of rating (+1/-1/0), comment, correction", "rating")
    fb = await asyncio.to_thread(srv.store.set_feedback, msg_id, **fields)
    if fb is None:
        raise APIError(404, f"message {msg_id} not found", "message_id", "not_found")
    return fb
