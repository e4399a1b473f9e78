"""The server's front door, as one ASGI middleware: API key, request body size and rate limit.

It wraps every route (the UI's static files included), which a FastAPI dependency could not do, and it never
buffers responses, so streaming passes straight through. The key is accepted as `Authorization: Bearer KEY`
(API clients) or as the `gptsmith_key` cookie that POST /login sets for the browser UI. The cookie is HttpOnly
and SameSite=Strict: page scripts cannot read it and other sites cannot make the browser send it.
"""

from __future__ import annotations

import hmac
import json
import math
from http.cookies import SimpleCookie

from starlette.exceptions import HTTPException

from gptsmith.serve.limits import RateLimiter
from gptsmith.serve.schemas import APIError

COOKIE = "gptsmith_key"
OPEN_PATHS = {"/login", "/health"}  # the login page must load without a key; /health reveals nothing
PAGE_PATHS = {"/", "/index.html"}  # browsers asking for the UI get redirected to /login instead of a 401


def request_key(scope) -> str | None:
    headers = dict(scope.get("headers") or [])
    auth = headers.get(b"authorization", b"").decode("latin-1")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    cookie = headers.get(b"cookie", b"").decode("latin-1")
    if cookie:
        jar = SimpleCookie()
        try:
            jar.load(cookie)
        except Exception:
            return None
        if COOKIE in jar:
            return jar[COOKIE].value
    return None


def key_ok(given: str | None, expected: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


class Guard:
    def __init__(self, app, api_key: str | None, max_body_bytes: int, rate_limit_per_minute: int):
        self.app = app
        self.api_key = api_key
        self.max_body = max_body_bytes
        self.limiter = RateLimiter(rate_limit_per_minute) if rate_limit_per_minute > 0 else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        key = request_key(scope)
        if self.api_key and path not in OPEN_PATHS and not key_ok(key, self.api_key):
            if path in PAGE_PATHS and scope["method"] == "GET":
                return await _send(send, 303, b"", [(b"location", b"/login")])
            return await _error(send, APIError(401, "Missing or wrong API key. Send it as 'Authorization: Bearer "
                                                    "KEY' (the server's --api-key or GPTSMITH_API_KEY).",
                                               code="invalid_api_key"))
        if self.limiter and (path.startswith("/v1/") or path.startswith("/api/")):
            client = f"key:{key}" if self.api_key else f"ip:{(scope.get('client') or ('?',))[0]}"
            wait = self.limiter.check(client)
            if wait > 0:
                return await _error(send, APIError(429, f"Rate limit reached; retry in {math.ceil(wait)} s.",
                                                   code="rate_limit_exceeded",
                                                   headers={"retry-after": str(math.ceil(wait))}))
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            return await _error(send, _too_large(int(length), self.max_body))

        seen = 0

        async def limited_receive():  # bodies without Content-Length (chunked) are counted as they arrive
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_body:  # FastAPI re-raises HTTPExceptions from body reads; ours formats it
                    raise HTTPException(413, _too_large(seen, self.max_body).message)
            return msg

        await self.app(scope, limited_receive, send)


def _too_large(size: int, limit: int) -> APIError:
    return APIError(413, f"Request body is {size} bytes; this server accepts at most {limit} "
                         "(serve.max_body_bytes). Send fewer or shorter messages.", code="request_too_large")


async def _send(send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]):
    await send({"type": "http.response.start", "status": status,
                "headers": headers + [(b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def _error(send, err: APIError):
    extra = [(k.encode(), v.encode()) for k, v in (err.headers or {}).items()]
    await _send(send, err.status, json.dumps(err.body()).encode(), [(b"content-type", b"application/json")] + extra)
