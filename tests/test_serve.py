"""The OpenAI-compatible API, tested with the official `openai` client against a real server on loopback."""

import concurrent.futures
import json
import threading
import time

import httpx
import openai
import pytest
from serve_helpers import running

from gptsmith.config import load_config
from gptsmith.serve.app import create_app
from gptsmith.serve.store import Store

MSG = [{"role": "user", "content": "What is a list?"}]


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    db = f"sqlite:///{tmp_path_factory.mktemp('serve') / 'store.db'}"
    cfg = load_config(None, {"serve.db": db, "serve.rate_limit_per_minute": 0, "serve.max_tokens_limit": 64,
                             "serve.max_messages": 20, "serve.max_body_bytes": 20_000, "serve.max_n": 4,
                             "serve.store_flush_seconds": 0.1})
    app = create_app(cfg, tiny_model_dir)
    with running(app) as url:
        yield {"url": url, "app": app, "db": db, "model": tiny_model_dir.name}


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [server["model"]]
    assert httpx.get(server["url"] + "/health").json()["status"] == "ok"


def test_chat_nonstreaming_n2_usage(server, client):
    r = client.chat.completions.create(model=server["model"], messages=MSG, max_tokens=8, n=2, seed=3,
                                       temperature=1.0)
    assert [c.index for c in r.choices] == [0, 1]
    assert all(c.message.role == "assistant" and c.finish_reason in ("stop", "length") for c in r.choices)
    assert r.usage.prompt_tokens > 3
    assert 1 <= r.usage.completion_tokens <= 16
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion"


def test_seed_reproducible_and_stream_matches(server, client):
    kw = dict(model=server["model"], messages=MSG, max_tokens=12, temperature=1.0, seed=1234)
    a = client.chat.completions.create(**kw).choices[0].message.content
    b = client.chat.completions.create(**kw).choices[0].message.content
    assert a == b
    others = {client.chat.completions.create(**(kw | {"seed": s})).choices[0].message.content for s in (1, 2, 3)}
    assert len(others | {a}) > 1  # a different seed gives a different sample
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == a
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1


