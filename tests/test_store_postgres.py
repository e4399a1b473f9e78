"""The store on PostgreSQL as well as SQLite: the same store-level tests run against both, and the server and
`feedback export` run once against PostgreSQL end to end.

PostgreSQL is a throwaway cluster this file starts in a temp dir (Debian's postgresql-NN server binaries:
initdb + pg_ctl, trust auth, a unix socket in the temp dir and a free 127.0.0.1 port). initdb refuses to run as
root, so as root the cluster runs as the `postgres` (or `nobody`) user. Tests skip, saying why, where the server
binaries or the psycopg driver are missing.
"""

from __future__ import annotations

import glob
import os
import pwd
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import uuid

import httpx
import pytest
from sqlalchemy import event
from serve_helpers import free_port, running

from gptsmith.config import load_config
from gptsmith.errors import InputError
from gptsmith.serve.app import create_app
from gptsmith.serve.feedback import build_examples
from gptsmith.serve.store import Feedback, Store


def _pg_bindir() -> str | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if found:
        return os.path.dirname(found[-1])
    initdb = shutil.which("initdb")
    return os.path.dirname(initdb) if initdb else None


def _cluster_user() -> str | None:
    """initdb refuses root: as root, run the cluster as an unprivileged user; otherwise as ourselves."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    pytest.skip("running as root and there is no 'postgres' or 'nobody' user to run initdb as "
                "(initdb refuses to run as root)")


@pytest.fixture(scope="module")
def pg_server():
    """A PostgreSQL cluster for this module; yields a function that creates a fresh empty database's URL."""
    pytest.importorskip("psycopg", reason="the PostgreSQL driver is missing: pip install 'psycopg[binary]'")
    import psycopg

    bindir = _pg_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are missing: apt-get install -y postgresql")
    user = _cluster_user()
    root = tempfile.mkdtemp(prefix="gptsmith-pg-")
    as_user = []
    if user is not None:
        pw = pwd.getpwnam(user)
        os.chown(root, pw.pw_uid, pw.pw_gid)
        as_user = ["runuser", "-u", user, "--"] if shutil.which("runuser") else ["su", user, "-s", "/bin/sh", "-c"]
    data, port = os.path.join(root, "data"), free_port()

    def run(*cmd: str) -> subprocess.CompletedProcess:
        if as_user[:1] == ["su"]:
            cmd = (shlex.join(cmd),)
        return subprocess.run([*as_user, *cmd], capture_output=True, text=True, timeout=120, cwd=root)

    r = run(f"{bindir}/initdb", "-D", data, "-A", "trust", "-U", "gptsmith", "-E", "UTF8", "--locale=C",
            "--no-sync")
    if r.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"initdb failed, so PostgreSQL cannot be tested here: {r.stderr.strip()[-500:]}")
    opts = f"-k {root} -h 127.0.0.1 -p {port} -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
    r = run(f"{bindir}/pg_ctl", "-D", data, "-o", opts, "-l", os.path.join(root, "log"), "-w", "-t", "60", "start")
    if r.returncode != 0:
        log = open(os.path.join(root, "log")).read()[-1000:] if os.path.exists(os.path.join(root, "log")) else ""
        shutil.rmtree(root, ignore_errors=True)
        pytest.fail(f"pg_ctl start failed: {r.stdout}{r.stderr}{log}")
    admin = f"postgresql://gptsmith@127.0.0.1:{port}/postgres"

    def new_database() -> str:
        name = "t_" + uuid.uuid4().hex[:12]
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql+psycopg://gptsmith@127.0.0.1:{port}/{name}"

    def restart() -> None:
        r = run(f"{bindir}/pg_ctl", "-D", data, "-o", opts, "-l", os.path.join(root, "log"), "-m", "fast", "-w",
                "-t", "60", "restart")
        assert r.returncode == 0, r.stdout + r.stderr

    new_database.restart = restart
    try:
        yield new_database
    finally:
        run(f"{bindir}/pg_ctl", "-D", data, "-m", "immediate", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    url = (f"sqlite:///{tmp_path / 'store.db'}" if request.param == "sqlite"
           else request.getfixturevalue("pg_server")())
    s = Store(url)
    try:
        yield s
    finally:
        s.close()


# ------------------------------------------------------------------------------------------ store-level tests
def test_conversation_tree_and_history(store):
    c = store.create_conversation(system_prompt="Be brief.", settings={"temperature": 0.5, "max_tokens": 8})
    assert c["settings"] == {"temperature": 0.5, "max_tokens": 8}
    u1 = store.add_message(c["id"], "user", "Hello  there\nfriend")
    a1 = store.add_message(c["id"], "assistant", "first", u1["id"], sampling={"seed": 3}, model_name="m")
    a2 = store.add_message(c["id"], "assistant", "second", u1["id"], regeneration_of_id=a1["id"])
    shown = store.get_conversation(c["id"])
    assert shown["title"] == "Hello there friend"
    assert [m["id"] for m in shown["messages"]] == [u1["id"], a2["id"]]
    assert shown["messages"][1]["siblings"] == [a1["id"], a2["id"]]
    assert len(store.get_conversation(c["id"], all_messages=True)["messages"]) == 3
    assert store.context_for(c["id"], a1["id"]) == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello  there\nfriend"},
        {"role": "assistant", "content": "first"}]
    assert store.get_message(a1["id"])["sampling"] == {"seed": 3}
    assert store.leaf_id(c["id"]) == a2["id"]
    last = store.add_chain(c["id"], [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}])
    assert store.get_message(last)["parent_id"] == store.leaf_id(c["id"]) - 1
    created = store.get_conversation(c["id"])["created_at"]
    assert created.endswith("+00:00"), created  # times come back in UTC, whatever the server's time zone


