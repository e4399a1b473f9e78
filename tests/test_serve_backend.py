"""--backend-url: gptsmith fronting another OpenAI-compatible server (here a second gptsmith on loopback),
keeping its own UI, store and feedback."""

import json
import time

import httpx
import openai
import pytest
from serve_helpers import DecodeGate, record_requests, running, wait_for

from gptsmith.config import load_config
from gptsmith.serve.app import create_app
from gptsmith.serve.store import Store

MSG = [{"role": "user", "content": "Tell me about tuples."}]


@pytest.fixture(scope="module")
def servers(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("proxy")
    back_db, front_db = f"sqlite:///{tmp / 'back.db'}", f"sqlite:///{tmp / 'front.db'}"
    back_app = create_app(load_config(None, {"serve.db": back_db, "serve.api_key": "backend-key",
                                             "serve.rate_limit_per_minute": 0}), tiny_model_dir)
    with running(back_app) as back_url, pytest.MonkeyPatch.context() as mp:
        mp.setenv("GPTSMITH_BACKEND_API_KEY", "backend-key")
        front_app = create_app(load_config(None, {"serve.db": front_db, "serve.backend_url": back_url,
                                                  "serve.rate_limit_per_minute": 0}))
        with running(front_app) as front_url:
            yield {"back": back_url, "front": front_url, "back_db": back_db, "front_db": front_db,
                   "back_app": back_app, "model": tiny_model_dir.name}


def test_proxy_matches_backend(servers):
    back = openai.OpenAI(base_url=servers["back"] + "/v1", api_key="backend-key", max_retries=0)
    front = openai.OpenAI(base_url=servers["front"] + "/v1", api_key="unused", max_retries=0)
    assert [m.id for m in front.models.list().data] == [servers["model"]]
    kw = dict(model=servers["model"], messages=MSG, max_tokens=10, temperature=1.0, seed=42)
    direct = back.chat.completions.create(**kw)
    via = front.chat.completions.create(**kw)
    assert via.choices[0].message.content == direct.choices[0].message.content
    assert via.usage.prompt_tokens == direct.usage.prompt_tokens
    assert via.usage.completion_tokens == direct.usage.completion_tokens
    chunks = list(front.chat.completions.create(**kw, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == direct.choices[0].message.content
    two = front.chat.completions.create(**kw | {"n": 2})
    assert [c.index for c in two.choices] == [0, 1]
    text = front.completions.create(model=servers["model"], prompt="def f(", max_tokens=4, seed=1)
    assert text.choices[0].finish_reason in ("stop", "length")


def test_proxy_stores_exchanges_and_ui_works(servers):
    front = servers["front"]
    marker = f"proxied-{time.time_ns()}"
    r = httpx.post(front + "/v1/chat/completions", timeout=60, json={
        "model": servers["model"], "messages": [{"role": "user", "content": marker}], "max_tokens": 4})
    assert r.status_code == 200
    conv = httpx.post(front + "/api/conversations", json={}).json()
    with httpx.stream("POST", f"{front}/api/conversations/{conv['id']}/messages", timeout=60,
                      json={"content": "hello via proxy", "settings": {"max_tokens": 5}}) as s:
        events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: ")]
    answer = events[-1]["message"]
    assert events[-1]["type"] == "done" and answer["completion_tokens"] >= 1
    assert answer["model_version"].endswith(servers["back"] + "/v1")
    assert httpx.post(f"{front}/api/messages/{answer['id']}/feedback", json={"rating": 1}).status_code == 200
    store = Store(servers["front_db"])
    try:
        (api_conv,) = store.list_conversations(marker)
        msgs = store.get_conversation(api_conv["id"])["messages"]
        assert [m["role"] for m in msgs] == ["user", "assistant"] and msgs[1]["finish_reason"] in ("stop", "length")
        assert store.get_message(answer["id"])["feedback"]["rating"] == 1
    finally:
        store.close()


def test_proxy_passes_backend_errors_through(servers):
    front = servers["front"]
    r = httpx.post(front + "/v1/chat/completions", timeout=60, json={
        "model": servers["model"], "max_tokens": 100,
        "messages": [{"role": "user", "content": " ".join(["word"] * 200)}]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    r = httpx.post(front + "/v1/chat/completions", json={"model": "other", "messages": MSG})
    assert r.status_code == 404
    r = httpx.post(front + "/v1/chat/completions", json={"model": servers["model"], "messages": MSG,
                                                         "max_tokens": 2})
    assert r.status_code == 200  # still up


def test_client_disconnect_stops_the_backend(servers, monkeypatch):
    """front <- client disconnects mid-answer -> front closes its backend stream -> the backend's engine request
    is cancelled. The backend's engine is held (DecodeGate) so the answer cannot end first on a fast machine."""
    scheduler = servers["back_app"].state.server.backend.scheduler
    requests = record_requests(scheduler, monkeypatch)
    gate = DecodeGate(free_steps=6).install(monkeypatch)
    body = {"model": servers["model"], "messages": MSG, "max_tokens": 220, "temperature": 0, "stream": True}
    try:
        with httpx.stream("POST", servers["front"] + "/v1/chat/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                    break  # text arrived: leave mid-answer
        (req,) = requests
        wait_for(lambda: req.cancelled, what="the backend's engine request cancelled")
    finally:
        gate.release()
    wait_for(lambda: req.finish_reason, what="the backend's engine request ended")
    assert req.finish_reason == "cancelled" and req.completion_tokens < 220
    wait_for(lambda: scheduler.num_active == 0, what="the backend's engine idle")
    store = Store(servers["back_db"])
    try:
        def answer():
            a = store.get_conversation(store.list_conversations()[0]["id"])["messages"][-1]
            return a["finish_reason"] and a
        stored = wait_for(answer, what="the backend's answer stored")
    finally:
        store.close()
    assert stored["finish_reason"] == "cancelled" and stored["completion_tokens"] < 220


def test_malformed_backend_stream_ends_with_an_error(tmp_path):
    """A backend stream line that is not JSON ends the client's stream with an error event and [DONE] (it used
    to hang), and the answer is stored with what arrived and finish_reason 'error'."""
    from gptsmith.serve.backends import ExternalBackend

    async def backend_server(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/models"):
            return httpx.Response(200, json={"object": "list", "data": [{"id": "ext", "object": "model"}]})
        good = {"choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": None}]}
        return httpx.Response(200, headers={"content-type": "text/event-stream"},
                              content=f"data: {json.dumps(good)}\n\ndata: {{not json\n\n".encode())

    backend = ExternalBackend("http://backend.invalid/v1")
    backend.client = httpx.AsyncClient(base_url=backend.base, transport=httpx.MockTransport(backend_server))
    db = f"sqlite:///{tmp_path / 'front.db'}"
    app = create_app(load_config(None, {"serve.db": db, "serve.rate_limit_per_minute": 0}), backend=backend)
    body = {"model": "ext", "messages": MSG}
    with running(app) as url:
        with httpx.stream("POST", url + "/v1/chat/completions", json=body | {"stream": True}, timeout=20) as r:
            lines = [line for line in r.iter_lines() if line]
        r2 = httpx.post(url + "/v1/chat/completions", json=body, timeout=20)
    assert lines[-1] == "data: [DONE]"
    err = json.loads(lines[-2][6:])["error"]
    assert "not a JSON object" in err["message"] and err["type"] == "backend_error"
    assert "Hi" in "".join(lines[:-2])
    assert r2.status_code == 502 and "not a JSON object" in r2.json()["error"]["message"]
    store = Store(db)
    try:
        answers = [store.get_conversation(c["id"])["messages"][-1] for c in store.list_conversations()]
    finally:
        store.close()
    assert [(a["content"], a["finish_reason"]) for a in answers] == [("Hi", "error")] * 2


def test_unreachable_backend_is_a_clear_startup_error(tmp_path, capsys):
    from gptsmith.cli import main

    rc = main(["serve", "--backend-url", "http://127.0.0.1:1", "--port", "0", "--db", f"sqlite:///{tmp_path / 'x.db'}"])
    assert rc == 2
    assert "not reachable" in capsys.readouterr().err
