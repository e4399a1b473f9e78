"""The server's routes, one router per concern: openai.py (/v1, what API clients use), ui.py (the web UI's page
and its /api), arena.py (the blind arena and the leaderboard), auth.py (login and logout). Routes parse
requests and shape replies; the serving logic they share is the Server (serve/server.py) that every route gets
through the `ServerDep` dependency."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from gptsmith.serve.server import Server


def get_server(request: Request) -> Server:
    return request.app.state.server


ServerDep = Annotated[Server, Depends(get_server)]


def route_table(app) -> list:
    """Every route the app answers, flat. Recent FastAPI keeps each included router as one nested entry of
    `app.routes`; this walks into them, so a check over all routes (auth on every route) misses none."""
    flat: list = []

    def walk(routes) -> None:
        for route in routes:
            inner = getattr(route, "original_router", None)
            if inner is not None:
                walk(inner.routes)
            else:
                flat.append(route)

    walk(app.routes)
    return flat
