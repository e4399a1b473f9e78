"""What keeps other web sites out of a server that has no API key (the default on localhost), as one pure ASGI
middleware (it never buffers a response, so streams pass straight through). Three rules, in this order:

1. Host (DNS rebinding): a request that arrives on a loopback address must name the server as localhost,
   127.0.0.1 or [::1] (any port) or a name in `serve.allowed_hosts` ("*" turns the check off); else 421.
   Without it, a page on evil.example whose DNS name is rebound to 127.0.0.1 is "same origin" with the server
   and can read and delete every stored conversation.
2. Origin (CSRF): a POST/PUT/PATCH/DELETE sent by a browser from another origin (its Origin header, or
   `Sec-Fetch-Site: cross-site`) is refused with 403 unless that origin is in `serve.cors_origins`. The
   server's own pages (`Sec-Fetch-Site: same-origin`, or Origin's host = the Host header) and clients that send
   no Origin (curl, SDKs) pass.
3. Content type (CSRF by "simple" requests): a body sent to a JSON route must say `Content-Type:
   application/json` (or `...+json`); else 415. A browser can post text/plain or an untyped Blob cross-origin
   without a CORS preflight, but not application/json. /login and /logout take HTML forms.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from gptsmith.serve.auth import send_error
from gptsmith.serve.schemas import APIError

LOOPBACK_NAMES = {"localhost", "127.0.0.1", "[::1]", "::1"}
FORM_PATHS = {"/login", "/logout"}  # the HTML forms' routes; every other route with a body takes JSON
WRITES = {"POST", "PUT", "PATCH", "DELETE"}


def _headers(scope) -> dict[bytes, str]:
    return {k: v.decode("latin-1") for k, v in scope.get("headers") or []}


def host_name(host: str) -> str:
    """'Example.COM:8000' -> 'example.com'; '[::1]:8000' -> '[::1]'."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[: host.find("]") + 1] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def is_loopback(address: str | None) -> bool:
    if not address:
        return False
    try:
        return ipaddress.ip_address(address.strip("[]")).is_loopback
    except ValueError:
        return address.lower() == "localhost"


def is_json(content_type: str) -> bool:
    mime = content_type.split(";", 1)[0].strip().lower()
    return mime == "application/json" or (mime.startswith("application/") and mime.endswith("+json"))


class RequestShield:
    def __init__(self, app, allowed_hosts: list[str] | tuple[str, ...] = (),
                 cors_origins: list[str] | tuple[str, ...] = ()):
        self.app = app
        self.any_host = "*" in allowed_hosts
        # names, or name:port; an origin written by mistake (https://chat.example.com) counts as its host
        self.allowed_hosts = {(urlsplit(h).netloc if "://" in h else h).strip().lower() for h in allowed_hosts}
        self.any_origin = "*" in cors_origins
        self.cors_origins = {o.rstrip("/").lower() for o in cors_origins}

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            refused = self.check(scope)
            if refused is not None:
                return await send_error(send, refused)
        await self.app(scope, receive, send)

    def check(self, scope) -> APIError | None:
        headers = _headers(scope)
        return (self._check_host(scope, headers.get(b"host", "")) or self._check_origin(scope, headers)
                or self._check_content_type(scope, headers))

    def _check_host(self, scope, host: str) -> APIError | None:
        """Only where the connection came in on a loopback address (what DNS rebinding reaches) or where
        serve.allowed_hosts names the hosts; a request without a Host header (HTTP/1.0) has no name to check."""
        if self.any_host or not host:
            return None
        on_loopback = is_loopback((scope.get("server") or (None,))[0])
        if not on_loopback and not self.allowed_hosts:
            return None
        name = host_name(host)
        if (on_loopback and name in LOOPBACK_NAMES) or name in self.allowed_hosts or host.lower() in self.allowed_hosts:
            return None
        return APIError(421, f"This server does not answer to the host name '{name}' (the request's Host "
                             "header); it accepts localhost, 127.0.0.1 and [::1]. If you reach it under that "
                             "name (a reverse proxy, a LAN name), add it to serve.allowed_hosts. This check "
                             "stops DNS-rebinding attacks from web pages.", "Host", "host_not_allowed")

    def _check_origin(self, scope, headers: dict[bytes, str]) -> APIError | None:
        if scope["method"] not in WRITES:
            return None  # reads: the browser's same-origin policy keeps their answers from other sites
        origin, fetch_site = headers.get(b"origin"), headers.get(b"sec-fetch-site", "").lower()
        if fetch_site == "same-origin":
            # set by the browser alone (pages cannot forge it), and still right behind a proxy that rewrites Host
            return None
        if origin is None:
            if fetch_site == "cross-site":
                return _cross_origin("another site (Sec-Fetch-Site: cross-site)")
            return None  # not a browser's cross-origin request: curl, SDKs, same-origin navigation
        origin = origin.strip().rstrip("/").lower()
        if self.any_origin or origin in self.cors_origins:
            return None
        parts = urlsplit(origin)
        # the host (and port) as the browser wrote it; the scheme may differ behind a TLS-terminating proxy
        if parts.netloc and parts.netloc == headers.get(b"host", "").strip().lower():
            return None
        return _cross_origin(f"the origin '{origin}'")

    def _check_content_type(self, scope, headers: dict[bytes, str]) -> APIError | None:
        if scope["method"] not in WRITES or scope["path"] in FORM_PATHS:
            return None
        has_body = headers.get(b"content-length", "0").strip() not in ("", "0") or b"transfer-encoding" in headers
        content_type = headers.get(b"content-type", "")
        if not has_body or is_json(content_type):
            return None
        got = f"'{content_type}'" if content_type else "none"
        return APIError(415, f"The request body must be JSON sent with 'Content-Type: application/json' (got "
                             f"{got}).", "Content-Type", "unsupported_media_type")


def _cross_origin(source: str) -> APIError:
    return APIError(403, f"Refused a cross-origin write from {source}: web pages on other sites may not change "
                         "this server's data. To allow a site, add its origin to serve.cors_origins.",
                    "Origin", "cross_origin_request")