def test_stream_raw_sse_ends_with_done(server):
    body = {"model": server["model"], "messages": MSG, "max_tokens": 5, "stream": True, "n": 2}
    with httpx.stream("POST", server["url"] + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert {c["choices"][0]["index"] for c in chunks} == {0, 1}
    assert sum(1 for c in chunks if c["choices"][0]["finish_reason"]) == 2


def test_stop_string(server, client):
    for seed in range(10):  # a seeded sample is reproducible, so the run with `stop` retraces it up to the stop
        kw = dict(model=server["model"], messages=MSG, max_tokens=40, temperature=1.0, seed=seed)
        full = client.chat.completions.create(**kw).choices[0].message.content
        stops = [full[i:i + 2] for i in range(3, len(full) - 2) if full[i:i + 2].isascii() and full[i:i + 2].isalnum()]
        if stops:
            break
    stop = stops[0]
    cut = full[:full.index(stop)]
    r = client.chat.completions.create(**kw, stop=[stop, "never-appears"])
    assert r.choices[0].message.content == cut
    assert r.choices[0].finish_reason == "stop"
    r2 = client.chat.completions.create(**kw, stop=stop)  # a plain string works too
    assert r2.choices[0].message.content == cut


def test_completions_endpoint(server, client):
    r = client.completions.create(model=server["model"], prompt=["def f(", "import "], max_tokens=4, n=1, seed=0)
    assert [c.index for c in r.choices] == [0, 1]
    assert r.usage.completion_tokens >= 2
    chunks = list(client.completions.create(model=server["model"], prompt="class A", max_tokens=4, stream=True))
    assert chunks and chunks[-1].choices[0].finish_reason in ("stop", "length")


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def test_bad_requests_give_4xx_in_openai_shape(server):
    url, model = server["url"] + "/v1/chat/completions", server["model"]
    good = {"model": model, "messages": MSG, "max_tokens": 2}
    post = lambda **kw: httpx.post(url, timeout=30, **kw)  # noqa: E731
    assert "not valid JSON" in _error(post(content=b'{"model": ', headers={"content-type": "application/json"}),
                                      400)["message"]
    assert _error(post(content=b"[1, 2]", headers={"content-type": "application/json"}), 400)
    assert _error(post(json=good | {"temperature": "hot"}), 400)["param"] == "temperature"
    assert _error(post(json=good | {"messages": "hello"}), 400)["param"] == "messages"
    assert _error(post(json=good | {"messages": [{"role": "wizard", "content": "x"}]}), 400)
    assert _error(post(json={"model": model}), 400)["param"] == "messages"
    assert _error(post(json=good | {"messages": []}), 400)["param"] == "messages"
    err = _error(post(json=good | {"model": "gpt-4"}), 404)
    assert err["code"] == "model_not_found" and err["param"] == "model"
    assert _error(post(json=good | {"max_tokens": 65}), 400)["param"] == "max_tokens"  # over serve.max_tokens_limit
    assert _error(post(json=good | {"max_tokens": 0}), 400)["param"] == "max_tokens"
    assert _error(post(json=good | {"n": 5}), 400)["param"] == "n"
    assert _error(post(json=good | {"messages": MSG * 21}), 400)["code"] == "too_many_messages"
    assert _error(post(json=good | {"stop": ["a", "b", "c", "d", "e"]}), 400)["param"] == "stop"
    err = _error(post(json=good | {"messages": [{"role": "user", "content": "x" * 19_000}]}), 400)
    assert err["code"] == "context_length_exceeded" and "over the limit" in err["message"]
    long = " ".join(["word"] * 150)  # fits the body limit but not context (256) + max_tokens
    err = _error(post(json=good | {"messages": [{"role": "user", "content": long}], "max_tokens": 64}), 400)
    assert err["code"] == "context_length_exceeded"
    assert _error(post(json=good | {"messages": [{"role": "user", "content": "x" * 30_000}]}), 413)
    assert _error(httpx.get(server["url"] + "/v1/nothing-here"), 404)
    assert _error(httpx.get(url), 405)
    assert _error(httpx.post(server["url"] + "/v1/completions", json={"model": model, "prompt": 3}), 400)
    # the server is still up and answers a good request
    r = post(json=good)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant"


def test_api_exchanges_are_stored(server, client):
    marker = f"store-me-{time.time_ns()}"
    client.chat.completions.create(model=server["model"], max_tokens=3, n=2,
                                   messages=[{"role": "system", "content": "Be brief."},
                                             {"role": "user", "content": marker}])
    store = Store(server["db"])
    try:
        (conv,) = store.list_conversations(marker)
        assert conv["source"] == "api"
        msgs = store.get_conversation(conv["id"], all_messages=True)["messages"]
    finally:
        store.close()
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "assistant"]
    answers = msgs[2:]
    assert all(a["parent_id"] == msgs[1]["id"] for a in answers)
    assert all(a["finish_reason"] in ("stop", "length") and a["completion_tokens"] >= 1 for a in answers)
    assert all(a["model_name"] == server["model"] and "@" in a["model_version"] for a in answers)
    assert all(a["latency_s"] > 0 and a["prompt_tokens"] > 0 for a in answers)


def test_32_concurrent_streams_are_batched_and_stored(server):
    scheduler = server["app"].state.server.backend.scheduler
    peak, stop = [0], threading.Event()

    def watch():
        while not stop.is_set():
            peak[0] = max(peak[0], scheduler.num_active)
            time.sleep(0.005)

    tag = f"conc-{time.time_ns()}"

    def one(i: int) -> str:
        c = openai.OpenAI(base_url=server["url"] + "/v1", api_key="x", max_retries=0, timeout=90)
        s = c.chat.completions.create(model=server["model"], max_tokens=6, stream=True, seed=i,
                                      messages=[{"role": "user", "content": f"{tag} {i}"}])
        chunks = list(s)
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")
        return "".join(ch.choices[0].delta.content or "" for ch in chunks)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        with concurrent.futures.ThreadPoolExecutor(32) as pool:
            texts = list(pool.map(one, range(32), timeout=120))
    finally:
        stop.set()
        watcher.join()
    assert len(texts) == 32
    assert peak[0] > 1, "requests were decoded one at a time, not batched"
    store = Store(server["db"])
    try:
        convs = store.list_conversations(tag)
        assert len(convs) == 32
        answers = [m for c in convs for m in store.get_conversation(c["id"])["messages"] if m["role"] == "assistant"]
    finally:
        store.close()
    assert len(answers) == 32 and all(a["finish_reason"] in ("stop", "length") for a in answers)


