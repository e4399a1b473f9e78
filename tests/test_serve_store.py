"""The web UI's JSON API and the store: conversations, branches (edit/regenerate), feedback, and answers that
survive a `kill -9` of the server mid-stream."""

import asyncio
import json
import os
import signal

import httpx
import pytest
from serve_helpers import (ScriptedBackend, free_port, long_context_model, running, serve_process, wait_for,
                           wait_http)

from gptsmith.config import load_config
from gptsmith.serve.app import create_app
from gptsmith.serve.store import Store


def stream_events(url: str, body: dict) -> list[dict]:
    with httpx.stream("POST", url, json=body, timeout=60) as r:
        assert r.status_code == 200, r.read()
        return [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]


@pytest.fixture(scope="module")
def ui_server(tiny_model_dir, tmp_path_factory):
    db = f"sqlite:///{tmp_path_factory.mktemp('ui') / 'ui.db'}"
    app = create_app(load_config(None, {"serve.db": db, "serve.rate_limit_per_minute": 0}), tiny_model_dir)
    with running(app) as url:
        yield url, db


def test_conversation_flow(ui_server):
    url, db = ui_server
    api = url + "/api"
    conv = httpx.post(api + "/conversations", json={"system_prompt": "Be brief.",
                                                    "settings": {"temperature": 0.5, "max_tokens": 8}}).json()
    msgs_url = f"{api}/conversations/{conv['id']}/messages"
    ev = stream_events(msgs_url, {"content": "hello there"})
    assert ev[0]["type"] == "start" and ev[-1]["type"] == "done"
    a1 = ev[-1]["message"]
    assert a1["content"] == "".join(e["text"] for e in ev if e["type"] == "delta")
    assert a1["finish_reason"] in ("stop", "length") and a1["sampling"]["temperature"] == 0.5
    assert a1["sampling"]["max_tokens"] == 8 and a1["completion_tokens"] <= 8
    u1 = ev[0]["user_message"]
    assert a1["parent_id"] == u1["id"]

    # regenerate: a sibling answer to the same user message, which becomes the shown branch
    a2 = stream_events(msgs_url, {"regenerate_of": a1["id"]})[-1]["message"]
    assert a2["parent_id"] == u1["id"] and a2["regeneration_of_id"] == a1["id"]
    shown = httpx.get(f"{api}/conversations/{conv['id']}").json()
    assert shown["title"] == "hello there" and shown["system_prompt"] == "Be brief."
    assert [m["id"] for m in shown["messages"]] == [u1["id"], a2["id"]]
    assert shown["messages"][1]["siblings"] == [a1["id"], a2["id"]]

    # a second turn, then an edit of it: the edit branches off the same parent
    ev = stream_events(msgs_url, {"content": "second question", "parent_id": a2["id"]})
    u2 = ev[0]["user_message"]
    assert u2["parent_id"] == a2["id"]
    ev = stream_events(msgs_url, {"content": "edited question", "edit_of": u2["id"]})
    u3, a4 = ev[0]["user_message"], ev[-1]["message"]
    assert u3["parent_id"] == a2["id"] and a4["parent_id"] == u3["id"]
    shown = httpx.get(f"{api}/conversations/{conv['id']}").json()
    assert [m["content"] for m in shown["messages"][:3]] == ["hello there", a2["content"], "edited question"]
    everything = httpx.get(f"{api}/conversations/{conv['id']}?all=true").json()["messages"]
    assert len(everything) == 7  # nothing is thrown away: both answers, both versions of the question

    # feedback: thumbs, comment and correction are kept per message, updated in place
    fb_url = f"{api}/messages/{a2['id']}/feedback"
    assert httpx.post(fb_url, json={"rating": 1}).json()["rating"] == 1
    assert httpx.post(fb_url, json={"correction": "A better answer."}).json() == {
        "rating": 1, "comment": None, "correction": "A better answer."}
    assert httpx.post(fb_url, json={"rating": 2}).status_code == 400
    assert httpx.post(fb_url, json={}).status_code == 400
    assert httpx.post(f"{api}/messages/999999/feedback", json={"rating": 1}).status_code == 404
    shown = httpx.get(f"{api}/conversations/{conv['id']}").json()
    assert shown["messages"][1]["feedback"]["correction"] == "A better answer."

    # bad input is a 4xx and stores nothing new
    assert httpx.post(msgs_url, json={"content": "   "}).status_code == 400
    assert httpx.post(msgs_url, json={"regenerate_of": u1["id"]}).status_code == 404
    assert httpx.post(msgs_url, json={"content": "x", "settings": {"temperature": -1}}).status_code == 400
    assert httpx.post(f"{api}/conversations/nope/messages", json={"content": "x"}).status_code == 404

    # list, search, rename, delete
    assert conv["id"] in [c["id"] for c in httpx.get(api + "/conversations", params={"q": "EDITED"}).json()]
    assert httpx.get(api + "/conversations", params={"q": "no-such-words"}).json() == []
    assert httpx.patch(f"{api}/conversations/{conv['id']}", json={"title": "Renamed"}).json()["title"] == "Renamed"
    assert httpx.get(api + "/conversations", params={"q": "renamed"}).json()[0]["id"] == conv["id"]
    assert httpx.delete(f"{api}/conversations/{conv['id']}").status_code == 200
    assert httpx.get(f"{api}/conversations/{conv['id']}").status_code == 404
    store = Store(db)
    try:
        assert store.get_message(a2["id"]) is None  # messages and feedback went with it
    finally:
        store.close()


