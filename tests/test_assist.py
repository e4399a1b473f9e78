"""Assistants: the profile file, few-shot selection, the context budget, chain of thought, and `gptsmith ask`."""

import json
import re
from pathlib import Path

import numpy as np
import pytest

from gptsmith.assist import (Assistant, AssistantError, ContextError, FewShotLibrary, ReasoningFilter,
                             load_assistant, split_reasoning)
from gptsmith.assist.reasoning import COT_INSTRUCTION
from gptsmith.rag.types import Chunk, Hit


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def jsonl(path, convs):
    return write(path, "".join(json.dumps({"messages": c}) + "\n" for c in convs))


def qa(q, a):
    return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


class WordEmbedder:
    """A deterministic stand-in for a sentence embedder: bag of words hashed into 64 dims, L2-normalised."""
    name = "words-64"

    def __init__(self):
        self.calls = 0

    def embed(self, texts):
        self.calls += 1
        out = np.zeros((len(texts), 64), dtype=np.float32)
        for i, t in enumerate(texts):
            for w in re.findall(r"[a-z]+", t.lower()):
                out[i, sum(map(ord, w)) % 64] += 1
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)


class FakeRetriever:
    def __init__(self, hits):
        self.hits = hits
        self.calls = []

    def search(self, query, top_k=5, mode="hybrid", rerank=False, min_score=None, sources=None):
        self.calls.append(dict(query=query, top_k=top_k, mode=mode, rerank=rerank, min_score=min_score,
                               sources=sources))
        return self.hits[:top_k]


def hit(i, text, source="/docs/a.md"):
    return Hit(Chunk(text, source, f"Part {i}", 10 * i, 10 * i + 5), score=1.0 / i, rank=i, id=f"c{i}")


@pytest.fixture(autouse=True)
def cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@pytest.fixture
def model_dir(tmp_path):
    d = tmp_path / "qs" / "chat"
    write(d / "config.json", "{}")
    return d


def profile_file(tmp_path, body):
    return write(tmp_path / "bot.yaml", body)


# ---------------------------------------------------------------------------------------------- profile

def test_the_issues_example_loads_with_paths_from_the_files_folder(tmp_path, model_dir, monkeypatch):
    (tmp_path / "pyindex").mkdir()
    jsonl(tmp_path / "examples.jsonl", [qa("hi", "hello")])
    path = profile_file(tmp_path, """
name: pydocs
model: ./qs/chat
system_prompt: You answer questions about Python and cite your sources.
rag: {index: ./pyindex, top_k: 4}
few_shot: {file: examples.jsonl, k: 2}
chain_of_thought: false
sampling: {temperature: 0.7, max_tokens: 256}
""")
    monkeypatch.chdir(tmp_path / "qs")  # another working directory: paths still start at the file's folder
    p = load_assistant(path)
    assert p.name == "pydocs" and p.model == model_dir.resolve()
    assert p.rag.index == (tmp_path / "pyindex").resolve() and p.rag.top_k == 4 and p.rag.mode is None
    assert p.few_shot.file == (tmp_path / "examples.jsonl").resolve() and p.few_shot.k == 2
    assert p.sampling.temperature == 0.7 and p.sampling.max_tokens == 256 and p.chain_of_thought is False


@pytest.mark.parametrize("yaml_text, key, closest", [
    ("name: a\nmodel: qs/chat\nsytem_prompt: hi\n", "sytem_prompt", "system_prompt"),
    ("name: a\nmodel: qs/chat\nrag: {index: qs, topk: 3}\n", "rag.topk", "rag.top_k"),
    ("name: a\nmodel: qs/chat\nsampling: {temprature: 0.2}\n", "sampling.temprature", "sampling.temperature"),
    ("name: a\nmodel: qs/chat\nfew_shot: {file: x.jsonl, kk: 1}\n", "few_shot.kk", "few_shot.k"),
])
def test_an_unknown_key_names_the_file_and_the_closest_valid_key(tmp_path, model_dir, yaml_text, key, closest):
    path = profile_file(tmp_path, yaml_text)
    with pytest.raises(AssistantError) as e:
        load_assistant(path)
    assert f"{path}: unknown key '{key}'. Did you mean '{closest}'?" in str(e.value)