def test_list_search_update(store):
    a = store.create_conversation(title="Paris trip")
    b = store.create_conversation(source="api")
    store.add_message(b["id"], "user", "What about ROME?")
    assert {c["id"] for c in store.list_conversations("rome")} == {b["id"]}  # case-insensitive, in messages
    assert {c["id"] for c in store.list_conversations("PARIS")} == {a["id"]}
    assert [c["id"] for c in store.list_conversations(source="api")] == [b["id"]]
    assert [c["id"] for c in store.list_conversations()] == [b["id"], a["id"]]  # most recently updated first
    assert store.list_conversations("100%_sure") == []
    store.update_conversation(a["id"], title="Renamed", settings={"top_p": 0.9})
    assert store.list_conversations()[0]["id"] == a["id"]
    assert store.get_conversation(a["id"])["settings"] == {"top_p": 0.9}
    assert store.update_conversation("nope", title="x") is None


def test_streaming_updates_and_final_text(store):
    c = store.create_conversation()
    q = store.add_message(c["id"], "user", "q")
    a = store.add_message(c["id"], "assistant", "", q["id"])
    b = store.add_message(c["id"], "assistant", "", q["id"])
    store.update_streaming({a["id"]: "part", b["id"]: "partial b"})
    store.update_message(b["id"], content="final b", finish_reason="stop", latency_s=0.25, completion_tokens=2)
    store.update_streaming({a["id"]: "partial a", b["id"]: "stale"})  # a late flush must not undo the final text
    assert store.get_message(a["id"])["content"] == "partial a"
    final = store.get_message(b["id"])
    assert (final["content"], final["finish_reason"], final["latency_s"]) == ("final b", "stop", 0.25)


def test_feedback_and_delete_cascade(store):
    c = store.create_conversation()
    q = store.add_message(c["id"], "user", "q")
    a = store.add_message(c["id"], "assistant", "a", q["id"])
    r = store.add_message(c["id"], "assistant", "b", q["id"], regeneration_of_id=a["id"])
    assert store.set_feedback(a["id"], rating=1, comment="good") == {"rating": 1, "comment": "good",
                                                                     "correction": None}
    assert store.set_feedback(a["id"], rating=0, correction="better") == {"rating": None, "comment": "good",
                                                                          "correction": "better"}
    assert store.set_feedback(10**6, rating=1) is None
    assert store.delete_conversation(c["id"]) is True
    assert store.get_message(a["id"]) is None and store.get_message(r["id"]) is None
    assert store.get_conversation(c["id"]) is None and store.delete_conversation(c["id"]) is False
    with store.Session() as s:  # no orphaned feedback rows
        from sqlalchemy import func, select

        from gptsmith.serve.store import Feedback
        assert s.scalar(select(func.count()).select_from(Feedback)) == 0