def test_long_conversation_drops_oldest_turns(ui_server):
    url, _ = ui_server
    conv = httpx.post(url + "/api/conversations", json={"settings": {"max_tokens": 32}}).json()
    long = " ".join(["value"] * 120)  # two of these do not fit the 256-token context together
    for _ in range(3):
        ev = stream_events(f"{url}/api/conversations/{conv['id']}/messages", {"content": long})
        assert ev[-1]["type"] == "done"
        assert ev[-1]["message"]["prompt_tokens"] + 32 <= 256


def stored_messages(db_url: str) -> list[dict]:
    """Every message of the only conversation, in id order (read while the server may still be writing)."""
    store = Store(db_url)
    try:
        convs = store.list_conversations()
        return store.get_conversation(convs[0]["id"], all_messages=True)["messages"] if convs else []
    finally:
        store.close()


def stream_until(lines, enough) -> str:
    """Read a /v1 chat stream's lines until `enough(text so far)`; returns that text. The caller keeps `lines`
    (r.iter_lines()) alive: a dropped line iterator closes the response, i.e. disconnects."""
    received = ""
    for line in lines:
        if line.startswith("data: {"):
            received += json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
        if enough(received):
            return received
    raise AssertionError(f"the stream ended after {received!r}")


def kill_9(proc) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def long_model(tokenizer_dir, tmp_path_factory):
    return long_context_model(tmp_path_factory.mktemp("long") / "long", tokenizer_dir, 2048)


def test_kill_9_keeps_question_and_partial_answer(long_model, tmp_path):
    """The answer is held after 60 decode steps (DecodeGate) and can never finish: whatever the machine's speed,
    the kill lands mid-answer, once the text the client got is on disk (store_flush_seconds 0.05 later)."""
    db = f"sqlite:///{tmp_path / 'kill.db'}"
    port = free_port()
    # stream_interval_s 0: every step's tokens go out at once. With the default (20 ms) a fast machine runs all
    # 60 free steps inside one interval, and the held tokens wait for a next step the gate never allows
    proc = serve_process(long_model, port, db, "--serve.store_flush_seconds", "0.05", "--serve.stream_interval_s",
                         "0", hold_after_steps=60)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url)
        body = {"model": "long", "messages": [{"role": "user", "content": "kill me softly"}], "max_tokens": 1500,
                "temperature": 0, "stream": True}
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            received = stream_until(lines, lambda text: len(text) > 20)
            wait_for(lambda: (m := stored_messages(db)) and m[-1]["content"].startswith(received),
                     what="the streamed text on disk")
            kill_9(proc)  # while the stream is still open and generating
            lines.close()
    finally:
        if proc.poll() is None:
            kill_9(proc)
    user, answer = stored_messages(db)
    assert user["role"] == "user" and user["content"] == "kill me softly"
    assert answer["role"] == "assistant" and answer["finish_reason"] is None  # it never finished
    assert answer["content"].startswith(received)


