"""The server's security rules: Host names on loopback (DNS rebinding), cross-origin writes and JSON content type
(CSRF), signed login sessions, limits on failed authentications, the rate limiter's memory, and auth on every
route of the app's route table. One test attacks the server from another origin in a real Chromium."""

from __future__ import annotations

import http.server
import os
import re
import threading
import time

import httpx
import openai
import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from serve_helpers import CHROMIUM, chromium, free_port, running
from starlette.routing import Mount

from gptsmith.config import load_config
from gptsmith.serve import limits
from gptsmith.serve.app import create_app
from gptsmith.serve.routes import route_table
from gptsmith.serve.auth import COOKIE, key_ok
from gptsmith.serve.store import Store

KEY = "s3cret-key"
LOOPBACK = "http://127.0.0.1:8000"  # TestClient's scope["server"] comes from this URL: a loopback connection


def make_app(tmp_path, tiny_model_dir, **overrides):
    cfg = {"serve.db": f"sqlite:///{tmp_path / 'sec.db'}", "serve.rate_limit_per_minute": 0} | overrides
    return create_app(load_config(None, cfg), tiny_model_dir)


def error_of(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}  # OpenAI's error shape
    return err


@pytest.fixture(autouse=True)
def no_env_key(monkeypatch):
    monkeypatch.delenv("GPTSMITH_API_KEY", raising=False)


# ------------------------------------------------------------------------------------------ content type
def json_body_routes(app) -> list[tuple[str, str]]:
    """(method, path) of every route that takes a JSON body, from the app's route table."""
    out = []
    for r in route_table(app):
        if isinstance(r, APIRoute) and r.body_field is not None:
            path = re.sub(r"\{[^}]+\}", "1", r.path)
            out += [(m, path) for m in sorted(r.methods)]
    return out


def test_json_routes_refuse_other_content_types(tmp_path, tiny_model_dir):
    app = make_app(tmp_path, tiny_model_dir)
    routes = json_body_routes(app)
    assert ("POST", "/v1/chat/completions") in routes and ("POST", "/api/messages/1/feedback") in routes
    with TestClient(app, base_url=LOOPBACK) as c:
        for method, path in routes:
            for headers in ({}, {"Content-Type": "text/plain;charset=UTF-8"},
                            {"Content-Type": "application/x-www-form-urlencoded"},
                            {"Content-Type": "multipart/form-data; boundary=x"}):
                err = error_of(c.request(method, path, content=b'{"title": "csrf"}', headers=headers), 415)
                assert err["code"] == "unsupported_media_type" and "application/json" in err["message"]
        assert c.get("/api/conversations").json() == []  # nothing was written
        for ctype in ("application/json", "application/json; charset=utf-8", "Application/JSON",
                      "application/merge-patch+json"):
            r = c.post("/api/conversations", content=b'{"title": "ok"}', headers={"Content-Type": ctype})
            assert r.status_code == 200, (ctype, r.text)
        # a body-less write still reaches the route, which says what is missing
        assert c.delete("/api/conversations/nope").status_code == 404
        assert error_of(c.post("/api/conversations"), 400)


