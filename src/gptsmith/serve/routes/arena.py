"""The blind arena's JSON API and the leaderboard (the logic: serve/arena.py)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Request

from gptsmith.serve import arena
from gptsmith.serve.routes import ServerDep
from gptsmith.serve.schemas import INT64_MAX

router = APIRouter()
BattleId = Annotated[int, Path(ge=1, le=INT64_MAX)]


@router.post("/api/arena/battles")
async def start_battle(body: arena.BattleIn, request: Request, srv: ServerDep):
    """Ask two randomly picked served models the same question; both answers stream as SSE, labelled a and b."""
    return await arena.start_battle(srv, request, body)


@router.get("/api/arena/battles/{battle_id}")
async def get_battle(battle_id: BattleId, srv: ServerDep):
    return await arena.get_battle(srv, battle_id)


@router.post("/api/arena/battles/{battle_id}/vote")
async def vote(battle_id: BattleId, body: arena.VoteIn, srv: ServerDep):
    return await arena.vote(srv, battle_id, body.winner)


@router.get("/api/leaderboard")
async def leaderboard(srv: ServerDep, n_bootstrap: Annotated[int, Query(ge=0, le=2000)] = 200,
                      by_version: bool = False):
    return await arena.leaderboard(srv, n_bootstrap, by_version)