@pytest.mark.parametrize("yaml_text, field, missing", [
    ("name: a\nmodel: nowhere\n", "model", "nowhere"),
    ("name: a\nmodel: qs/chat\nrag: {index: no-index}\n", "rag.index", "no-index"),
    ("name: a\nmodel: qs/chat\nfew_shot: {file: none.jsonl}\n", "few_shot.file", "none.jsonl"),
])
def test_a_path_that_does_not_exist_is_named_with_its_field(tmp_path, model_dir, yaml_text, field, missing):
    path = profile_file(tmp_path, yaml_text)
    with pytest.raises(AssistantError) as e:
        load_assistant(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: '{field}': ") and str(tmp_path / missing) in msg


def test_a_folder_that_is_not_a_model_is_refused(tmp_path):
    (tmp_path / "docs").mkdir()
    with pytest.raises(AssistantError, match=r"'model': .*docs is not a model folder \(no config.json\)"):
        load_assistant(profile_file(tmp_path, "name: a\nmodel: docs\n"))


@pytest.mark.parametrize("yaml_text, expected", [
    ("name: a\n", "exactly one of 'model'"),
    ("name: a\nmodel: qs/chat\nbackend_url: http://x/v1\n", "exactly one of 'model'"),
    ("model: qs/chat\n", "'name' is required"),
    ("name: a\nmodel: qs/chat\nsampling: {temperature: -1}\n", "'sampling.temperature': Input should be greater"),
    ("name: a\nmodel: qs/chat\nrag: {index: qs, mode: fuzzy}\n", "'rag.mode'"),
    ("name: a b\nmodel: qs/chat\n", "'name': 'a b' must be"),
    ("- name: a\n", "the top level must be a mapping"),
    ("name: [a\n", "not valid YAML"),
])
def test_bad_values_are_named_by_file_and_field(tmp_path, model_dir, yaml_text, expected):
    path = profile_file(tmp_path, yaml_text)
    with pytest.raises(AssistantError) as e:
        load_assistant(path)
    assert str(e.value).startswith(str(path)) and expected in str(e.value)


def test_a_backend_assistant_needs_no_local_model(tmp_path):
    p = load_assistant(profile_file(tmp_path, "name: remote\nbackend_url: http://127.0.0.1:11434/v1\n"))
    assert p.model is None and p.backend_url == "http://127.0.0.1:11434/v1"


# ---------------------------------------------------------------------------------------------- few-shot

TOPICS = [qa("How long should I boil spaghetti pasta in salted water?", "About ten minutes, until al dente."),
          qa("How do I sort a Python list of numbers in place?", "Call list.sort(); sorted() returns a new list."),
          qa("How do I change a flat tyre on my car?", "Loosen the nuts, jack up the car, swap the wheel.")]


@pytest.fixture(scope="module")
def minilm():
    from gptsmith.assist.fewshot import default_embedder

    return default_embedder()


def test_few_shot_picks_the_example_on_the_questions_topic(tmp_path, minilm):
    lib = FewShotLibrary.load(jsonl(tmp_path / "ex.jsonl", TOPICS), minilm)
    best, = lib.select("What is the way to order the items of a list in Python?", k=1)
    assert best.messages == TOPICS[1]
    ranked = lib.select("my car has a puncture, what do I do with the wheel?", k=3)
    assert ranked[0].messages == TOPICS[2] and ranked[0].score > ranked[1].score >= ranked[2].score


def test_few_shot_vectors_are_cached_by_file_content(tmp_path):
    path = jsonl(tmp_path / "ex.jsonl", TOPICS)
    emb = WordEmbedder()
    FewShotLibrary.load(path, emb)
    assert emb.calls == 1
    FewShotLibrary.load(path, emb)
    assert emb.calls == 1  # same content, same embedder: read from the cache
    jsonl(path, TOPICS[:2])
    lib = FewShotLibrary.load(path, emb)
    assert emb.calls == 2 and len(lib) == 2  # edited: embedded again


def test_few_shot_keeps_to_its_token_budget(tmp_path):
    long = qa("sort a python list " + "please " * 50, "list.sort()")
    lib = FewShotLibrary.load(jsonl(tmp_path / "ex.jsonl", [long, *TOPICS]), WordEmbedder())
    count = lambda msgs: sum(len(m["content"].split()) for m in msgs)  # noqa: E731
    chosen = lib.select("sort a python list", k=2, max_tokens=40, count_tokens=count)
    assert [c.messages for c in chosen][0] == TOPICS[1] and long not in [c.messages for c in chosen]
    assert sum(count(c.messages) for c in chosen) <= 40


def test_a_bad_example_line_is_named_by_file_and_line(tmp_path):
    path = write(tmp_path / "ex.jsonl", json.dumps({"messages": TOPICS[0]}) + "\n{not json\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: invalid JSON")):
        FewShotLibrary.load(path, WordEmbedder())