# ------------------------------------------------------------------------------------------ origin
def test_cross_origin_writes_are_refused(tmp_path, tiny_model_dir):
    app = make_app(tmp_path, tiny_model_dir, **{"serve.cors_origins": ["https://app.example"]})
    with TestClient(app, base_url=LOOPBACK) as c:
        conv = c.post("/api/conversations", json={"title": "mine"}).json()  # no Origin: SDKs, curl
        for origin in ("http://evil.example", "http://127.0.0.1:9999", "http://localhost:8000", "null"):
            headers = {"Origin": origin}
            err = error_of(c.post("/api/conversations", json={"title": "x"}, headers=headers), 403)
            assert err["code"] == "cross_origin_request" and "serve.cors_origins" in err["message"]
            error_of(c.delete(f"/api/conversations/{conv['id']}", headers=headers), 403)
            error_of(c.patch(f"/api/conversations/{conv['id']}", json={"title": "x"}, headers=headers), 403)
            assert c.get("/api/conversations", headers=headers).status_code == 200  # reads are not writes
        error_of(c.post("/api/conversations", json={}, headers={"Sec-Fetch-Site": "cross-site"}), 403)
        assert [x["title"] for x in c.get("/api/conversations").json()] == ["mine"]
        for origin in (LOOPBACK, "https://app.example", "https://APP.example/"):  # own origin, configured origin
            assert c.post("/api/conversations", json={}, headers={"Origin": origin}).status_code == 200, origin
        # the browser's own word that the page is this server's, e.g. behind a proxy that rewrites Host
        same = {"Origin": "https://chat.example.com", "Sec-Fetch-Site": "same-origin"}
        assert c.post("/api/conversations", json={}, headers=same).status_code == 200
        error_of(c.post("/api/conversations", json={}, headers=same | {"Sec-Fetch-Site": "same-site"}), 403)


# ------------------------------------------------------------------------------------------ host
def test_loopback_server_answers_only_to_its_own_names(tmp_path, tiny_model_dir):
    app = make_app(tmp_path, tiny_model_dir)
    with TestClient(app, base_url=LOOPBACK) as c:
        conv = c.post("/api/conversations", json={"title": "secret"}).json()
        for host in ("evil.example", "evil.example:8000", "127.0.0.1.evil.example", "localhost.evil.example:80"):
            err = error_of(c.get("/api/conversations", headers={"Host": host}), 421)
            assert err["code"] == "host_not_allowed" and "serve.allowed_hosts" in err["message"]
            error_of(c.delete(f"/api/conversations/{conv['id']}", headers={"Host": host, "Origin": f"http://{host}"}),
                     421)
        for host in ("localhost", "LOCALHOST:1234", "127.0.0.1", "127.0.0.1:8000", "[::1]", "[::1]:8000"):
            assert c.get("/api/conversations", headers={"Host": host}).status_code == 200, host
        assert c.get(f"/api/conversations/{conv['id']}").json()["title"] == "secret"
    with TestClient(app, base_url="http://192.0.2.7:8000") as c:  # reached on a non-loopback address
        assert c.get("/health", headers={"Host": "chat.example.com"}).status_code == 200

    app = make_app(tmp_path, tiny_model_dir, **{"serve.allowed_hosts": ["chat.example.com", "https://box:9000/"]})
    with TestClient(app, base_url=LOOPBACK) as c:
        assert c.get("/health", headers={"Host": "Chat.Example.com:8443"}).status_code == 200
        assert c.get("/health", headers={"Host": "box:9000"}).status_code == 200
        assert c.get("/health", headers={"Host": "localhost"}).status_code == 200
        error_of(c.get("/health", headers={"Host": "box:9001"}), 421)
    with TestClient(app, base_url="http://192.0.2.7:8000") as c:  # a configured list applies on any address
        error_of(c.get("/health", headers={"Host": "evil.example"}), 421)
    app = make_app(tmp_path, tiny_model_dir, **{"serve.allowed_hosts": ["*"]})
    with TestClient(app, base_url=LOOPBACK) as c:
        assert c.get("/health", headers={"Host": "evil.example"}).status_code == 200


