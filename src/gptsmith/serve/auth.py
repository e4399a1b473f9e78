"""The server's front door, as one ASGI middleware: API key, request body size and rate limit.

It wraps every route (the UI's static files included), which a FastAPI dependency could not do, and it never
buffers responses, so streaming passes straight through. Credentials are `Authorization: Bearer KEY` (API
clients) or the `gptsmith_session` cookie that POST /login sets for the browser UI.

The cookie never holds the key: it is a signed session token, `EXPIRY.NONCE.HMAC`, signed with a key derived
from the API key and a random secret made when the server starts (so a restart or a new API key logs every
browser out). It is HttpOnly and SameSite=Strict: page scripts cannot read it and other sites cannot make the
browser send it. POST /logout revokes the token on the server, not only in the browser.

Failed authentications (a wrong key at /login or in a Bearer header, a forged or expired cookie) are limited
per client IP, `serve.auth_failures_per_minute`: past it, that IP gets 429 + Retry-After for key attempts
until its budget refills, whether the key is right or not (else guessing would go on at full speed).
Keys are compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import secrets
import threading
import time
from http.cookies import SimpleCookie
from urllib.parse import parse_qs

from fastapi import Request
from fastapi.responses import JSONResponse, RedirectResponse
from starlette.exceptions import HTTPException

from gptsmith.serve.limits import RateLimiter
from gptsmith.serve.schemas import APIError

COOKIE = "gptsmith_session"
OPEN_PATHS = {"/login", "/health"}  # the login page must load without a key; /health reveals nothing
PAGE_PATHS = {"/", "/index.html"}  # browsers asking for the UI get redirected to /login instead of a 401


def key_ok(given: str | None, expected: str) -> bool:
    """Constant time, length included: the digests compared always have the same length."""
    if given is None:
        return False
    return hmac.compare_digest(hashlib.sha256(given.encode()).digest(), hashlib.sha256(expected.encode()).digest())


def client_ip(scope) -> str:
    return (scope.get("client") or ("?",))[0]


def _header(scope, name: bytes) -> str:
    for k, v in scope.get("headers") or []:
        if k == name:
            return v.decode("latin-1")
    return ""


def bearer_key(scope) -> str | None:
    auth = _header(scope, b"authorization")
    return auth[7:].strip() if auth.lower().startswith("bearer ") else None


def session_cookie(scope) -> str | None:
    cookie = _header(scope, b"cookie")
    if not cookie:
        return None
    jar = SimpleCookie()
    try:
        jar.load(cookie)
    except Exception:  # a malformed Cookie header is no credential, not a server error
        return None
    return jar[COOKIE].value if COOKIE in jar else None


class Auth:
    """The API key, the browser sessions signed with it, and the budget of failed attempts per client IP."""

    def __init__(self, api_key: str | None, session_hours: float = 168.0, failures_per_minute: int = 10):
        self.api_key = api_key or None
        self.session_s = session_hours * 3600
        self.failures = RateLimiter(failures_per_minute) if failures_per_minute > 0 else None
        secret = secrets.token_bytes(32)  # per process: a restart logs everyone out
        self._signing_key = hmac.new(secret, (api_key or "").encode(), hashlib.sha256).digest()
        self._revoked: dict[str, float] = {}  # nonce -> expiry of tokens logged out before they expired
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------------ session tokens
    def _sign(self, payload: str) -> str:
        return hmac.new(self._signing_key, payload.encode(), hashlib.sha256).hexdigest()

    def new_session(self) -> str:
        payload = f"{int(time.time() + self.session_s)}.{secrets.token_hex(16)}"
        return f"{payload}.{self._sign(payload)}"

    def _parse(self, token: str | None) -> tuple[int, str] | None:
        """(expiry, nonce) of a token this server signed, still unexpired and not logged out; else None."""
        parts = (token or "").split(".")
        if len(parts) != 3 or not parts[0].isdigit():
            return None
        expiry, nonce, sig = int(parts[0]), parts[1], parts[2]
        if not hmac.compare_digest(self._sign(f"{parts[0]}.{nonce}").encode(), sig.encode()):
            return None
        if expiry <= time.time():
            return None
        with self._lock:
            if nonce in self._revoked:
                return None
        return expiry, nonce

    def session_ok(self, token: str | None) -> bool:
        return self._parse(token) is not None

    def revoke(self, token: str | None) -> None:
        parsed = self._parse(token)
        if parsed is None:
            return
        now = time.time()
        with self._lock:  # expired tokens are refused anyway: only unexpired ones need remembering
            self._revoked = {n: e for n, e in self._revoked.items() if e > now}
            self._revoked[parsed[1]] = parsed[0]

    # ------------------------------------------------------------------------------------ failed attempts
    def locked_out(self, scope) -> APIError | None:
        """A 429 for a client IP that has spent its budget of failed attempts, else None."""
        wait = self.failures.wait(client_ip(scope)) if self.failures is not None else 0.0
        if wait <= 0:
            return None
        s = math.ceil(wait)
        return APIError(429, f"Too many failed authentication attempts from this address; retry in {s} s "
                             "(serve.auth_failures_per_minute).", code="too_many_auth_failures",
                        headers={"retry-after": str(s)})

    def failed(self, scope) -> None:
        if self.failures is not None:
            self.failures.check(client_ip(scope))

    # ------------------------------------------------------------------------------------ the two routes
    async def login(self, request: Request):
        """POST /login: the key as a form field or JSON `{"key": ...}` -> a session cookie and back to the UI."""
        if not self.api_key:
            return RedirectResponse("/", status_code=303)
        locked = self.locked_out(request.scope)
        if locked is not None:
            return JSONResponse(locked.body(), status_code=429, headers=locked.headers)
        key = _login_key(request.headers.get("content-type", ""), await request.body())
        if not key_ok(key, self.api_key):
            self.failed(request.scope)
            return RedirectResponse("/login?error=1", status_code=303)
        resp = RedirectResponse("/", status_code=303)
        resp.set_cookie(COOKIE, self.new_session(), httponly=True, samesite="strict", max_age=int(self.session_s),
                        secure=request.url.scheme == "https")
        return resp

    def logout(self, request: Request):
        """POST /logout: the session token stops working here and now, and the browser forgets it."""
        self.revoke(session_cookie(request.scope))
        resp = RedirectResponse("/login", status_code=303)
        resp.delete_cookie(COOKIE, httponly=True, samesite="strict")
        return resp


def _login_key(content_type: str, body: bytes) -> str:
    raw = body.decode("utf-8", "replace")
    if content_type.startswith("application/json"):
        try:
            return str(json.loads(raw).get("key", ""))
        except (ValueError, AttributeError):
            return ""
    return (parse_qs(raw).get("key") or [""])[0]


class Guard:
    def __init__(self, app, auth: Auth, max_body_bytes: int, rate_limit_per_minute: int):
        self.app = app
        self.auth = auth
        self.max_body = max_body_bytes
        self.limiter = RateLimiter(rate_limit_per_minute) if rate_limit_per_minute > 0 else None

    def _check_credentials(self, scope) -> APIError | None:
        """None when the request may go on (authenticated, or the route is public)."""
        auth = self.auth
        if not auth.api_key or scope["path"] in OPEN_PATHS:
            return None
        key, token = bearer_key(scope), session_cookie(scope)
        if key is None and auth.session_ok(token):
            return None  # a valid session cannot be guessed, so it passes even while its IP is locked out
        if key is None and token is None:
            return APIError(401, "Missing API key. Send it as 'Authorization: Bearer KEY' (the server's --api-key "
                                 "or GPTSMITH_API_KEY), or log in at /login.", code="invalid_api_key")
        locked = auth.locked_out(scope)
        if locked is not None:
            return locked
        if key is not None and key_ok(key, auth.api_key):
            return None
        auth.failed(scope)
        what = "API key is wrong" if key is not None else "session has expired or was logged out; log in again"
        return APIError(401, f"The {what}. Send the key as 'Authorization: Bearer KEY' (the server's --api-key "
                             "or GPTSMITH_API_KEY).", code="invalid_api_key")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        refused = self._check_credentials(scope)
        if refused is not None:
            if refused.status == 401 and path in PAGE_PATHS and scope["method"] == "GET":
                return await _send(send, 303, b"", [(b"location", b"/login")])
            return await send_error(send, refused)
        if self.limiter is not None and (path.startswith("/v1/") or path.startswith("/api/")):
            client = "key" if self.auth.api_key else f"ip:{client_ip(scope)}"
            wait = self.limiter.check(client)
            if wait > 0:
                return await send_error(send, APIError(429, f"Rate limit reached; retry in {math.ceil(wait)} s.",
                                                       code="rate_limit_exceeded",
                                                       headers={"retry-after": str(math.ceil(wait))}))
        length = _header(scope, b"content-length")
        if length.isdigit() and int(length) > self.max_body:
            return await send_error(send, _too_large(int(length), self.max_body))

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


async def send_error(send, err: APIError):
    """An OpenAI-shaped error straight from a middleware (no route ran)."""
    extra = [(k.encode(), v.encode()) for k, v in (err.headers or {}).items()]
    await _send(send, err.status, json.dumps(err.body()).encode(), [(b"content-type", b"application/json")] + extra)