def test_kill_9_right_after_the_first_piece_keeps_it(long_model, tmp_path):
    """The first piece of an answer is on disk before the client gets it, whatever store_flush_seconds is (30 s
    here: no periodic flush happens before the kill)."""
    db = f"sqlite:///{tmp_path / 'first.db'}"
    port = free_port()
    proc = serve_process(long_model, port, db, "--serve.store_flush_seconds", "30", hold_after_steps=8)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url)
        body = {"model": "long", "messages": [{"role": "user", "content": "first words"}], "max_tokens": 1500,
                "temperature": 0, "stream": True}
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            received = stream_until(lines, bool)
            kill_9(proc)
            lines.close()
    finally:
        if proc.poll() is None:
            kill_9(proc)
    _, answer = stored_messages(db)
    assert answer["finish_reason"] is None
    assert answer["content"] and received.startswith(answer["content"])


@pytest.fixture
def scripted(tmp_path):
    """A server whose answers say 'Hello there' and then wait for the test's backend.release()."""
    backend = ScriptedBackend()
    db = f"sqlite:///{tmp_path / 'scripted.db'}"
    app = create_app(load_config(None, {"serve.db": db, "serve.rate_limit_per_minute": 0}), backend=backend)
    with running(app) as url:
        try:
            yield url, db, backend, app
        finally:
            backend.release()


def test_conversation_deleted_mid_answer_ends_the_stream(scripted):
    url, _, backend, _ = scripted
    conv = httpx.post(url + "/api/conversations", json={}).json()
    events = []
    with httpx.stream("POST", f"{url}/api/conversations/{conv['id']}/messages", json={"content": "hi"},
                      timeout=30) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
                if events[-1]["type"] == "delta":  # mid-answer: another tab deletes the conversation
                    assert httpx.delete(f"{url}/api/conversations/{conv['id']}").status_code == 200
                    backend.release()
    assert events[-1]["type"] == "error" and events[-1]["error"]["code"] == "conversation_deleted"
    assert "deleted" in events[-1]["error"]["message"]


def test_rejected_message_is_not_stored(ui_server):
    """A message the server refuses (here: longer than the model's context) leaves nothing behind, so the next
    message does not chain onto it (two user turns in a row)."""
    url, db = ui_server
    conv = httpx.post(url + "/api/conversations", json={"settings": {"max_tokens": 32}}).json()
    msgs_url = f"{url}/api/conversations/{conv['id']}/messages"
    first = stream_events(msgs_url, {"content": "hello"})[-1]["message"]
    r = httpx.post(msgs_url, json={"content": " ".join(["value"] * 400), "parent_id": first["id"]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    r = httpx.post(msgs_url, json={"content": "x", "settings": {"max_tokens": 10**9}})
    assert r.status_code == 400
    shown = httpx.get(f"{url}/api/conversations/{conv['id']}?all=true").json()["messages"]
    assert [m["id"] for m in shown] == [first["parent_id"], first["id"]]
    assert shown[1]["finish_reason"] in ("stop", "length")
    ev = stream_events(msgs_url, {"content": "again"})  # no parent_id: follows the newest message
    assert ev[0]["user_message"]["parent_id"] == first["id"]


def test_store_writes_never_run_on_the_event_loop(scripted, monkeypatch):
    """A write on the event loop waits for SQLite's lock with every stream frozen behind it."""
    url, db, backend, app = scripted
    store = app.state.server.store
    on_loop = []

    def watch(name):
        method = getattr(store, name)

        def watched(*args, **kwargs):
            try:
                asyncio.get_running_loop()
                on_loop.append(name)
            except RuntimeError:  # a worker thread: no event loop here
                pass
            return method(*args, **kwargs)
        monkeypatch.setattr(store, name, watched)

    for name in ("update_message", "update_streaming", "add_message", "add_chain", "create_conversation"):
        watch(name)
    conv = httpx.post(url + "/api/conversations", json={}).json()
    with httpx.stream("POST", f"{url}/api/conversations/{conv['id']}/messages", json={"content": "hi"},
                      timeout=30) as r:
        for line in r.iter_lines():
            if '"delta"' in line:
                break  # the client leaves mid-answer: the answer is saved as cancelled
    wait_for(lambda: stored_messages(db)[-1]["finish_reason"] == "cancelled", what="the cancelled answer saved")
    backend.release()
    ev = stream_events(f"{url}/api/conversations/{conv['id']}/messages", {"content": "and now?"})
    assert ev[-1]["type"] == "done" and ev[-1]["message"]["content"] == "Hello there"
    assert on_loop == []