def test_real_server_clients_pass_and_rebinding_fails(tmp_path, tiny_model_dir):
    """Over a real socket: the official openai client and plain httpx work; a rebound Host name does not."""
    app = make_app(tmp_path, tiny_model_dir)
    with running(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        out = client.chat.completions.create(model=tiny_model_dir.name, max_tokens=2,
                                             messages=[{"role": "user", "content": "hi"}])
        assert out.choices[0].finish_reason in ("stop", "length")
        assert httpx.post(url + "/api/conversations", json={"title": "t"}).status_code == 200
        port = url.rsplit(":", 1)[1]
        r = httpx.get(url + "/api/conversations", headers={"Host": f"evil.example:{port}"})
        assert r.status_code == 421 and "t" not in [c["title"] for c in r.json() if isinstance(c, dict)]
        assert httpx.get(url.replace("127.0.0.1", "localhost") + "/api/conversations").status_code == 200


# ------------------------------------------------------------------------------------------ sessions
def cookie(token: str) -> dict:
    return {"Cookie": f"{COOKIE}={token}"}


def login(c: TestClient, key: str) -> httpx.Response:
    return c.post("/login", data={"key": key}, follow_redirects=False)


def test_login_cookie_is_a_signed_session_not_the_key(tmp_path, tiny_model_dir):
    app = make_app(tmp_path, tiny_model_dir, **{"serve.api_key": KEY})
    with TestClient(app, base_url=LOOPBACK) as c:
        r = login(c, KEY)
        assert r.status_code == 303 and r.headers["location"] == "/"
        set_cookie = r.headers["set-cookie"]
        assert KEY not in set_cookie and "httponly" in set_cookie.lower() and "samesite=strict" in set_cookie.lower()
        token = r.cookies[COOKIE]
        assert KEY not in token and c.get("/api/info", headers=cookie(token)).status_code == 200

        expiry, nonce, sig = token.split(".")
        forged = [f"{int(expiry) + 10**6}.{nonce}.{sig}", f"{expiry}.{nonce}.{'0' * len(sig)}", f"{expiry}.{nonce}",
                  KEY, "", "a.b.c", f"{expiry}.{nonce}.{sig}x"]
        for bad in forged:
            c.cookies.clear()
            error_of(c.get("/api/info", headers=cookie(bad)), 401)
        c.cookies.clear()
        assert c.get("/api/info", headers={"Cookie": "gptsmith_key=" + KEY}).status_code == 401  # the old cookie

        auth = app.state.auth
        payload = f"{int(time.time()) - 1}.{nonce}"
        expired = f"{payload}.{auth._sign(payload)}"  # correctly signed, but its time is up
        error_of(c.get("/api/info", headers=cookie(expired)), 401)
        r = c.get("/", headers=cookie(expired), follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/login"

        # logout revokes the token on the server: a copy of the cookie no longer works either
        second = login(c, KEY).cookies[COOKIE]
        c.cookies.clear()
        r = c.post("/logout", headers=cookie(second), follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/login"
        assert f'{COOKIE}=""' in r.headers["set-cookie"] or "max-age=0" in r.headers["set-cookie"].lower()
        c.cookies.clear()
        error_of(c.get("/api/info", headers=cookie(second)), 401)
        assert c.get("/api/info", headers=cookie(token)).status_code == 200  # other sessions stay logged in

    # a new server process (new secret) or a new key: old sessions end
    app2 = make_app(tmp_path, tiny_model_dir, **{"serve.api_key": KEY})
    with TestClient(app2, base_url=LOOPBACK) as c:
        error_of(c.get("/api/info", headers=cookie(token)), 401)


def test_failed_keys_are_rate_limited_per_ip(tmp_path, tiny_model_dir):
    app = make_app(tmp_path, tiny_model_dir, **{"serve.api_key": KEY, "serve.auth_failures_per_minute": 3})
    with TestClient(app, base_url=LOOPBACK, client=("10.0.0.1", 5000)) as c:
        session = login(c, KEY).cookies[COOKIE]
        c.cookies.clear()
        for bad in ("a", "b", "c"):
            error_of(c.get("/v1/models", headers={"Authorization": f"Bearer {bad}"}), 401)
        r = c.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"})  # even the right key, now
        err = error_of(r, 429)
        assert err["code"] == "too_many_auth_failures" and 1 <= int(r.headers["retry-after"]) <= 60
        r = login(c, KEY)
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1 and COOKIE not in r.cookies
        error_of(c.get("/v1/models", headers={"Authorization": "Bearer d"}), 429)
        # a signed session cannot be guessed: the browser that logged in before keeps working
        assert c.get("/v1/models", headers=cookie(session)).status_code == 200
        c.cookies.clear()
        assert c.get("/v1/models").status_code == 401  # no credentials at all: a plain 401, not a failure
    with TestClient(app, base_url=LOOPBACK, client=("10.0.0.2", 5000)) as c:  # another address is not blocked
        assert c.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200

    app = make_app(tmp_path, tiny_model_dir, **{"serve.api_key": KEY, "serve.auth_failures_per_minute": 2})
    with TestClient(app, base_url=LOOPBACK) as c:
        for _ in range(2):
            r = login(c, "wrong")
            assert r.status_code == 303 and r.headers["location"] == "/login?error=1"
        assert login(c, KEY).status_code == 429


def test_key_comparison():
    assert key_ok(KEY, KEY)
    for bad in (None, "", KEY[:-1], KEY + "x", KEY.upper(), "é" * 10):
        assert not key_ok(bad, KEY)


# ------------------------------------------------------------------------------------------ rate limiter
def test_rate_limiter_forgets_idle_clients(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(limits.time, "monotonic", lambda: now[0])
    lim = limits.RateLimiter(per_minute=6)
    for i in range(5000):  # a scan from many addresses, or many made-up keys
        lim.check(f"ip:{i}")
    for _ in range(7):
        lim.check("busy")
    assert lim.check("busy") > 0  # still limits
    now[0] += 61  # a minute later every bucket is full again: nothing worth keeping
    assert lim.check("new") == 0
    assert len(lim._buckets) <= 2
    assert lim.check("busy") == 0


# ------------------------------------------------------------------------------------------ every route
PUBLIC = {("GET", "/health"), ("GET", "/login"), ("POST", "/login")}  # documented: the rest need the key


def route_requests(app) -> list[tuple[str, str, dict]]:
    """One request per (method, route) in the app's route table, mounts (static files) included."""
    out = []
    for r in route_table(app):
        if isinstance(r, Mount):
            files = sorted(os.listdir(r.app.directory)) if getattr(r.app, "directory", None) else [""]
            out.append(("GET", f"{r.path}/{files[0]}", {}))
            continue
        methods = sorted((getattr(r, "methods", None) or {"GET"}) - {"HEAD"})
        path = re.sub(r"\{[^}]+\}", "1", r.path)
        for m in methods:
            body = {"json": {}} if m in ("POST", "PUT", "PATCH") and isinstance(r, APIRoute) and r.body_field else {}
            out.append((m, path, body))
    return out


def test_auth_on_every_route(tmp_path, tiny_model_dir):
    app = make_app(tmp_path, tiny_model_dir)
    requests = route_requests(app)
    paths = {p for _, p, _ in requests}
    assert {"/v1/chat/completions", "/api/conversations", "/", "/docs", "/health"} <= paths
    assert any(p.startswith("/static/") for p in paths)
    with TestClient(app, base_url=LOOPBACK) as c:  # no key: everything is open
        for method, path, kw in requests:
            r = c.request(method, path, follow_redirects=False, **kw)
            assert r.status_code not in (401, 403) and r.status_code < 500, (method, path, r.status_code, r.text)

    app = make_app(tmp_path, tiny_model_dir, **{"serve.api_key": KEY})
    assert {(m, p) for m, p, _ in route_requests(app)} == {(m, p) for m, p, _ in requests}
    with TestClient(app, base_url=LOOPBACK) as c:
        session = login(c, KEY).cookies[COOKIE]
        c.cookies.clear()
        for method, path, kw in requests:
            r = c.request(method, path, follow_redirects=False, **kw)
            if (method, path) in PUBLIC:
                assert r.status_code < 400, (method, path, r.status_code)
            elif method == "GET" and path == "/":
                assert r.status_code == 303 and r.headers["location"] == "/login"  # the UI page: to the login
            else:
                error_of(r, 401)
            for creds in ({"Authorization": f"Bearer {KEY}"}, cookie(session)):
                if (method, path) == ("POST", "/logout"):
                    continue  # would end the session the next rows use
                r = c.request(method, path, follow_redirects=False, headers=creds, **kw)
                c.cookies.clear()
                assert r.status_code not in (401, 403) and r.status_code < 500, (method, path, creds, r.text)


# ------------------------------------------------------------------------------------------ real browser
ATTACK_PAGE = """<!doctype html><title>attacker</title><script>
const T = "%(target)s";
async function send(path, init) {
  try { await fetch(T + path, Object.assign({method: "POST", mode: "no-cors"}, init)); return "sent"; }
  catch (e) { return "error: " + e; }
}
(async () => {
  const blob = (o) => new Blob([JSON.stringify(o)]);  // untyped: no Content-Type, no CORS preflight
  const r = [];
  r.push(await send("/api/messages/%(msg)d/feedback", {body: blob({rating: -1, correction: "POISON"})}));
  r.push(await send("/api/messages/%(msg)d/feedback", {body: JSON.stringify({comment: "POISON"})}));  // text/plain
  r.push(await send("/api/conversations", {body: blob({title: "attacker"})}));
  r.push(await send("/v1/chat/completions", {body: blob({model: "%(model)s", max_tokens: 2,
                                                          messages: [{role: "user", content: "attacker"}]})}));
  r.push(await send("/api/conversations/%(conv)s/messages", {body: blob({content: "attacker"})}));
  document.title = "done " + r.join(",");
})();
</script>"""


def serve_page(html: str):
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = html.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def snapshot(store: Store) -> list:
    return [store.get_conversation(c["id"], all_messages=True) for c in store.list_conversations()]


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is missing: apt-get install -y chromium")
def test_browser_attack_from_another_origin_changes_nothing(tmp_path, tiny_model_dir):
    db = f"sqlite:///{tmp_path / 'victim.db'}"
    store = Store(db)
    conv = store.create_conversation(title="private")
    q = store.add_message(conv["id"], "user", "my question")
    a = store.add_message(conv["id"], "assistant", "the answer", q["id"], finish_reason="stop")
    store.set_feedback(a["id"], rating=1, correction="my correction")
    before = snapshot(store)
    app = create_app(load_config(None, {"serve.db": db, "serve.rate_limit_per_minute": 0}), tiny_model_dir)
    with running(app) as url, chromium("--host-resolver-rules=MAP evil.example 127.0.0.1") as browser:
        port = int(url.rsplit(":", 1)[1])
        attacker = serve_page(ATTACK_PAGE % {"target": url, "msg": a["id"], "conv": conv["id"],
                                             "model": tiny_model_dir.name})
        try:
            page = browser.new_page()
            statuses = []
            page.on("response", lambda r: statuses.append((r.request.method, r.url, r.status))
                    if r.url.startswith(url) else None)
            page.goto(f"http://127.0.0.1:{attacker.server_address[1]}/")
            page.wait_for_function("document.title.startsWith('done')", timeout=30_000)
            assert page.title() == "done " + ",".join(["sent"] * 5)  # every request left the browser
            page.wait_for_timeout(200)  # responses to no-cors requests may be reported just after
            assert sorted(s for _, _, s in statuses) == [403] * 5, statuses

            # DNS rebinding: evil.example now resolves to 127.0.0.1, so its page is "same origin" with us
            r = page.goto(f"http://evil.example:{port}/api/conversations")
            assert r.status == 421 and "private" not in page.content()
            deleted = page.evaluate(f"fetch('/api/conversations/{conv['id']}', {{method: 'DELETE'}})"
                                    ".then(r => r.status)")
            assert deleted == 421

            # the server's own page still works in the same browser
            page.goto(url + "/health")
            made = page.evaluate("fetch('/api/conversations', {method: 'POST', headers: {'Content-Type': "
                                 "'application/json'}, body: JSON.stringify({title: 'mine'})}).then(r => r.status)")
            assert made == 200
        finally:
            attacker.shutdown()
    after = snapshot(store)
    assert [c for c in after if c["title"] != "mine"] == before  # no feedback, chat or conversation changed
    assert len(after) == len(before) + 1
    store.close()
