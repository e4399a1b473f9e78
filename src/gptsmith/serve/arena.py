"""The blind arena: one question, two answers from two served models (or assistants) picked at random and shown
as "A" and "B"; the user votes A, B, tie or both bad, and only then learns which model wrote which answer.

    POST /api/arena/battles            {"content": "...", "max_tokens"?}  -> SSE: start, delta (side a|b), done, end
    GET  /api/arena/battles/{id}       the battle; the model names only once it has its vote
    POST /api/arena/battles/{id}/vote  {"winner": "a" | "b" | "tie" | "both_bad"}  -> the battle, names revealed
    GET  /api/leaderboard              Elo and Bradley-Terry ratings with bootstrap intervals (eval/ratings.py)

Each battle is a conversation of its own (source "arena") whose question has the two answers as sibling
assistant messages, so the store keeps them like any answer (history, feedback, `feedback export`: a voted
battle is a DPO pair). Nothing an arena route sends before the vote names a model, and the stored answers carry
no model name until then either (serve/store.py, ArenaBattle).
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass
from typing import Literal

from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import Field

from gptsmith.serve.backends import GenParams, Prompt
from gptsmith.serve.schemas import APIError, Lenient, SamplingFields, TokenCount
from gptsmith.serve.server import AssistPlan, Served, Server, as_api_error, drain
from gptsmith.serve.store import AlreadyVoted
from gptsmith.serve.streams import event_stream, sse

SIDES = ("a", "b")
_pick = random.SystemRandom()  # which models meet, and on which side: not guessable from earlier battles


class BattleIn(Lenient):
    content: str | None = Field(None, description="the question both models answer")
    max_tokens: TokenCount | None = Field(None, description="answer length; default: each model's own")


class VoteIn(Lenient):
    winner: Literal["a", "b", "tie", "both_bad"] = Field(description="the better answer, or tie / both bad")


@dataclass
class Side:
    """One contestant of a battle, checked and ready to answer."""
    served: Served
    plan: AssistPlan | None
    prompt: Prompt
    params: GenParams


def pick_pair(srv: Server) -> list[Served]:
    """Two different served names, in random order; 409 when the server serves fewer than two."""
    if len(srv.served) < 2:
        raise APIError(409, f"The arena compares two models, and this server serves one ('{srv.served[0].name}'). "
                            "Serve two or more: gptsmith serve --model DIR --assistant BOT.yaml, or "
                            "--assistant A.yaml B.yaml.", None, "arena_needs_two_models")
    return _pick.sample(srv.served, 2)


async def prepare_side(srv: Server, served: Served, question: list[dict], max_tokens: int | None) -> Side:
    plan = await srv.assist(served, question, max_tokens)
    max_tokens = max_tokens or (plan.sampling.get("max_tokens") if plan else None)
    prompt, max_tokens = await srv.prepare(Prompt(messages=plan.messages if plan else question), max_tokens,
                                           fit=True, served=served)
    return Side(served, plan, prompt, srv.params(None, None, max_tokens, served=served, plan=plan))


async def start_battle(srv: Server, request: Request, body: BattleIn) -> StreamingResponse:
    """Check everything (two models, the question, its length for both), then store the question, both empty
    answers and the battle, and stream both answers."""
    content = (body.content or "").strip()
    if not content:
        raise APIError(400, "the message is empty; type a question for both models", "content")
    srv.check_request(SamplingFields(), body.max_tokens)
    question = [{"role": "user", "content": content}]
    sides = [await prepare_side(srv, s, question, body.max_tokens) for s in pick_pair(srv)]
    store = srv.store
    conv = await asyncio.to_thread(store.create_conversation, source="arena")
    user = await asyncio.to_thread(store.add_message, conv["id"], "user", content)
    t0 = time.monotonic()
    answers = [await srv.new_answer(conv["id"], user["id"], s.prompt, s.params, served=s.served, plan=s.plan)
               for s in sides]
    battle = await asyncio.to_thread(store.add_battle, conv["id"], user["id"], answers[0]["id"], answers[1]["id"],
                                     sides[0].served.name, sides[1].served.name, sides[0].served.backend.version,
                                     sides[1].served.backend.version)
    return event_stream(_events(srv, request, battle["id"], dict(zip(SIDES, sides)), dict(zip(SIDES, answers)), t0))


async def _events(srv: Server, request: Request, battle_id: int, sides: dict[str, Side], answers: dict[str, dict],
                  t0: float):
    """SSE events: start (the battle's ids), delta {side, text}, done {side, answer} or error {side, error} for
    each side, and end (the battle, still without names)."""
    queue: asyncio.Queue = asyncio.Queue()
    tasks = [asyncio.create_task(_answer(srv, side, sides[side], answers[side]["id"], t0, queue)) for side in SIDES]
    try:
        yield sse({"type": "start", "battle_id": battle_id, "conversation_id": answers["a"]["conversation_id"],
                   "a": {"message_id": answers["a"]["id"]}, "b": {"message_id": answers["b"]["id"]}})
        finished: set[str] = set()
        last_check = time.monotonic()
        while len(finished) < len(SIDES):
            items = await drain(queue)
            if time.monotonic() - last_check > 0.5:
                last_check = time.monotonic()
                if await request.is_disconnected():
                    return
            for side in SIDES:
                text = "".join(val for s, what, val in items if s == side and what == "delta")
                if text:
                    yield sse({"type": "delta", "side": side, "text": text})
            for side, what, val in items:
                if what == "done":
                    finished.add(side)
                    yield sse({"type": "done", "side": side,
                               "answer": {"content": val["content"], "finish_reason": val["finish_reason"]}})
                elif what == "error":
                    finished.add(side)
                    yield sse({"type": "error", "side": side} | val.body())
        yield sse({"type": "end", "battle": public(await asyncio.to_thread(srv.store.get_battle, battle_id))})
    finally:
        for t in tasks:  # client gone: stop both answers, keep what they wrote
            t.cancel()


async def _answer(srv: Server, side: str, s: Side, msg_id: int, t0: float, queue: asyncio.Queue) -> None:
    def emit(text: str, kind: str) -> None:
        if kind == "content":  # an assistant's chain of thought stays out of the arena, as it stays folded in chat
            queue.put_nowait((side, "delta", text))

    try:
        result = await srv.run_choice(s.prompt, s.params, msg_id, t0, emit=emit, request_id=f"answer {msg_id}",
                                      served=s.served, plan=s.plan)
        queue.put_nowait((side, "done", result))
    except Exception as e:  # every failure reaches the client, or its stream would wait forever
        queue.put_nowait((side, "error", as_api_error(e, f"answer {msg_id}")))


def public(battle: dict | None) -> dict | None:
    """The battle as clients see it: the model names only once it has its vote."""
    if battle is None or battle["winner"] is not None:
        return battle
    return {k: v for k, v in battle.items() if k not in ("model_a", "model_b")}


async def get_battle(srv: Server, battle_id: int) -> dict:
    battle = await asyncio.to_thread(srv.store.get_battle, battle_id)
    if battle is None:
        raise APIError(404, f"arena battle {battle_id} not found", "battle_id", "not_found")
    return public(battle)


async def vote(srv: Server, battle_id: int, winner: str) -> dict:
    """Record the vote, once; the reply names both models."""
    battle = await get_battle(srv, battle_id)
    if any(battle[side] is not None and battle[side]["finish_reason"] is None for side in SIDES):
        raise APIError(409, f"arena battle {battle_id} is still answering; vote once both answers have ended",
                       "battle_id", "battle_not_finished")
    try:
        voted = await asyncio.to_thread(srv.store.vote_battle, battle_id, winner)
    except AlreadyVoted as e:
        raise APIError(409, f"{e}; each battle takes one vote. Start a new battle to vote again.", "winner",
                       "already_voted") from None
    if voted is None:
        raise APIError(404, f"arena battle {battle_id} not found", "battle_id", "not_found")
    return voted


async def leaderboard(srv: Server, n_bootstrap: int = 200, by_version: bool = False) -> dict:
    """Every vote in the store, rated (on a worker thread: the bootstrap refits the ratings n_bootstrap times)."""
    from gptsmith.eval.ratings import leaderboard as rate

    votes = await asyncio.to_thread(srv.store.list_votes, by_version)
    rows = await asyncio.to_thread(rate, votes, n_bootstrap)
    return {"votes": len(votes), "n_bootstrap": n_bootstrap, "models": rows}


def stored_leaderboard(db_url: str, n_bootstrap: int = 200, seed: int = 0, by_version: bool = False) -> dict:
    """`gptsmith leaderboard`: the votes in the store at `db_url`, rated (by_version: each model version apart)."""
    from gptsmith.eval.ratings import leaderboard as rate
    from gptsmith.serve.feedback import open_store

    store = open_store(db_url)
    try:
        votes = store.list_votes(by_version)
    finally:
        store.close()
    return {"votes": len(votes), "n_bootstrap": n_bootstrap, "models": rate(votes, n_bootstrap, seed)}
