"""The blind arena over HTTP: a battle streams two anonymous answers, the vote (exactly once) reveals the names,
the leaderboard and `gptsmith leaderboard` count it, `feedback export --format dpo` turns it into a pair; bad
requests are 4xx; the arena table on an old store and on PostgreSQL."""

from __future__ import annotations

import json

import httpx
import pytest
from serve_helpers import ScriptedBackend, running
from test_store_postgres import pg_server  # noqa: F401 - the throwaway PostgreSQL cluster fixture

from gptsmith.cli import main
from gptsmith.config import load_config
from gptsmith.serve import app as serve_app
from gptsmith.serve.app import create_app
from gptsmith.serve.feedback import build_examples
from gptsmith.serve.server import Served
from gptsmith.serve.store import AlreadyVoted, Store

ALPHA, BETA = "model-alpha-7", "model-beta-7"
# model output is untrusted: the browser test checks the markdown renders and the markup does not run
ANSWERS = {ALPHA: "**First** answer.", BETA: 'Second answer.<img src=x onerror="window.__xss=1">'}


def arena_app(tmp_path, monkeypatch, names=(ALPHA, BETA), released=True):
    """A server whose served names are scripted backends (each name answers ANSWERS[name]); returns (app, db,
    backends by name)."""
    backends = {n: ScriptedBackend((ANSWERS[n],)) for n in names}
    for b in backends.values():
        if released:
            b.release()
    monkeypatch.setattr(serve_app, "build_served", lambda *a, **k: [Served(b, label=n) for n, b in backends.items()])
    db = f"sqlite:///{tmp_path / 'arena.db'}"
    cfg = load_config(None, {"serve.db": db, "serve.rate_limit_per_minute": 0})
    return create_app(cfg, backend=next(iter(backends.values()))), db, backends


def sse_events(response: httpx.Response):
    for line in response.iter_lines():
        if line.startswith("data:"):
            yield json.loads(line[5:])


def battle(client: httpx.Client, content: str = "Which is better?") -> tuple[list[dict], str]:
    """Start a battle and read its whole stream: (events, raw text of the stream)."""
    with client.stream("POST", "/api/arena/battles", json={"content": content}) as r:
        assert r.status_code == 200, r.read()
        raw = r.read().decode()
    return [json.loads(line[5:]) for line in raw.splitlines() if line.startswith("data:")], raw