# ---------------------------------------------------------------------------------------------- context budget

def words(messages):
    """Token counter for the tests: one token per word plus 2 per message."""
    return sum(len(m["content"].split()) + 2 for m in messages)


def budget_assistant(tmp_path, model_dir, k_examples=2):
    (tmp_path / "idx").mkdir(exist_ok=True)
    jsonl(tmp_path / "ex.jsonl", TOPICS)
    profile = load_assistant(profile_file(tmp_path, f"""
name: t
model: qs/chat
system_prompt: Answer briefly.
rag: {{index: idx, top_k: 3}}
few_shot: {{file: ex.jsonl, k: {k_examples}, max_tokens: 1000}}
"""))
    hits = [hit(i, f"chunk {i} " + "word " * 20) for i in (1, 2, 3)]
    return Assistant(profile, FakeRetriever(hits), FewShotLibrary.load(profile.few_shot.file, WordEmbedder()))


HISTORY = [*qa("first question " + "x " * 10, "first answer " + "y " * 10),
           *qa("second question " + "x " * 10, "second answer " + "y " * 10)]
QUESTION = {"role": "user", "content": "how do I sort a list in python " + "z " * 5}


def test_everything_goes_in_when_it_fits(tmp_path, model_dir):
    a = budget_assistant(tmp_path, model_dir)
    p = a.prepare([*HISTORY, QUESTION], words, max_context=10_000, max_new_tokens=100)
    assert p.dropped == {"history_turns": 0, "chunks": 0, "examples": 0}
    system = p.messages[0]["content"]
    assert system.startswith("Answer briefly.") and "[1] /docs/a.md:10-15 (Part 1)\nchunk 1" in system
    assert "[3] /docs/a.md:30-35 (Part 3)" in system and "cite them by number" in system
    assert p.messages[-1] == QUESTION and p.messages[-5:-1] == HISTORY
    assert p.messages[-7:-5] == TOPICS[1]  # the most similar example sits nearest the question
    assert [h.rank for h in p.sources] == [1, 2, 3] and p.n_tokens == words(p.messages)
    assert a.retriever.calls[0]["query"] == QUESTION["content"]


def test_trimming_drops_history_then_chunks_then_examples_and_never_the_question(tmp_path, model_dir):
    a = budget_assistant(tmp_path, model_dir)
    full = words(a.prepare([*HISTORY, QUESTION], words, 10_000, 0).messages)
    turn = words(HISTORY[:2])  # the oldest turn: a question and its answer
    chunk = len(hit(3, "chunk 3 " + "word " * 20).chunk.citation().split()) + 22

    def fit(room):
        return a.prepare([*HISTORY, QUESTION], words, max_context=room + 50, max_new_tokens=50)

    p = fit(full - 1)  # one token over: the oldest turn goes, nothing else
    assert p.dropped == {"history_turns": 2, "chunks": 0, "examples": 0} and p.messages[-3:-1] == HISTORY[2:]
    p = fit(full - 2 * turn)  # all history gone, every chunk and example kept
    assert p.dropped == {"history_turns": 4, "chunks": 0, "examples": 0} and len(p.sources) == 3
    p = fit(full - 2 * turn - 1)  # then the lowest ranked chunk
    assert p.dropped == {"history_turns": 4, "chunks": 1, "examples": 0}
    assert [h.rank for h in p.sources] == [1, 2] and "[3]" not in p.messages[0]["content"]
    p = fit(full - 2 * turn - 3 * chunk - 1)  # then all chunks, then the least similar example
    assert p.dropped == {"history_turns": 4, "chunks": 3, "examples": 1}
    assert p.messages[1:3] == TOPICS[1] and p.sources == []
    bare = [{"role": "system", "content": a.system_text("", [], reasoning=False)}, QUESTION]
    p = fit(words(bare))  # everything optional gone; the question is whole
    assert p.messages == bare
    assert p.dropped == {"history_turns": 4, "chunks": 3, "examples": 2} and p.messages[-1] == QUESTION
    for room in (words([QUESTION]) - 1, 3):
        with pytest.raises(ContextError, match="the question and the assistant's system prompt alone are"):
            fit(room)