def test_text_round_trips(store):
    """Whatever a user or a model can send is stored and read back unchanged, except NUL, which PostgreSQL's
    text types cannot hold: every backend stores U+FFFD instead of failing the write."""
    text = "emoji:\U0001f600 sep:\u2028 quote:' backslash:\\ pct:% " + "long " * 2000
    c = store.create_conversation(system_prompt=text, settings={"stop": ["\x00", "</s>"]})
    m = store.add_message(c["id"], "user", text)
    store.update_streaming({m["id"]: text + "!"})
    assert store.get_message(m["id"])["content"] == text + "!"
    store.update_message(m["id"], content=text)
    assert store.context_for(c["id"], m["id"]) == [{"role": "system", "content": text},
                                                   {"role": "user", "content": text}]
    store.set_feedback(m["id"], comment=text, correction=text)
    assert store.get_message(m["id"])["feedback"] == {"rating": None, "comment": text, "correction": text}
    assert store.get_conversation(c["id"])["settings"] == {"stop": ["\x00", "</s>"]}  # JSON keeps it escaped

    nul = store.create_conversation(title="a\x00b", system_prompt="s\x00")
    q = store.add_message(nul["id"], "user", "x\x00y")
    a = store.add_message(nul["id"], "assistant", "", q["id"])
    store.update_streaming({a["id"]: "partial\x00"})
    assert store.get_message(a["id"])["content"] == "partial\ufffd"
    store.update_message(a["id"], content="final\x00", finish_reason="stop")
    store.set_feedback(a["id"], correction="c\x00")
    got = store.get_conversation(nul["id"])
    assert (got["title"], got["system_prompt"]) == ("a\ufffdb", "s\ufffd")
    assert [(m["content"], m["feedback"]) for m in got["messages"]] == [
        ("x\ufffdy", None), ("final\ufffd", {"rating": None, "comment": None, "correction": "c\ufffd"})]
    assert [x["id"] for x in store.list_conversations("x\x00Y")] == [nul["id"]]


def test_out_of_range_ids_are_not_found(store):
    """Ids from URLs can be any integer; past the 64-bit row id range they are simply not found."""
    for bad in (0, -1, 2**31, 2**63, 10**30):
        assert store.get_message(bad) is None
        assert store.set_feedback(bad, rating=1) is None