def test_arena_end_to_end(tmp_path, monkeypatch, capsys):
    app, db, _ = arena_app(tmp_path, monkeypatch)
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        events, raw = battle(client, "Tell me a joke")
        start, end = events[0], events[-1]
        assert start["type"] == "start" and end["type"] == "end"
        battle_id = start["battle_id"]
        text = {side: "".join(e["text"] for e in events if e["type"] == "delta" and e["side"] == side)
                for side in "ab"}
        done = {e["side"]: e["answer"] for e in events if e["type"] == "done"}
        assert sorted(text.values()) == sorted(ANSWERS.values())  # one answer from each model, sides at random
        assert {s: d["content"] for s, d in done.items()} == text
        # nothing before the vote names a model: not the stream, not the battle, not the stored conversation
        before = [raw, client.get(f"/api/arena/battles/{battle_id}").text,
                  client.get(f"/api/conversations/{start['conversation_id']}?all=true").text]
        assert not any(name in page for page in before for name in (ALPHA, BETA))
        assert end["battle"]["winner"] is None and end["battle"]["prompt"] == "Tell me a joke"
        # arena conversations stay out of the chat list
        assert client.get("/api/conversations?source=ui").json() == []

        # a cross-site vote is refused and changes nothing
        r = client.post(f"/api/arena/battles/{battle_id}/vote", json={"winner": "a"},
                        headers={"Origin": "http://evil.example"})
        assert r.status_code == 403 and "cross-origin" in r.json()["error"]["message"]
        assert client.get(f"/api/arena/battles/{battle_id}").json()["winner"] is None

        # the vote reveals the names; a second vote is refused
        voted = client.post(f"/api/arena/battles/{battle_id}/vote", json={"winner": "a"}).json()
        model_a = next(n for n, t in ANSWERS.items() if t == text["a"])
        model_b = ALPHA if model_a == BETA else BETA
        assert (voted["winner"], voted["model_a"], voted["model_b"]) == ("a", model_a, model_b)
        assert client.get(f"/api/arena/battles/{battle_id}").json()["model_a"] == model_a
        conv = client.get(f"/api/conversations/{start['conversation_id']}?all=true").json()
        names = {m["content"]: m["model_name"] for m in conv["messages"] if m["role"] == "assistant"}
        assert names == {text["a"]: model_a, text["b"]: model_b}
        again = client.post(f"/api/arena/battles/{battle_id}/vote", json={"winner": "b"})
        assert again.status_code == 409 and again.json()["error"]["code"] == "already_voted"
        assert client.get(f"/api/arena/battles/{battle_id}").json()["winner"] == "a"

        # a tie is a vote too, and gives no DPO pair
        events, _ = battle(client, "Second question")
        assert client.post(f"/api/arena/battles/{events[0]['battle_id']}/vote",
                           json={"winner": "both_bad"}).status_code == 200

        board = client.get("/api/leaderboard").json()
        assert board["votes"] == 2
        rows = {r["name"]: r for r in board["models"]}
        assert (rows[model_a]["wins"], rows[model_a]["ties"], rows[model_a]["losses"]) == (1, 1, 0)
        assert (rows[model_b]["wins"], rows[model_b]["ties"], rows[model_b]["losses"]) == (0, 1, 1)
        assert board["models"][0]["name"] == model_a and rows[model_a]["bt"] > rows[model_b]["bt"]
        assert rows[model_a]["bt_ci"][0] <= rows[model_a]["bt"] <= rows[model_a]["bt_ci"][1]

    assert main(["leaderboard", "--db", db, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["models"] == board["models"]  # the same votes, the same seed
    assert main(["leaderboard", "--db", db]) == 0
    table = capsys.readouterr().out
    assert "2 votes" in table and table.index(model_a) < table.index(model_b)
    assert main(["leaderboard", "--db", db, "--json", "--by-version"]) == 0
    by_version = json.loads(capsys.readouterr().out)["models"]
    assert sorted(r["name"].split("@")[0] for r in by_version) == sorted([model_a, model_b])

    out = tmp_path / "dpo.jsonl"
    assert main(["feedback", "export", "--db", db, "--format", "dpo", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == [{"prompt": [{"role": "user", "content": "Tell me a joke"}],
                     "chosen": [{"role": "assistant", "content": ANSWERS[model_a]}],
                     "rejected": [{"role": "assistant", "content": ANSWERS[model_b]}]}]


def test_arena_with_a_model_and_an_assistant(tiny_model_dir, tmp_path):
    """Real served names: a local model and an assistant over it (one loaded model, two names) answer a battle;
    only the answers' own text could name anything before the vote."""
    bot = tmp_path / "bot.yaml"
    bot.write_text(f"name: helper-z9\nmodel: {tiny_model_dir}\nsystem_prompt: You answer in one word.\n")
    cfg = load_config(None, {"serve.db": f"sqlite:///{tmp_path / 'real.db'}", "serve.rate_limit_per_minute": 0})
    names = {tiny_model_dir.name, "helper-z9"}
    with running(create_app(cfg, tiny_model_dir, assistants=[str(bot)])) as url, \
            httpx.Client(base_url=url, timeout=60) as client:
        with client.stream("POST", "/api/arena/battles", json={"content": "Hello", "max_tokens": 6}) as r:
            assert r.status_code == 200
            events = list(sse_events(r))
        for e in events:  # everything but the models' own words
            e.pop("text", None)
            (e.get("answer") or {}).pop("content", None)
            for side in "ab":
                ((e.get("battle") or {}).get(side) or {}).pop("content", None)
            assert not any(name in json.dumps(e) for name in names), e
        battle_id = events[0]["battle_id"]
        stored = client.get(f"/api/arena/battles/{battle_id}").json()
        assert {stored[s]["finish_reason"] for s in "ab"} <= {"stop", "length"}
        voted = client.post(f"/api/arena/battles/{battle_id}/vote", json={"winner": "b"}).json()
        assert {voted["model_a"], voted["model_b"]} == names


def test_vote_waits_for_both_answers(tmp_path, monkeypatch):
    """While an answer is still streaming the vote is refused (409); once both have ended it counts."""
    app, _, backends = arena_app(tmp_path, monkeypatch, released=False)
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        with client.stream("POST", "/api/arena/battles", json={"content": "Hi"}) as r:
            events = sse_events(r)
            start = next(events)
            early = client.post(f"/api/arena/battles/{start['battle_id']}/vote", json={"winner": "tie"})
            assert early.status_code == 409 and early.json()["error"]["code"] == "battle_not_finished"
            for b in backends.values():
                b.release()
            assert [e["type"] for e in events][-1] == "end"
        assert client.post(f"/api/arena/battles/{start['battle_id']}/vote", json={"winner": "tie"}).status_code == 200


def test_bad_arena_requests(tmp_path, monkeypatch):
    app, _, _ = arena_app(tmp_path, monkeypatch)
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        events, _ = battle(client)
        battle_id = events[0]["battle_id"]
        checks = [
            (client.post("/api/arena/battles", json={"content": "   "}), 400, "empty"),
            (client.post("/api/arena/battles", json={"content": "hi", "max_tokens": 0}), 400, "max_tokens"),
            (client.post("/api/arena/battles", json={"content": "hi", "max_tokens": 10**9}), 400, "max_tokens"),
            (client.post("/api/arena/battles", content="hi", headers={"Content-Type": "text/plain"}), 415, "JSON"),
            (client.post(f"/api/arena/battles/{battle_id}/vote", json={"winner": "c"}), 400, "winner"),
            (client.post(f"/api/arena/battles/{battle_id}/vote", json={}), 400, "winner"),
            (client.post("/api/arena/battles/999/vote", json={"winner": "a"}), 404, "not found"),
            (client.post(f"/api/arena/battles/{2**63}/vote", json={"winner": "a"}), 400, "battle_id"),
            (client.get("/api/arena/battles/0"), 400, "battle_id"),
            (client.get("/api/arena/battles/abc"), 400, "battle_id"),
            (client.get("/api/leaderboard?n_bootstrap=-1"), 400, "n_bootstrap"),
        ]
        for r, status, word in checks:
            assert r.status_code == status, (r.request.url, r.text)
            assert word in json.dumps(r.json()["error"]), r.text
        assert client.get(f"/api/arena/battles/{battle_id}").json()["winner"] is None
        assert client.get("/api/leaderboard").json() == {"votes": 0, "n_bootstrap": 200, "models": []}


def test_arena_needs_two_models(tmp_path, monkeypatch):
    app, _, _ = arena_app(tmp_path, monkeypatch, names=(ALPHA,))
    with running(app) as url:
        r = httpx.post(url + "/api/arena/battles", json={"content": "hi"}, timeout=30)
    assert r.status_code == 409
    assert "two models" in r.json()["error"]["message"] and "--assistant" in r.json()["error"]["message"]
    store = Store(f"sqlite:///{tmp_path / 'arena.db'}")
    assert store.list_conversations() == []  # nothing stored for a refused battle
    store.close()


def test_leaderboard_cli_errors(tmp_path, capsys):
    missing = f"sqlite:///{tmp_path / 'nope.db'}"
    assert main(["leaderboard", "--db", missing]) == 2
    assert "not found" in capsys.readouterr().err and not (tmp_path / "nope.db").exists()
    empty = f"sqlite:///{tmp_path / 'empty.db'}"
    Store(empty).close()
    assert main(["leaderboard", "--db", empty]) == 0
    assert "no arena votes yet" in capsys.readouterr().out
    assert main(["leaderboard", "--db", empty, "--bootstrap", "-5"]) == 2
    assert "n_bootstrap" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ the store
def battle_in(store: Store, question: str = "Q", a: str = "answer A", b: str = "answer B") -> dict:
    conv = store.create_conversation(source="arena")["id"]
    q = store.add_message(conv, "user", question)["id"]
    ma = store.add_message(conv, "assistant", a, q, model_name="x", finish_reason="stop")["id"]
    mb = store.add_message(conv, "assistant", b, q, model_name="y", finish_reason="stop")["id"]
    return store.add_battle(conv, q, ma, mb, "x", "y", "x@1", "y@1")


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    url = f"sqlite:///{tmp_path / 'store.db'}" if request.param == "sqlite" else request.getfixturevalue("pg_server")()
    s = Store(url)
    try:
        yield s
    finally:
        s.close()


def test_store_battles_and_votes(store):
    bt = battle_in(store)
    assert store.get_message(bt["a"]["message_id"])["model_name"] is None  # hidden until the vote
    assert store.list_votes() == []
    voted = store.vote_battle(bt["id"], "b")
    assert (voted["winner"], voted["model_a"], voted["model_b"]) == ("b", "x", "y") and voted["voted_at"]
    assert store.get_message(bt["b"]["message_id"])["model_version"] == "y@1"
    with pytest.raises(AlreadyVoted):
        store.vote_battle(bt["id"], "a")
    assert store.vote_battle(bt["id"] + 100, "a") is None and store.get_battle(2**63) is None
    second = battle_in(store, "Q2")
    store.vote_battle(second["id"], "a")
    assert store.list_votes() == [{"model_a": "x", "model_b": "y", "winner": "b"},
                                  {"model_a": "x", "model_b": "y", "winner": "a"}]
    pairs = [(r["prompt"][-1]["content"], r["chosen"][0]["content"]) for r in build_examples(store, "dpo")]
    assert pairs == [("Q", "answer B"), ("Q2", "answer A")]
    # a deleted conversation keeps its vote for the ratings; its texts (and so its pair) are gone
    assert store.delete_conversation(second["conversation_id"])
    assert len(store.list_votes()) == 2 and store.get_battle(second["id"])["a"] is None
    assert [r["chosen"][0]["content"] for r in build_examples(store, "dpo")] == ["answer B"]
    # a model's versions rated apart: a registry's new version is a new entry on the leaderboard
    from gptsmith.eval.ratings import leaderboard as rate
    conv = store.create_conversation(source="arena")["id"]
    q = store.add_message(conv, "user", "Q3")["id"]
    ma, mb = (store.add_message(conv, "assistant", t, q, finish_reason="stop")["id"] for t in ("A3", "B3"))
    store.vote_battle(store.add_battle(conv, q, ma, mb, "x", "y", "v2", None)["id"], "a")
    assert [(v["model_a"], v["model_b"]) for v in store.list_votes(by_version=True)] == [
        ("x@x@1", "y@y@1"), ("x@x@1", "y@y@1"), ("x@v2", "y")]
    assert {r["name"] for r in rate(store.list_votes(by_version=True), 0)} == {"x@x@1", "y@y@1", "x@v2", "y"}
    assert {(v["model_a"], v["model_b"]) for v in store.list_votes()} == {("x", "y")}


def test_old_store_gets_the_arena_table(tmp_path):
    url = f"sqlite:///{tmp_path / 'old.db'}"
    s = Store(url)
    conv = s.create_conversation()["id"]
    with s.engine.begin() as conn:  # a store from before the arena
        conn.exec_driver_sql("DROP TABLE arena_battles")
    s.close()
    s = Store(url)
    assert s.get_conversation(conv) is not None and s.list_votes() == []
    bt = battle_in(s)
    assert s.vote_battle(bt["id"], "tie")["winner"] == "tie"
    s.close()