def test_the_caller_must_end_with_a_user_question(tmp_path, model_dir):
    a = budget_assistant(tmp_path, model_dir)
    for bad in ([], HISTORY, [{"role": "user", "content": "  "}], [{"role": "tool", "content": "x"}]):
        with pytest.raises(ValueError):
            a.prepare(bad, words, 10_000, 10)


def test_retrieval_settings_reach_the_retriever(tmp_path, model_dir):
    (tmp_path / "idx").mkdir()
    profile = load_assistant(profile_file(tmp_path, "name: t\nmodel: qs/chat\nrag: {index: idx, top_k: 2, mode: "
                                                    "bm25, min_score: 0.2, sources: ['*.md']}\n"))
    r = FakeRetriever([hit(1, "a")])
    Assistant(profile, r).prepare([QUESTION], words, 10_000, 10)
    # rerank not set in the profile: None, the index's recorded choice decides
    assert r.calls == [dict(query=QUESTION["content"], top_k=2, mode="bm25", rerank=None, min_score=0.2,
                            sources=["*.md"])]


# ---------------------------------------------------------------------------------------------- chain of thought

@pytest.mark.parametrize("text, reasoning, answer", [
    ("Reasoning: lists change, tuples do not.\nSo a tuple.\nAnswer: use a tuple", "lists change, tuples do not."
     "\nSo a tuple.", "use a tuple"),
    ("  **Reasoning:** a\n**Answer:** b", "a", "b"),
    ("Use a tuple.", "", "Use a tuple."),  # no delimiter: all answer
    ("Answer: 42", "", "42"),
    ("Reasoning: first this, then that, and", "first this, then that, and", ""),  # unfinished: no answer
    ("<think>short</think>\nfinal", "short", "final"),
    ("<think>never ends", "never ends", ""),
    ("The Answer: is in line one", "", "The Answer: is in line one"),
])
def test_split_reasoning(text, reasoning, answer):
    assert split_reasoning(text) == (reasoning, answer)


@pytest.mark.parametrize("size", [1, 2, 5, 100])
def test_the_streaming_filter_agrees_with_split_reasoning(size):
    text = "Reasoning: step one\nstep two mentions answers\nAnswer: forty-two\nand more"
    f = ReasoningFilter()
    parts, started_at = [], None
    for i in range(0, len(text), size):
        parts += f.push(text[i:i + size])
        if f.answer_started and started_at is None:
            started_at = i
    parts += f.finish()
    assert "".join(t for k, t in parts if k == "answer") == "forty-two\nand more"
    assert "".join(t for k, t in parts if k == "reasoning").strip() == "step one\nstep two mentions answers"
    kinds = [k for k, _ in parts]
    assert kinds == sorted(kinds, key=lambda k: k == "answer")  # all reasoning before any answer
    assert started_at is not None and started_at < len(text) - len("forty-two\nand more")


