"""Login and logout for the browser UI (API clients send `Authorization: Bearer KEY` instead); the key checks,
the signed session token and the failure limit live in serve/auth.py."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse

STATIC = Path(__file__).parent.parent / "static"
router = APIRouter(include_in_schema=False)


@router.get("/login")
async def login_page():
    return FileResponse(STATIC / "login.html")


@router.post("/login")
async def login(request: Request):
    return await request.app.state.auth.login(request)


@router.post("/logout")
async def logout(request: Request):
    return request.app.state.auth.logout(request)