def test_client_disconnect_cancels_generation(tokenizer_dir, tmp_path, monkeypatch):
    from serve_helpers import DecodeGate, long_context_model, record_requests, wait_for

    model = long_context_model(tmp_path / "long", tokenizer_dir, 1024)
    db = f"sqlite:///{tmp_path / 'store.db'}"
    app = create_app(load_config(None, {"serve.db": db, "serve.store_flush_seconds": 0.05}), model)
    scheduler = app.state.server.backend.scheduler
    requests = record_requests(scheduler, monkeypatch)
    gate = DecodeGate(free_steps=10).install(monkeypatch)  # the answer cannot end before the test says so
    body = {"model": "long", "messages": MSG, "max_tokens": 900, "temperature": 0, "stream": True}
    with running(app) as url:
        try:
            with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                        break  # text arrived; leaving the block closes the connection mid-answer
            (req,) = requests
            wait_for(lambda: req.cancelled, what="the engine request cancelled after the client left")
        finally:
            gate.release()
        wait_for(lambda: req.finish_reason, what="the engine request ended")
        wait_for(lambda: scheduler.num_active == 0, what="the engine idle")
        store = Store(db)
        try:
            def answer():
                (conv,) = store.list_conversations()
                a = store.get_conversation(conv["id"])["messages"][-1]
                return a["finish_reason"] and a
            stored = wait_for(answer, what="the answer's end stored")
        finally:
            store.close()
    assert req.finish_reason == "cancelled" and req.completion_tokens < 900
    assert stored["finish_reason"] == "cancelled"
    assert stored["content"] and stored["completion_tokens"] < 900