def test_reasoning_mode_adds_the_instruction_and_keeps_the_reasoning_apart(tmp_path, model_dir):
    from gptsmith.assist.answer import answer

    profile = load_assistant(profile_file(tmp_path, "name: t\nmodel: qs/chat\nchain_of_thought: true\n"))
    a = Assistant(profile)
    assert COT_INSTRUCTION in a.prepare([QUESTION], words, 1000, 10).messages[0]["content"]
    assert a.prepare([QUESTION], words, 1000, 10, reasoning=False).messages == [QUESTION]

    class Scripted:
        max_context, default_max_tokens, finish_reason = 1000, 50, "stop"
        count_tokens = staticmethod(words)

        def stream(self, messages, sampling, max_new_tokens):
            yield from ["Reason", "ing: think", " hard\nAns", "wer: 42"]

    shown = []
    reply = answer(a, Scripted(), [QUESTION], on_text=lambda k, t: shown.append((k, t)))
    assert (reply.reasoning, reply.answer) == ("think hard", "42")
    assert "".join(t for k, t in shown if k == "answer") == "42"


# ---------------------------------------------------------------------------------------------- CLI

def test_ask_and_chat_refuse_a_bad_profile_with_its_name(tmp_path, capsys):
    from gptsmith.cli import main

    path = profile_file(tmp_path, "name: a\nbackend_url: http://x\nsytem_prompt: hi\n")
    assert main(["ask", "--assistant", str(path), "hello"]) == 2
    assert "Did you mean 'system_prompt'?" in capsys.readouterr().err
    assert main(["chat"]) == 2
    assert "--model DIR" in capsys.readouterr().err
    down = profile_file(tmp_path, "name: a\nbackend_url: http://127.0.0.1:9/v1\n")  # nothing listens on port 9
    assert main(["ask", "--assistant", str(down), "hello"]) == 2
    assert "backend http://127.0.0.1:9/v1 is not reachable" in capsys.readouterr().err


def test_a_backend_assistant_streams_from_chat_completions_with_its_key(tmp_path, monkeypatch):
    import httpx

    from gptsmith.assist.answer import RemoteModel, answer

    monkeypatch.setenv("MY_KEY", "sk-test")
    (tmp_path / "idx").mkdir()
    profile = load_assistant(profile_file(tmp_path, "name: r\nbackend_url: http://backend:11434\napi_key_env: MY_KEY\n"
                                                    "chain_of_thought: true\nrag: {index: idx, top_k: 1}\n"
                                                    "sampling: {temperature: 0.1, max_tokens: 20}\n"))
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "llama3"}]})
        deltas = ["Reasoning: look it up", "\nAnswer: see [1]"]
        body = "".join(f"data: {json.dumps({'choices': [{'delta': {'content': d}, 'finish_reason': None}]})}\n\n"
                       for d in deltas)
        body += f"data: {json.dumps({'choices': [{'delta': {}, 'finish_reason': 'stop'}]})}\n\ndata: [DONE]\n\n"
        return httpx.Response(200, text=body, headers={"content-type": "text/event-stream"})

    model = RemoteModel(profile, transport=httpx.MockTransport(handler))
    reply = answer(Assistant(profile, FakeRetriever([hit(1, "the docs say so")])), model, [QUESTION])
    assert (reply.reasoning, reply.answer, reply.finish_reason) == ("look it up", "see [1]", "stop")
    assert [h.id for h in reply.sources] == ["c1"]
    models, chat = seen
    assert str(chat.url) == "http://backend:11434/v1/chat/completions"
    assert chat.headers["authorization"] == "Bearer sk-test"
    body = json.loads(chat.content)
    assert body["model"] == "llama3" and body["max_tokens"] == 20 and body["temperature"] == 0.1 and body["stream"]
    assert "[1] /docs/a.md:10-15 (Part 1)\nthe docs say so" in body["messages"][0]["content"]
    assert body["messages"][-1] == QUESTION


