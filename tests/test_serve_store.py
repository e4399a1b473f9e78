"""The web UI's JSON API and the store: conversations, branches (edit/regenerate), feedback, and answers that
survive a `kill -9` of the server mid-stream."""

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
from serve_helpers import free_port, long_context_model, running, wait_http

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


def test_kill_9_keeps_question_and_partial_answer(tokenizer_dir, tmp_path):
    model = long_context_model(tmp_path / "long", tokenizer_dir, 2048)
    db_path = tmp_path / "kill.db"
    port = free_port()
    env = os.environ | {"GPTSMITH_API_KEY": ""}
    proc = subprocess.Popen([sys.executable, "-m", "gptsmith.cli", "serve", "--model", str(model), "--port",
                             str(port), "--db", f"sqlite:///{db_path}", "--serve.store_flush_seconds", "0.05"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    received = ""
    try:
        wait_http(url)
        body = {"model": "long", "messages": [{"role": "user", "content": "kill me softly"}], "max_tokens": 1500,
                "temperature": 0, "stream": True}
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    received += json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                if len(received) > 20:  # kill while the stream is still open and generating
                    time.sleep(0.3)  # a few store flushes
                    os.kill(proc.pid, signal.SIGKILL)
                    break
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    store = Store(f"sqlite:///{db_path}")
    try:
        (conv,) = store.list_conversations()
        user, answer = store.get_conversation(conv["id"])["messages"]
    finally:
        store.close()
    assert user["role"] == "user" and user["content"] == "kill me softly"
    assert answer["role"] == "assistant" and answer["finish_reason"] is None  # it never finished
    assert len(answer["content"]) >= 20 and answer["content"].startswith(received[:20])
