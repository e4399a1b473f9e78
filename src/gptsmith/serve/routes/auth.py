"""Login and logout for the browser UI (API clients send `Authorization: Bearer KEY` instead); the key checks
themselves live in serve/auth.py."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import parse_qs

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, RedirectResponse

from gptsmith.serve.auth import COOKIE, key_ok
from gptsmith.serve.routes import ServerDep

STATIC = Path(__file__).parent.parent / "static"
router = APIRouter(include_in_schema=False)


@router.get("/login")
async def login_page():
    return FileResponse(STATIC / "login.html")


@router.post("/login")
async def login(request: Request, srv: ServerDep):
    raw = (await request.body()).decode("utf-8", "replace")
    if request.headers.get("content-type", "").startswith("application/json"):
        try:
            key = str(json.loads(raw).get("key", ""))
        except (ValueError, AttributeError):
            key = ""
    else:
        key = (parse_qs(raw).get("key") or [""])[0]
    if not srv.sc.api_key:
        return RedirectResponse("/", status_code=303)
    if not key_ok(key, srv.sc.api_key):
        return RedirectResponse("/login?error=1", status_code=303)
    resp = RedirectResponse("/", status_code=303)
    resp.set_cookie(COOKIE, key, httponly=True, samesite="strict", max_age=30 * 24 * 3600,
                    secure=request.url.scheme == "https")
    return resp


@router.post("/logout")
async def logout():
    resp = RedirectResponse("/login", status_code=303)
    resp.delete_cookie(COOKIE)
    return resp