def test_chat_with_an_assistant_keeps_the_reasoning_apart_in_the_saved_conversation(tmp_path, tiny_model_dir,
                                                                                     monkeypatch, capsys):
    from gptsmith import chat
    from gptsmith.assist.answer import LocalModel
    from gptsmith.config import GenerateConfig

    path = profile_file(tmp_path, f"name: t\nmodel: {tiny_model_dir}\nchain_of_thought: true\n"
                                  "sampling: {max_tokens: 8, temperature: 0}\n")
    saved = tmp_path / "convo.json"
    lines = iter(["why?", f"/save {saved}"])

    def fake_input(prompt):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", fake_input)
    prompts = []

    def scripted(self, messages, sampling, max_new_tokens):
        prompts.append(messages)
        yield from ["Reasoning: because\n", "Answer: so"]

    monkeypatch.setattr(LocalModel, "stream", scripted)
    chat.run_chat(None, GenerateConfig(), device="cpu", assistant=path)
    out = capsys.readouterr().out
    assert "bot> so\n" in out and "because" not in out  # reasoning hidden by default
    assert COT_INSTRUCTION in prompts[0][0]["content"]
    turns = json.loads(saved.read_text())["messages"]
    assert turns == [{"role": "user", "content": "why?"},
                     {"role": "assistant", "content": "so", "reasoning": "because"}]


# ---------------------------------------------------------------------------------------------- end to end

DOCS = {
    "install.md": "# Installing\n\nInstall the package with pip:\n\n    pip install gptsmith\n\nA virtual environment "
                  "keeps it apart.\n",
    "loops.md": "# Loops\n\nA for loop repeats its body for each item of a list.\n\nbreak leaves the loop early.\n",
}


@pytest.fixture(scope="module")
def tiny_index(tmp_path_factory):
    from gptsmith.config import RagConfig
    from gptsmith.rag.index import build_index

    root = tmp_path_factory.mktemp("rag")
    for name, text in DOCS.items():
        write(root / "docs" / name, text)
    build_index([str(root / "docs")], root / "idx", RagConfig())
    return root


def test_ask_answers_with_a_tiny_model_and_cites_the_right_lines(tiny_index, tiny_model_dir, tmp_path, capsys):
    from gptsmith.cli import main

    path = profile_file(tmp_path, f"name: docs\nmodel: {tiny_model_dir}\nrag: {{index: {tiny_index / 'idx'}, "
                                  "top_k: 1, mode: vector}\nsampling: {max_tokens: 4, temperature: 0}\n")
    question = "How do I install the package with pip?"
    assert main(["ask", "--assistant", str(path), "--json", question]) == 0
    result = json.loads(capsys.readouterr().out)
    source, = result["sources"]
    assert source["n"] == 1 and source["source"].endswith("install.md") and source["heading"] == "Installing"
    cited = (tiny_index / "docs" / "install.md").read_text().splitlines()[source["start"] - 1:source["end"]]
    assert "pip install gptsmith" in "\n".join(cited)
    assert source["citation"] == f"{source['source']}:{source['start']}-{source['end']} (Installing)"
    assert result["question"] == question and isinstance(result["answer"], str) and result["reasoning"] is None

    assert main(["ask", "--assistant", str(path), question]) == 0
    out = capsys.readouterr().out
    assert out.endswith(f"\nSources:\n[1] {source['citation']}\n")


def test_chat_with_an_assistant_shows_the_sources_after_each_answer(tiny_index, tiny_model_dir, tmp_path,
                                                                     monkeypatch, capsys):
    from gptsmith.cli import main

    path = profile_file(tmp_path, f"name: docs\nmodel: {tiny_model_dir}\nrag: {{index: {tiny_index / 'idx'}, "
                                  "top_k: 1, mode: bm25}\nsampling: {max_tokens: 3, temperature: 0}\n")
    lines = iter(["what does break do in a loop?", "how do I use pip install?"])

    def fake_input(prompt):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", fake_input)
    assert main(["chat", "--assistant", str(path), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    cited = re.findall(r"\nSources:\n\[1\] (\S+):\d+-\d+ \((\w+)\)\n", out)
    assert [(Path(src).name, heading) for src, heading in cited] == [("loops.md", "Loops"), ("install.md", "Installing")]


def test_the_example_assistant_in_configs_is_valid():
    import yaml

    from gptsmith.assist.profile import AssistantProfile

    root = Path(__file__).resolve().parents[1]
    tree = yaml.safe_load((root / "configs" / "assistant-pydocs.yaml").read_text())
    assert AssistantProfile.model_validate(tree).name == "pydocs"
