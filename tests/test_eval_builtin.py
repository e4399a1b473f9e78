"""Built-in suites: python-docs (multiple choice from CPython's embedded docs), python-docs-text (the held-out
topics) and chat-sanity (a generation suite shipped in the package)."""

import hashlib
import json
import re

import pytest

from gptsmith.eval import builtin
from gptsmith.eval.builtin import python_docs


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Suites are generated into $XDG_CACHE_HOME/gptsmith/eval: a fresh one per test, never the user's."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def read_items(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_python_docs_is_deterministic(tmp_path, monkeypatch):
    first = builtin.resolve("python-docs")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "other-cache"))
    second = builtin.resolve("python-docs")
    assert first != second and first.name == second.name
    assert first.read_bytes() == second.read_bytes()


def test_python_docs_items_are_sound():
    items = read_items(builtin.resolve("python-docs"))
    assert 200 <= len(items) <= 600
    assert len({item["id"] for item in items}) == len(items)
    titles = {key: title for key, title, _ in python_docs.sections(python_docs.topics())}
    for item in items:
        assert set(item) == {"id", "question", "choices", "answer"}
        choices, answer = item["choices"], item["answer"]
        assert len(choices) == python_docs.N_CHOICES and len(set(choices)) == len(choices)
        assert isinstance(answer, int) and 0 <= answer < len(choices)
        title = titles[item["id"].rsplit("-", 1)[0]]
        assert choices[answer] == title  # the right answer is always among the choices
        for word in python_docs.keywords(title):  # the question never names its own section
            assert not re.search(rf"\b{re.escape(word)}\b", item["question"], re.I), (item["id"], word)
    # the right answer is spread over the positions, not always first
    positions = [item["answer"] for item in items]
    assert min(positions.count(i) for i in range(python_docs.N_CHOICES)) > len(items) / 8


def test_masking_hides_a_keyword_and_its_forms_only():
    assert python_docs.keywords('The "for" statement') == ["for"]
    assert python_docs.mask("for x in y: the format is for loops", ["for"]) == "____ x in y: the format is ____ loops"
    assert python_docs.mask("A lambda; two Lambdas.", python_docs.keywords("Lambdas")) == "A ____; two ____."


def content_hash(path):  # a suite's version in a result file is the hash of its file
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_python_docs_changes_file_and_version_when_the_topics_change(monkeypatch):
    original = builtin.resolve("python-docs")
    docs = python_docs.topics()
    changed = {**docs, "assert": docs["assert"].replace("These equivalences assume", "These equivalences presume")}
    monkeypatch.setattr(python_docs, "topics", lambda: changed)
    new = builtin.resolve("python-docs")
    assert new != original  # a cached file of other topics is never reused
    assert content_hash(new) != content_hash(original)
    monkeypatch.setattr(python_docs, "topics", lambda: docs)
    assert builtin.resolve("python-docs") == original


def test_python_docs_generator_version_is_part_of_the_cache_key(monkeypatch):
    original = builtin.resolve("python-docs")
    monkeypatch.setattr(python_docs, "GENERATOR_VERSION", python_docs.GENERATOR_VERSION + 1)
    assert builtin.resolve("python-docs") != original


def test_python_docs_text_is_what_prepare_holds_out(tmp_path):
    """Run gptsmith's own cleaning and split on the topics: its validation texts are exactly the suite's files,
    so a model trained by the quickstart is evaluated on text it did not train on."""
    from gptsmith.config import ProjectConfig
    from gptsmith.data.pipeline import clean, iter_texts

    docs = python_docs.topics()
    inputs = tmp_path / "topics"
    inputs.mkdir()
    for key, text in docs.items():
        (inputs / f"{key}.txt").write_text(text, encoding="utf-8")
    clean([str(inputs)], tmp_path / "work", ProjectConfig())
    val = sorted(iter_texts(tmp_path / "work" / "clean" / "val.jsonl"))
    train = set(iter_texts(tmp_path / "work" / "clean" / "train.jsonl"))

    folder = builtin.resolve("python-docs-text")
    held = sorted(f.read_text(encoding="utf-8").rstrip("\n") for f in folder.glob("*.txt"))
    assert held and held == val
    assert not train & set(held)


def test_chat_sanity_validates_as_a_generation_suite():
    path = builtin.resolve("chat-sanity")
    assert path.is_file() and path.parent.name == "builtin"
    items = read_items(path)
    assert 20 <= len(items) <= 30 and len({i["id"] for i in items}) == len(items)
    allowed = {"id", "prompt", "answer", "match", "system", "max_tokens", "must_stop"}
    for item in items:
        assert set(item) <= allowed and isinstance(item["prompt"], str) and item["prompt"].strip()
        assert "answer" in item or item.get("must_stop") is True
        if "answer" in item:
            assert item["match"] in ("exact", "contains", "regex", "numeric")
        if item.get("match") == "regex":
            re.compile(item["answer"])
    kinds = {i["id"].split("-")[0] for i in items}
    assert kinds == {"stop", "topic", "caps", "arrr"}
    try:
        from gptsmith.eval.suites import load_suite
    except ImportError:
        return  # evalcore's validator not merged yet: the checks above stand in for it
    assert load_suite(path).kind == "generation"


@pytest.mark.parametrize("prefix, good, bad", [
    ("caps", "PYTHON IS A PROGRAMMING LANGUAGE.", "Python is a programming language."),
    ("arrr", "A variable holds a value. Arrr!", "A variable holds a value."),
    ("topic-1", "Lists hold items in order.", "I like turtles."),
])
def test_chat_sanity_patterns_tell_a_kept_instruction_from_a_broken_one(prefix, good, bad):
    item = next(i for i in read_items(builtin.resolve("chat-sanity")) if i["id"].startswith(prefix))
    assert re.search(item["answer"], good) and not re.search(item["answer"], bad)


def test_unknown_names_are_not_built_in():
    assert builtin.resolve("nope") is None and builtin.resolve("quiz.jsonl") is None
    assert set(builtin.BUILTIN) == {"python-docs", "python-docs-qa", "python-docs-text", "chat-sanity"}
    assert builtin.resolve("python-docs-qa").is_file()
    assert all(name in builtin.describe() for name in builtin.BUILTIN)
