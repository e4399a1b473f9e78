"""Assistants served: `serve --assistant FILE...` puts each assistant on /v1 as its own model name beside the
plain model; its answers carry their sources in an extra field the official `openai` client ignores; a chain of
thought is hidden unless asked for and stored apart; /v1/embeddings; the index folder watch; the store's new
columns on an old database (SQLite and PostgreSQL)."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import openai
import pytest
from serve_helpers import ScriptedBackend, running, wait_for
from test_store_postgres import pg_server  # noqa: F401 - the throwaway PostgreSQL cluster fixture

from gptsmith.config import RagConfig, load_config
from gptsmith.serve.app import create_app
from gptsmith.serve.store import Store

TUPLES = """# Tuples

A tuple is an immutable sequence: once made, its items never change.
Use a tuple for a record whose fields are fixed.
"""
LISTS = """# Lists

A list is a mutable sequence: append, insert and remove change it in place.
"""
QUESTION = [{"role": "user", "content": "Are tuples immutable?"}]


class RecordingBackend(ScriptedBackend):
    """Answers every prompt with `pieces` at once, and keeps the messages the model saw."""

    def __init__(self, pieces=("Tuples never change [1].",)):
        super().__init__(pieces)
        self.release()
        self.seen: list[list[dict]] = []
        self.params: list = []

    async def open(self, prompt, params):
        self.seen.append(prompt.messages)
        self.params.append(params)
        return await super().open(prompt, params)


@pytest.fixture(scope="module")
def docs_index(tmp_path_factory):
    """Two small documents indexed with the default embedder (all-MiniLM-L6-v2, shipped offline)."""
    from gptsmith.rag.index import build_index

    root = tmp_path_factory.mktemp("rag")
    docs = root / "docs"
    docs.mkdir()
    (docs / "tuples.md").write_text(TUPLES)
    (docs / "lists.md").write_text(LISTS)
    build_index([str(docs)], root / "index", RagConfig(chunk_tokens=64, chunk_overlap=0), progress=False)
    return root / "index", docs


def assistant_file(path, name, model_dir, index=None, **extra) -> str:
    lines = [f"name: {name}", f"model: {model_dir}", "system_prompt: You answer questions about Python."]
    if index is not None:
        lines.append(f"rag: {{index: {index}, top_k: 2}}")
    lines += [f"{k}: {v}" for k, v in extra.items()]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def config(tmp_path, **overrides):
    return load_config(None, {"serve.db": f"sqlite:///{tmp_path / 'serve.db'}", "serve.rate_limit_per_minute": 0}
                       | overrides)


def client(url: str, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)


def stored_answers(app) -> list[dict]:
    store = app.state.server.store
    out = []
    for conv in store.list_conversations(source="api"):
        out += [m for m in store.get_conversation(conv["id"])["messages"] if m["role"] == "assistant"]
    return sorted(out, key=lambda m: m["id"])


# ---------------------------------------------------------------------------------------------- sources
def test_an_assistant_answers_the_openai_client_with_its_sources(tmp_path, tiny_model_dir, docs_index):
    index, docs = docs_index
    backend = RecordingBackend()
    spec = assistant_file(tmp_path / "pydocs.yaml", "pydocs", tiny_model_dir, index,
                          sampling="{temperature: 0.3, max_tokens: 40, top_k: 5, stop: [END]}")
    app = create_app(config(tmp_path), tiny_model_dir, backend=backend, assistants=[spec])
    with running(app) as url:
        c = client(url)
        r = c.chat.completions.create(model="pydocs", messages=QUESTION)
        assert r.model == "pydocs" and r.choices[0].message.content == "Tuples never change [1]."
        sources = r.model_dump()["sources"]  # the extra field: kept by the client, not in its types
        assert sources[0]["index"] == 1 and sources[0]["source"] == str(docs / "tuples.md")
        assert "immutable sequence" in sources[0]["text"] and sources[0]["start"] == 1 and sources[0]["end"] >= 3
        assert sources[0]["citation"].startswith(f"{docs / 'tuples.md'}:1-")
        # the model saw the same passages, numbered as the response gives them
        system = backend.seen[-1][0]
        assert system["role"] == "system" and "[1]" in system["content"] and "immutable sequence" in system["content"]
        assert backend.seen[-1][-1] == QUESTION[0]

        stream = list(c.chat.completions.create(model="pydocs", messages=QUESTION, stream=True))
        assert stream[0].model_dump()["sources"] == sources  # in the first chunk
        assert all("sources" not in ch.model_dump() for ch in stream[1:])
        assert "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices) == "Tuples never change [1]."

        # the profile's sampling where the request leaves it out; the request's where it sets it
        c.chat.completions.create(model="pydocs", messages=QUESTION, temperature=1.0)
        first, _, third = stored_answers(app)
        assert first["sampling"]["temperature"] == 0.3 and first["sampling"]["max_tokens"] == 40
        assert third["sampling"]["temperature"] == 1.0
        assert (backend.params[0].top_k, backend.params[0].stop) == (5, ["END"]) and first["sampling"]["top_k"] == 5
        assert first["model_name"] == "pydocs" and first["sources"] == sources and first["dropped"] is None

        two = list(c.chat.completions.create(model="pydocs", messages=QUESTION, stream=True, n=2))
        assert sum("sources" in ch.model_dump() for ch in two) == 1  # once per reply, not per choice

        # the plain model on the same server answers as before: no extra fields
        plain = httpx.post(url + "/v1/chat/completions", json={"model": "scripted", "messages": QUESTION}).json()
        assert "sources" not in plain and "dropped" not in plain
        assert "reasoning_content" not in plain["choices"][0]["message"]


def test_what_the_context_budget_dropped_is_in_the_response(tmp_path, tiny_model_dir, docs_index):
    index, _ = docs_index
    backend = RecordingBackend()
    spec = assistant_file(tmp_path / "tight.yaml", "tight", tiny_model_dir, index, max_context=180)
    with running(create_app(config(tmp_path), tiny_model_dir, backend=backend, assistants=[spec])) as url:
        history = [{"role": "user", "content": "word " * 60}, {"role": "assistant", "content": "ok " * 60}]
        r = httpx.post(url + "/v1/chat/completions", json={"model": "tight", "messages": history + QUESTION,
                                                          "max_tokens": 40}).json()
        assert r["dropped"]["history_turns"] == 2
        assert backend.seen[-1][-1] == QUESTION[0] and "word word" not in str(backend.seen[-1])
        # a question that cannot fit at all is a 400 naming the context, never a 500
        r = httpx.post(url + "/v1/chat/completions", json={"model": "tight", "max_tokens": 40,
                                                          "messages": [{"role": "user", "content": "why " * 400}]})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        r = httpx.post(url + "/v1/chat/completions", json={"model": "tight", "messages": [
            {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
        assert r.status_code == 400 and "user's question" in r.json()["error"]["message"]


# ---------------------------------------------------------------------------------------------- reasoning
def test_the_reasoning_is_hidden_unless_asked_for_and_stored_apart(tmp_path, tiny_model_dir):
    backend = RecordingBackend(["Reasoning: a tuple cannot", " change after it is made.\n", "Answer: yes, ",
                                "tuples are immutable."])
    spec = assistant_file(tmp_path / "thinker.yaml", "thinker", tiny_model_dir, chain_of_thought="true")
    app = create_app(config(tmp_path), tiny_model_dir, backend=backend, assistants=[spec])
    with running(app) as url:
        c = client(url)
        r = c.chat.completions.create(model="thinker", messages=QUESTION)
        msg = r.choices[0].message.model_dump()
        assert msg["content"] == "yes, tuples are immutable." and "reasoning_content" not in msg
        assert "Reasoning:" in backend.seen[-1][0]["content"]  # the model was asked to reason first

        r = c.chat.completions.create(model="thinker", messages=QUESTION, extra_body={"include_reasoning": True})
        msg = r.choices[0].message.model_dump()
        assert msg["reasoning_content"] == "a tuple cannot change after it is made."
        assert msg["content"] == "yes, tuples are immutable."

        chunks = [ch for ch in c.chat.completions.create(model="thinker", messages=QUESTION, stream=True)
                  if ch.choices]
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == "yes, tuples are immutable."
        assert not any(ch.choices[0].delta.model_dump().get("reasoning_content") for ch in chunks)
        chunks = [ch for ch in c.chat.completions.create(model="thinker", messages=QUESTION, stream=True,
                                                         extra_body={"include_reasoning": True}) if ch.choices]
        deltas = [ch.choices[0].delta.model_dump() for ch in chunks]
        assert "".join(d.get("reasoning_content") or "" for d in deltas).strip() == \
            "a tuple cannot change after it is made."
        assert "".join(d.get("content") or "" for d in deltas) == "yes, tuples are immutable."

        r = httpx.post(url + "/v1/chat/completions", json={"model": "thinker", "messages": QUESTION,
                                                          "include_reasoning": "yes"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "include_reasoning"
    for m in stored_answers(app):
        assert m["content"] == "yes, tuples are immutable."
        assert m["reasoning"] == "a tuple cannot change after it is made."
        assert m["sampling"]["chain_of_thought"] is True


# ---------------------------------------------------------------------------------------------- several models
def test_two_assistants_and_the_plain_model_share_one_loaded_model(tmp_path, tiny_model_dir, docs_index):
    index, _ = docs_index
    a = assistant_file(tmp_path / "a.yaml", "pydocs", tiny_model_dir, index, sampling="{max_tokens: 4}")
    b = assistant_file(tmp_path / "b.yaml", "terse", tiny_model_dir, sampling="{max_tokens: 4}")
    app = create_app(config(tmp_path), tiny_model_dir, assistants=[a, b])
    srv = app.state.server
    assert len(srv.backends) == 1  # one engine and one batch scheduler for all three names
    with running(app) as url:
        c = client(url)
        plain_name = tiny_model_dir.resolve().name
        assert [m.id for m in c.models.list()] == [plain_name, "pydocs", "terse"]
        assert c.models.retrieve("terse").id == "terse"
        for name in (plain_name, "pydocs", "terse"):
            r = c.chat.completions.create(model=name, messages=QUESTION, max_tokens=4)
            assert r.model == name and r.usage.completion_tokens >= 1
            assert ("sources" in r.model_dump()) == (name == "pydocs")
        with pytest.raises(openai.NotFoundError) as e:
            c.chat.completions.create(model="nope", messages=QUESTION)
        assert "'pydocs'" in e.value.message and "'terse'" in e.value.message
        with pytest.raises(openai.NotFoundError):
            c.models.retrieve("nope")
        r = httpx.post(url + "/v1/completions", json={"model": "pydocs", "prompt": "hi"})
        assert r.status_code == 400 and "/v1/chat/completions" in r.json()["error"]["message"]
        info = httpx.get(url + "/api/info").json()
        assert [(m["id"], m["assistant"], m["rag"]) for m in info["models"]] == [
            (plain_name, False, False), ("pydocs", True, True), ("terse", True, False)]
    assert [m["model_name"] for m in stored_answers(app)] == [plain_name, "pydocs", "terse"]


def test_assistants_alone_and_a_clear_error_for_two_with_one_name(tmp_path, tiny_model_dir):
    from gptsmith.errors import InputError

    a = assistant_file(tmp_path / "a.yaml", "same", tiny_model_dir)
    b = assistant_file(tmp_path / "b.yaml", "same", tiny_model_dir)
    with pytest.raises(InputError, match="named the same"):
        create_app(config(tmp_path), assistants=[a, b])
    app = create_app(config(tmp_path), assistants=[a])
    with running(app) as url:
        assert [m.id for m in client(url).models.list()] == ["same"]
        assert httpx.get(url + "/health").json()["model"] == "same"


# ---------------------------------------------------------------------------------------------- embeddings
def test_embeddings_in_openai_shape_behind_the_api_key(tmp_path, tiny_model_dir, docs_index):
    index, _ = docs_index
    spec = assistant_file(tmp_path / "pydocs.yaml", "pydocs", tiny_model_dir, index)
    app = create_app(config(tmp_path, **{"serve.api_key": "sekret"}), tiny_model_dir,
                     backend=RecordingBackend(), assistants=[spec])
    with running(app) as url:
        r = httpx.post(url + "/v1/embeddings", json={"model": "pydocs", "input": "tuples"})
        assert r.status_code == 401
        c = client(url, "sekret")
        got = c.embeddings.create(model="pydocs", input=["a tuple is immutable", "lists change"])  # base64 on the wire
        assert [d.index for d in got.data] == [0, 1] and got.model == "pydocs"
        vectors = np.array([d.embedding for d in got.data])
        assert vectors.shape == (2, 384) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-3)
        assert got.usage.prompt_tokens == got.usage.total_tokens >= 5
        # the index's own embedder: the same vectors the index searches with
        retriever = app.state.server.served[1].assistant.retriever
        assert np.allclose(vectors, retriever.embedder.embed(["a tuple is immutable", "lists change"]), atol=1e-5)

        auth = {"Authorization": "Bearer sekret"}
        floats = httpx.post(url + "/v1/embeddings", headers=auth,
                            json={"model": "default", "input": "a tuple is immutable"}).json()
        assert floats["object"] == "list" and floats["data"][0]["object"] == "embedding"
        assert np.allclose(floats["data"][0]["embedding"], vectors[0], atol=1e-5)
        b64 = httpx.post(url + "/v1/embeddings", headers=auth, json={
            "model": "all-MiniLM-L6-v2", "input": "a tuple is immutable", "encoding_format": "base64"}).json()
        assert np.allclose(np.frombuffer(base64.b64decode(b64["data"][0]["embedding"]), "<f4"), vectors[0], atol=1e-5)
        for bad, param in (([], "input"), ([""], "input[0]"), ([[1, 2, 3]], "input[0]"), ([1, 2], "input[0]")):
            r = httpx.post(url + "/v1/embeddings", headers=auth, json={"model": "default", "input": bad})
            assert r.status_code == 400 and r.json()["error"]["param"] == param, (bad, r.text)
        for extra in ({"encoding_format": "int8"}, {"dimensions": 64}):
            r = httpx.post(url + "/v1/embeddings", headers=auth, json={"model": "default", "input": "x"} | extra)
            assert r.status_code == 400 and r.json()["error"]["param"] == next(iter(extra)), r.text
        with pytest.raises(openai.NotFoundError):
            c.embeddings.create(model="text-embedding-3-small", input="x")


# ---------------------------------------------------------------------------------------------- watch
def test_the_watch_brings_an_edited_file_into_the_next_answer_without_a_full_reindex(tmp_path, tiny_model_dir):
    from gptsmith.rag.index import build_index

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "tuples.md").write_text(TUPLES)
    (docs / "lists.md").write_text(LISTS)
    build_index([str(docs)], tmp_path / "index", RagConfig(chunk_tokens=64, chunk_overlap=0), progress=False)
    spec = assistant_file(tmp_path / "pydocs.yaml", "pydocs", tiny_model_dir, tmp_path / "index")
    app = create_app(config(tmp_path, **{"serve.watch": True, "serve.watch_seconds": 0.05}), tiny_model_dir,
                     backend=RecordingBackend(), assistants=[spec])
    watcher = app.state.server.watcher
    with running(app) as url:
        c = client(url)
        before = c.chat.completions.create(model="pydocs", messages=QUESTION).model_dump()["sources"]
        assert any("immutable sequence" in s["text"] for s in before)
        # saved the way editors do (write then rename), so a round never reads a half-written file
        (tmp_path / "draft.md").write_text(TUPLES.replace("immutable sequence", "frozen, unchangeable sequence"))
        (tmp_path / "draft.md").replace(docs / "tuples.md")
        seen = len(watcher.history)
        # a round that started after the edit has finished: the test decides, not a clock
        wait_for(lambda: any(r.get("files_updated") for _, r in watcher.history[seen:]), what="a refresh")
        updates = [r for _, r in watcher.history if r.get("files_updated") or r.get("files_deleted")]
        assert len(updates) == 1 and updates[0]["files_updated"] == 1 and updates[0]["files_unchanged"] == 1
        after = c.chat.completions.create(model="pydocs", messages=QUESTION).model_dump()["sources"]
        assert any("frozen, unchangeable sequence" in s["text"] for s in after)
        assert not any("immutable sequence" in s["text"] for s in after)

        # a file emptied loses its chunks (it is skipped, and counted as such): it is no longer cited
        assert any(s["source"].endswith("lists.md") for s in after)
        (tmp_path / "draft.md").write_text("")
        (tmp_path / "draft.md").replace(docs / "lists.md")
        wait_for(lambda: any(r.get("files_indexed") == 1 for _, r in watcher.history), what="the emptied file")
        emptied = next(r for _, r in watcher.history if r.get("files_indexed") == 1)
        assert emptied["files_skipped"] == 1 and emptied["skipped"][0]["path"].endswith("lists.md")
        final = c.chat.completions.create(model="pydocs", messages=QUESTION).model_dump()["sources"]
        assert final and not any(s["source"].endswith("lists.md") for s in final)


# ---------------------------------------------------------------------------------------------- store
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_an_older_store_gains_the_new_columns_and_keeps_its_rows(backend, tmp_path, request):
    from sqlalchemy import text

    url = f"sqlite:///{tmp_path / 'old.db'}" if backend == "sqlite" else request.getfixturevalue("pg_server")()
    store = Store(url)
    conv = store.create_conversation("old")
    user = store.add_message(conv["id"], "user", "kept")
    with store.engine.begin() as con:  # what a database made before these columns looks like
        for column in ("reasoning", "sources", "dropped"):
            con.execute(text(f"ALTER TABLE messages DROP COLUMN {column}"))
    store.close()
    for _ in range(2):  # idempotent: a second start finds them there
        store = Store(url)
        msg = store.get_conversation(conv["id"])["messages"][0]
        assert msg["content"] == "kept" and msg["reasoning"] is None and msg["sources"] is None
        store.close()
    store = Store(url)
    source = {"index": 1, "citation": "a.md:1-2", "text": "caf\u00e9 \u2028 \U0001f600"}
    answer = store.add_message(conv["id"], "assistant", "", user["id"], sources=[source], dropped={"chunks": 1})
    store.update_message(answer["id"], content="yes", reasoning="because")
    got = store.get_message(answer["id"])
    assert (got["content"], got["reasoning"], got["sources"], got["dropped"]) == ("yes", "because", [source],
                                                                                    {"chunks": 1})
    store.close()


def test_an_assistant_with_backend_url_fronts_that_server(tmp_path, monkeypatch):
    back = RecordingBackend(["Reasoning: remote thinking.\n", "Answer: from the backend."])
    back_app = create_app(load_config(None, {"serve.db": f"sqlite:///{tmp_path / 'back.db'}",
                                             "serve.api_key": "backend-key"}), backend=back)
    with running(back_app) as back_url:
        monkeypatch.setenv("REMOTE_KEY", "backend-key")
        (tmp_path / "remote.yaml").write_text(f"name: remote\nbackend_url: {back_url}/v1\napi_key_env: REMOTE_KEY\n"
                                              "system_prompt: Be kind.\nchain_of_thought: true\n")
        front = create_app(config(tmp_path), assistants=[tmp_path / "remote.yaml"])
        with running(front) as url:
            r = client(url).chat.completions.create(model="remote", messages=QUESTION)
            assert r.model == "remote" and r.choices[0].message.content == "from the backend."
            assert back.seen[-1][0]["role"] == "system" and back.seen[-1][0]["content"].startswith("Be kind.")
            assert back.seen[-1][-1] == QUESTION[0]
    assert stored_answers(front)[0]["reasoning"] == "remote thinking."