def test_omitted_max_tokens_is_capped_by_the_limit(server):
    """serve.max_tokens_limit (64 here) binds a request that leaves max_tokens out, not only one that sets it."""
    marker = f"no-max-tokens-{time.time_ns()}"
    r = httpx.post(server["url"] + "/v1/chat/completions", timeout=60, json={
        "model": server["model"], "messages": [{"role": "user", "content": marker}], "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] <= 64
    store = Store(server["db"])
    try:
        (conv,) = store.list_conversations(marker)
        answer = store.get_conversation(conv["id"])["messages"][-1]
    finally:
        store.close()
    assert answer["sampling"]["max_tokens"] == 64


def test_out_of_range_integers_are_400_naming_the_field(server):
    url, model = server["url"], server["model"]
    good = {"model": model, "messages": MSG, "max_tokens": 2}
    for stream in (False, True):  # streaming too: refused before the 200, not an error event after it
        for field, value in (("seed", 2**64), ("seed", -(2**63) - 1), ("max_tokens", 2**70), ("n", 2**70)):
            r = httpx.post(url + "/v1/chat/completions", timeout=30, json=good | {field: value, "stream": stream})
            assert _error(r, 400)["param"] == field
    r = httpx.post(url + "/v1/chat/completions", timeout=60, json=good | {"seed": 2**63 - 1, "n": 2})
    assert r.status_code == 200  # the edge of the range works, n > 1 (seed + 1) too
    err = _error(httpx.post(f"{url}/api/messages/{2**70}/feedback", json={"rating": 1}), 400)
    assert err["param"] == "msg_id"
    conv = httpx.post(url + "/api/conversations", json={}).json()
    for field in ("parent_id", "edit_of", "regenerate_of"):
        r = httpx.post(f"{url}/api/conversations/{conv['id']}/messages", json={"content": "hi", field: 2**70})
        assert _error(r, 400)["param"] == field
    r = httpx.post(f"{url}/api/conversations/{conv['id']}/messages", json={"content": "hi",
                                                                           "settings": {"max_tokens": 2**70}})
    assert _error(r, 400)["param"] == "settings.max_tokens"


def test_booleans_are_strict_and_images_are_refused(server):
    url = server["url"] + "/v1/chat/completions"
    good = {"model": server["model"], "messages": MSG, "max_tokens": 2}
    assert _error(httpx.post(url, json=good | {"stream": "yes"}), 400)["param"] == "stream"
    r = httpx.post(url, json=good | {"stream": True, "stream_options": {"include_usage": 1}})
    assert _error(r, 400)["param"] == "stream_options.include_usage"
    parts = [{"type": "text", "text": "What is in this picture?"},
             {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]
    err = _error(httpx.post(url, json=good | {"messages": [{"role": "user", "content": parts}]}), 400)
    assert err["param"] == "messages[0].content[1].type" and "text only" in err["message"]
    r = httpx.post(url, timeout=60, json=good | {"messages": [{"role": "user", "content": parts[:1]}]})
    assert r.status_code == 200  # text parts are fine


def test_failures_end_the_stream_and_hide_internals(tmp_path):
    """An unforeseen exception is a 500 (or a stream's error event) with a request id and without its text, which
    goes to the log; the stream still ends, with [DONE], and the answer is stored as failed."""
    from serve_helpers import ScriptedBackend

    backend = ScriptedBackend(["Hi"], then_raise=RuntimeError("secret detail /home/me/.key"))
    backend.release()
    db = f"sqlite:///{tmp_path / 'fail.db'}"
    app = create_app(load_config(None, {"serve.db": db}), backend=backend)
    body = {"model": "scripted", "messages": MSG}
    with running(app) as url:
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=30)
        err = _error(r, 500)
        assert "secret" not in r.text and "request chatcmpl-" in err["message"] and err["code"] == "internal_error"
        with httpx.stream("POST", url + "/v1/chat/completions", json=body | {"stream": True}, timeout=30) as s:
            lines = [line for line in s.iter_lines() if line]
        assert lines[-1] == "data: [DONE]" and "secret" not in "".join(lines)
        assert json.loads(lines[-2][6:])["error"]["code"] == "internal_error"

        async def crash(*args, **kwargs):
            raise RuntimeError("secret detail /home/me/.key")

        backend.prepare = crash
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=30)
        assert _error(r, 500)["code"] == "internal_error" and "secret" not in r.text
    store = Store(db)
    try:
        answers = [m for c in store.list_conversations() for m in store.get_conversation(c["id"])["messages"]
                   if m["role"] == "assistant"]
    finally:
        store.close()
    assert len(answers) == 2 and all(a["finish_reason"] == "error" and a["content"] == "Hi" for a in answers)


def test_rate_limit_and_auth(tiny_model_dir, tmp_path, monkeypatch):
    db = f"sqlite:///{tmp_path / 'auth.db'}"
    cfg = load_config(None, {"serve.db": db, "serve.api_key": "s3cret", "serve.rate_limit_per_minute": 3})
    with running(create_app(cfg, tiny_model_dir)) as url:
        assert _error(httpx.get(url + "/v1/models"), 401)["code"] == "invalid_api_key"
        assert _error(httpx.get(url + "/v1/models", headers={"Authorization": "Bearer nope"}), 401)
        assert _error(httpx.get(url + "/api/conversations"), 401)
        assert _error(httpx.get(url + "/static/app.js"), 401)
        r = httpx.get(url + "/")
        assert r.status_code == 303 and r.headers["location"] == "/login"
        assert httpx.get(url + "/login").status_code == 200
        bad = httpx.post(url + "/login", data={"key": "wrong"})
        assert bad.status_code == 303 and "error" in bad.headers["location"] and "set-cookie" not in bad.headers
        ok = httpx.post(url + "/login", data={"key": "s3cret"})
        assert ok.status_code == 303 and "httponly" in ok.headers["set-cookie"].lower()
        assert httpx.get(url + "/", cookies=ok.cookies).status_code == 200
        c = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        assert c.models.list().data[0].id == tiny_model_dir.name
        assert httpx.get(url + "/api/info", cookies=ok.cookies).status_code == 200
        for _ in range(3):  # 2 of the 3 allowed a minute are used; the 4th request is refused
            r = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer s3cret"})
            if r.status_code == 429:
                break
        err = _error(r, 429)
        assert err["type"] == "rate_limit_error" and int(r.headers["retry-after"]) >= 1
    monkeypatch.delenv("GPTSMITH_API_KEY", raising=False)
    cfg = load_config(None, {"serve.db": db})  # no key: every route is open
    with running(create_app(cfg, tiny_model_dir)) as url:
        assert httpx.get(url + "/v1/models").status_code == 200
        assert httpx.get(url + "/").status_code == 200


def test_cors_off_unless_configured(tiny_model_dir, tmp_path):
    from fastapi.testclient import TestClient

    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    for origins, allowed in (([], False), (["https://app.example"], True)):
        cfg = load_config(None, {"serve.db": f"sqlite:///{tmp_path / 'c.db'}", "serve.cors_origins": origins,
                                 "serve.api_key": "k"})
        with TestClient(create_app(cfg, tiny_model_dir)) as c:
            r = c.options("/v1/chat/completions", headers=preflight)
            assert (r.headers.get("access-control-allow-origin") == "https://app.example") is allowed
            r = c.get("/v1/models", headers={"Origin": "https://app.example", "Authorization": "Bearer k"})
            assert r.status_code == 200
            assert ("access-control-allow-origin" in r.headers) is allowed


@pytest.mark.parametrize("interval", [0.0, 30.0])
def test_stream_interval_merges_tokens_into_fewer_chunks(tiny_model_dir, tmp_path, interval, monkeypatch):
    """serve.stream_interval_s trades chunk count for CPU: the first token still comes alone and at once, the
    text is the same, only the number of SSE chunks changes."""
    import time

    from gptsmith.engine.core import Batch

    # decode steps paced at 20 ms: a 2-layer model steps in well under a millisecond on a fast machine, faster
    # than the client reads, and queued tokens then merge whatever the interval (the race this test must not run)
    step = Batch.step
    monkeypatch.setattr(Batch, "step", lambda batch: (time.sleep(0.02), step(batch))[1])
    cfg = load_config(None, {"serve.db": f"sqlite:///{tmp_path / 's.db'}", "serve.stream_interval_s": interval})
    with running(create_app(cfg, tiny_model_dir)) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        kw = {"model": tiny_model_dir.name, "messages": MSG, "max_tokens": 24, "temperature": 0}
        full = c.chat.completions.create(**kw)
        pieces = [ch.choices[0].delta.content for ch in c.chat.completions.create(stream=True, **kw)
                  if ch.choices and ch.choices[0].delta.content]
    assert "".join(pieces) == full.choices[0].message.content
    n = full.usage.completion_tokens
    if interval:
        assert len(pieces) <= 3 < n  # first token, then the rest held until the end
    else:
        # about one chunk per token; fewer only when the client falls behind and queued tokens merge (a loaded
        # 2-core CI machine), never as few as a long interval gives
        assert len(pieces) > 3 and len(pieces) <= n


def test_route_table_lists_the_routes_of_every_router(server):
    """routes.route_table flattens the included routers (FastAPI nests them in app.routes): what a check over
    every route (auth, content type) walks."""
    from gptsmith.serve.routes import route_table

    table = {(method, r.path) for r in route_table(server["app"]) for method in (getattr(r, "methods", None) or ["*"])}
    assert {("POST", "/v1/chat/completions"), ("GET", "/api/conversations"), ("POST", "/login"), ("POST", "/logout"),
            ("POST", "/api/messages/{msg_id}/feedback"), ("GET", "/"), ("*", "/static")} <= table
    assert len(table) >= 20


def test_defaults_shown_and_stored_are_the_models_own(tmp_path, tokenizer_dir):
    """A request that sets no temperature samples with the model's generation_config.json; the UI shows that
    value and the store records it (not null)."""
    import json

    from fastapi.testclient import TestClient
    from serve_helpers import long_context_model

    from gptsmith.config import load_config
    from gptsmith.serve.app import create_app

    model = long_context_model(tmp_path / "m", tokenizer_dir, max_seq_len=256)
    gen = json.loads((model / "generation_config.json").read_text())
    (model / "generation_config.json").write_text(json.dumps(gen | {"do_sample": True, "temperature": 0.3,
                                                                     "top_p": 0.7, "max_new_tokens": 37}))
    cfg = load_config(None, {"serve.db": f"sqlite:///{tmp_path / 's.db'}"})
    with TestClient(create_app(cfg, model), base_url="http://127.0.0.1") as c:
        assert c.get("/api/info").json()["defaults"] == {"temperature": 0.3, "top_p": 0.7, "max_tokens": 37}
        conv = c.post("/api/conversations", json={}).json()["id"]
        r = c.post(f"/api/conversations/{conv}/messages", json={"content": "hi", "settings": {"max_tokens": 4}})
        assert r.status_code == 200, r.text
        answer = [m for m in c.get(f"/api/conversations/{conv}").json()["messages"] if m["role"] == "assistant"][0]
        assert answer["sampling"]["temperature"] == 0.3 and answer["sampling"]["top_p"] == 0.7
    # generate.max_new_tokens, when set, wins over the model's
    cfg = load_config(None, {"serve.db": f"sqlite:///{tmp_path / 's.db'}", "generate.max_new_tokens": 12})
    with TestClient(create_app(cfg, model), base_url="http://127.0.0.1") as c:
        assert c.get("/api/info").json()["defaults"]["max_tokens"] == 12