def test_concurrent_writers(store):
    """Streams write from worker threads at once (more threads than a connection pool holds by default)."""
    c = store.create_conversation()
    q = store.add_message(c["id"], "user", "q")
    errors = []

    def answer(i: int):
        try:
            m = store.add_message(c["id"], "assistant", "", q["id"])
            for k in range(5):
                store.update_streaming({m["id"]: f"{i}:{k}"})
            store.update_message(m["id"], content=f"done {i}", finish_reason="stop")
        except Exception as e:  # collected: an exception in a thread would otherwise be lost
            errors.append(e)

    together = threading.Barrier(8)

    def rate(i: int):  # a double click, or two tabs: feedback on one message at once
        try:
            together.wait(timeout=30)
            store.set_feedback(q["id"], rating=1 if i % 2 else -1, comment=f"c{i}")
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=answer, args=(i,)) for i in range(24)]
    threads += [threading.Thread(target=rate, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    msgs = store.get_conversation(c["id"], all_messages=True)["messages"]
    assert sorted(m["content"] for m in msgs if m["role"] == "assistant") == sorted(f"done {i}" for i in range(24))
    assert msgs[0]["feedback"]["comment"] in {f"c{i}" for i in range(8)}


def test_first_feedback_from_two_writers_at_once(store):
    """Both writers read "no feedback yet" before either inserts (forced here, not left to timing); the loser
    must update the winner's row, not fail on the one-row-per-message constraint."""
    c = store.create_conversation()
    m = store.add_message(c["id"], "assistant", "a")
    both_read = threading.Barrier(2)

    def after_the_other_read(mapper, connection, target):
        try:
            both_read.wait(timeout=10)
        except threading.BrokenBarrierError:  # SQLite: the store's write lock queues writers, so no race
            pass

    results, errors = [], []

    def rate(value: int):
        try:
            results.append(store.set_feedback(m["id"], rating=value))
        except Exception as e:
            errors.append(e)

    if store.engine.dialect.name != "sqlite":
        event.listen(Feedback, "before_insert", after_the_other_read)
    try:
        threads = [threading.Thread(target=rate, args=(v,)) for v in (1, -1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        if event.contains(Feedback, "before_insert", after_the_other_read):
            event.remove(Feedback, "before_insert", after_the_other_read)
    assert errors == [] and len(results) == 2
    assert store.get_message(m["id"])["feedback"]["rating"] in (1, -1)


def test_feedback_export_reads_the_store(store):
    c = store.create_conversation(system_prompt="Be nice.")
    q = store.add_message(c["id"], "user", "Q")
    a = store.add_message(c["id"], "assistant", "bad", q["id"])
    b = store.add_message(c["id"], "assistant", "good", q["id"], regeneration_of_id=a["id"])
    store.set_feedback(a["id"], rating=-1, correction="better")
    store.set_feedback(b["id"], rating=1)
    prompt = [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "Q"}]
    assert build_examples(store, "sft") == [
        {"messages": prompt + [{"role": "assistant", "content": "better"}]},
        {"messages": prompt + [{"role": "assistant", "content": "good"}]}]
    assert len(build_examples(store, "dpo")) == 2 and len(build_examples(store, "kto")) == 2


# ------------------------------------------------------------------------------------------ the server on PG
def test_server_on_postgresql(pg_server, tiny_model_dir):
    db = pg_server()
    app = create_app(load_config(None, {"serve.db": db, "serve.rate_limit_per_minute": 0}), tiny_model_dir)
    with running(app) as url:
        r = httpx.post(url + "/v1/chat/completions", timeout=60, json={
            "model": "tiny", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200, r.text
        answer = r.json()["choices"][0]["message"]["content"]
        conv = httpx.post(url + "/api/conversations", json={"title": "pg"}).json()
        with httpx.stream("POST", f"{url}/api/conversations/{conv['id']}/messages", timeout=60,
                          json={"content": "hello", "settings": {"max_tokens": 4}}) as s:
            assert s.status_code == 200 and '"type": "done"' in s.read().decode()
        shown = httpx.get(f"{url}/api/conversations/{conv['id']}").json()
        assert [m["role"] for m in shown["messages"]] == ["user", "assistant"]
        fb = httpx.post(f"{url}/api/messages/{shown['messages'][1]['id']}/feedback", json={"rating": 1})
        assert fb.status_code == 200 and fb.json()["rating"] == 1
        assert httpx.post(f"{url}/api/messages/{2**62}/feedback", json={"rating": 1}).status_code in (400, 404)
    store = Store(db)
    try:
        api = store.list_conversations(source="api")
        assert len(api) == 1
        msgs = store.get_conversation(api[0]["id"])["messages"]
        assert msgs[-1]["content"] == answer and msgs[-1]["finish_reason"] in ("stop", "length")
    finally:
        store.close()


def test_ui_api_flows_on_postgresql(pg_server, tiny_model_dir):
    """test_serve_store's whole UI flow (branches, edits, feedback, search, delete) against PostgreSQL."""
    import test_serve_store

    db = pg_server()
    app = create_app(load_config(None, {"serve.db": db, "serve.rate_limit_per_minute": 0}), tiny_model_dir)
    with running(app) as url:
        test_serve_store.test_conversation_flow((url, db))
        test_serve_store.test_long_conversation_drops_oldest_turns((url, db))


def test_store_survives_a_database_restart(pg_server):
    """Pooled connections die with the server; the store must not fail the next request because of them."""
    s = Store(pg_server())
    try:
        c = s.create_conversation(title="before")
        pg_server.restart()
        assert s.get_conversation(c["id"])["title"] == "before"
        s.add_message(c["id"], "user", "after")
    finally:
        s.close()


def test_plain_postgresql_url_uses_psycopg(pg_server):
    """The README's `--db postgresql://user@host/db` form: SQLAlchemy before 2.1 reads it as psycopg2, which
    gptsmith does not install; the store always uses psycopg 3."""
    url = pg_server().replace("postgresql+psycopg://", "postgresql://")
    s = Store(url)
    try:
        c = s.create_conversation(title="plain url")
        assert s.get_conversation(c["id"])["title"] == "plain url"
        assert s.engine.dialect.driver == "psycopg"
    finally:
        s.close()


def test_bad_or_driverless_database_urls_say_what_to_do(monkeypatch):
    with pytest.raises(InputError, match="not a database URL"):
        Store("gptsmith.db")
    monkeypatch.setitem(sys.modules, "psycopg", None)  # as if the `postgres` extra were not installed
    with pytest.raises(InputError, match=r"gptsmith\[postgres\]"):
        Store("postgresql://nobody@127.0.0.1:1/none")
