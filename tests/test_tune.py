"""gptsmith.eval.tune: the quickstart keeps the setting that scores better on the dev set, says what each setting
scored against the one it challenged, and names what the budget left untried."""

import json

import pytest

from gptsmith.eval import tune
from gptsmith.eval.builtin import python_docs_qa as qa
from gptsmith.eval.builtin.python_docs import topics


def _fake_scoring(monkeypatch, scores: dict[str, list[float]], tokens: dict[str, float]):
    """Each profile scores the per-item values listed under its system prompt (a real model's scores are noisy;
    the selection rule is what is under test)."""
    seen = []

    def score(target, suite, seed=0):
        values = scores[target.profile["system_prompt"]]
        seen.append(target.profile["system_prompt"])
        items = [{"id": str(i), "acc_norm": v} for i, v in enumerate(values)]
        return {"suites": [{"primary": "acc_norm", "metrics": {"acc_norm": sum(values) / len(values)},
                            "items": items}]}, items

    class FakeTarget:
        def __init__(self, profile):
            self.profile = profile

    monkeypatch.setattr(tune, "score", score)
    monkeypatch.setattr(tune, "assistant_target", lambda engine, profile, *a: FakeTarget(profile))
    monkeypatch.setattr(tune, "mean_prompt_tokens", lambda target, items: tokens[target.profile["system_prompt"]])
    return seen


@pytest.fixture
def dev_suite(tmp_path):
    path = tmp_path / "dev.jsonl"
    path.write_text("".join(json.dumps({"question": f"q{i}", "choices": ["a", "b"], "answer": 0}) + "\n"
                            for i in range(8)))
    return path


def test_the_better_setting_is_kept_and_both_are_reported(monkeypatch, dev_suite):
    scores = {"start": [1, 0, 0, 1, 0, 0, 1, 0], "better": [1, 1, 1, 1, 0, 1, 1, 1], "worse": [0] * 8}
    _fake_scoring(monkeypatch, scores, {"start": 100, "better": 120, "worse": 50})
    axes = [tune.Axis("prompt", [("worse", {"system_prompt": "worse"}), ("better", {"system_prompt": "better"})])]
    result = tune.tune_assistant(None, {"system_prompt": "start", "rag": {"top_k": 4}}, axes, dev_suite)
    assert result.profile == {"system_prompt": "better", "rag": {"top_k": 4}}
    assert [(t.label, t.kept) for t in result.trials] == [("start", True), ("worse", False), ("better", True)]
    start, worse, better = result.trials
    assert (start.score, better.score, worse.score) == (3 / 8, 7 / 8, 0.0)
    assert better.lo <= better.score <= better.hi and better.n == 8
    diff, lo, hi = better.diff  # paired against the start, the best when it was tried
    assert diff == pytest.approx(0.5) and lo > 0
    assert worse.diff[0] == pytest.approx(-3 / 8) and worse.diff[2] < 0
    assert result.best is better and result.not_tried == []


def test_a_tie_keeps_the_cheaper_prompt_and_patches_nest(monkeypatch, dev_suite):
    same = [1, 0, 1, 0, 1, 0, 1, 0]
    _fake_scoring(monkeypatch, {"start": same, "long": same, "short": same}, {"start": 300, "long": 400, "short": 200})
    axes = [tune.Axis("prompt", [("long", {"system_prompt": "long"}), ("short", {"system_prompt": "short",
                                                                                 "rag": {"top_k": 2}})])]
    result = tune.tune_assistant(None, {"system_prompt": "start", "rag": {"top_k": 4, "index": "i"}}, axes,
                                 dev_suite)
    assert [t.kept for t in result.trials] == [True, False, True]
    assert result.profile == {"system_prompt": "short", "rag": {"top_k": 2, "index": "i"}}


def test_what_the_budget_leaves_untried_is_named(monkeypatch, dev_suite):
    seen = _fake_scoring(monkeypatch, {"start": [1] * 8, "a": [1] * 8, "b": [1] * 8}, {"start": 1, "a": 1, "b": 1})
    axes = [tune.Axis("x", [("a", {"system_prompt": "a"})]), tune.Axis("y", [("b", {"system_prompt": "b"})])]
    calls = []

    def may_start(last):
        calls.append(last.label)
        return len(calls) < 2  # room for one more trial after the start, not two

    result = tune.tune_assistant(None, {"system_prompt": "start"}, axes, dev_suite, may_start=may_start)
    assert seen == ["start", "a"] and result.not_tried == ["y: b"]


def test_patched_merges_nested_settings_and_removes_with_none():
    base = {"rag": {"index": "i", "top_k": 4}, "few_shot": {"k": 2}}
    assert tune.patched(base, {"rag": {"top_k": 2}, "few_shot": None}) == {"rag": {"index": "i", "top_k": 2}}
    assert base == {"rag": {"index": "i", "top_k": 4}, "few_shot": {"k": 2}}  # the original is not changed


# ---------------------------------------------------------------------------------------------- python-docs-qa

def test_python_docs_qa_items_are_answerable_from_their_source_lines():
    docs = topics()
    items = qa.build_items(docs)
    assert len(items) >= 80
    assert items == qa.build_items(docs)  # deterministic
    for it in items:
        assert len(it["choices"]) == 4 and len(set(it["choices"])) == 4
        right = it["choices"][it["answer"]]
        first, last = it["meta"]["lines"]
        passage = " ".join(line.strip() for line in docs[it["meta"]["source"][:-4]].split("\n")[first - 1:last])
        if "statement" in it["question"]:  # the statement's name is replaced by "It" in its answer
            assert right[3:-1] in passage
        else:
            assert right in passage, it["id"]
    by_id = {it["id"]: it for it in items}
    assert by_id["string-methods/str.casefold()"]["question"].count("str.casefold()") == 1
    assert "dict.clear()" in {it["id"].split("/")[1] for it in items}  # a method inside a class block


def test_python_docs_qa_splits_are_fixed_by_id_and_disjoint():
    items = qa.build_items(topics())
    splits = {name: {it["id"] for it in items if it["meta"]["split"] == name} for name in ("examples", "dev", "test")}
    assert all(splits.values()) and not (splits["dev"] & splits["test"]) and not (splits["examples"] & splits["test"])
    assert all(qa.split_of(it["id"]) == it["meta"]["split"] for it in items)
    fewer = qa.build_items({k: v for k, v in topics().items() if k == "string-methods"})
    assert all(it["meta"]["split"] == qa.split_of(it["id"]) for it in fewer)  # the split does not depend on others


def test_first_sentence_does_not_stop_at_abbreviations():
    assert qa.first_sentence(["Return a copy, e.g. a list.", "More."]) == "Return a copy, e.g. a list."
    assert qa.first_sentence(["No full stop here"]) == "No full stop here"
