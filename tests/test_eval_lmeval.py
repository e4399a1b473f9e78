"""lm-evaluation-harness tasks through gptsmith: a task YAML from a local folder over a local JSONL runs offline on
the tiny model and comes back as a suite of the result file, with per-item values."""

import json
import sys

import pytest

from gptsmith.errors import InputError
from gptsmith.eval import lmeval
from gptsmith.eval.targets import Target, _open_backend, open_target

ITEMS = [
    {"question": "Which keyword defines a function?", "choices": ["def", "func", "fn", "lambda x"], "answer": 0},
    {"question": "Which statement leaves a loop early?", "choices": ["continue", "break", "pass"], "answer": 1},
    {"question": "Which type is immutable?", "choices": ["list", "dict", "tuple", "set"], "answer": 2},
    {"question": "What does len('abc') return?", "choices": ["2", "4", "1", "3"], "answer": 3},
    {"question": "Which keyword handles exceptions?", "choices": ["except", "catch"], "answer": 0},
]

MC_YAML = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

GEN_YAML = """task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{choices[answer]}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 4
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 2.0
"""


GROUP_YAML = """group: tiny_group
task: [tiny_mc, tiny_mc_b]
aggregate_metric_list:
  - metric: acc
    weight_by_size: true
"""


@pytest.fixture(scope="module")
def lm_eval_installed():
    return pytest.importorskip("lm_eval", reason="lm-eval is not installed (the gptsmith[eval] extra)")


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory, lm_eval_installed):
    folder = tmp_path_factory.mktemp("lmeval_tasks")
    data = folder / "items.jsonl"
    data.write_text("".join(json.dumps(i) + "\n" for i in ITEMS), encoding="utf-8")
    (folder / "tiny_mc.yaml").write_text(MC_YAML.format(data=data), encoding="utf-8")
    (folder / "tiny_gen.yaml").write_text(GEN_YAML.format(data=data), encoding="utf-8")
    (folder / "tiny_mc_b.yaml").write_text(MC_YAML.format(data=data).replace("task: tiny_mc", "task: tiny_mc_b"),
                                           encoding="utf-8")
    (folder / "tiny_group.yaml").write_text(GROUP_YAML, encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def target(tiny_model_dir):
    t = open_target(model=tiny_model_dir, device="cpu")
    yield t
    t.close()


def test_local_multiple_choice_task_runs_offline(task_dir, target, monkeypatch):
    from lm_eval.models import huggingface

    given = []
    real_init = huggingface.HFLM.__init__

    def spy(self, pretrained, *args, **kwargs):
        given.append(pretrained)
        real_init(self, pretrained, *args, **kwargs)

    monkeypatch.setattr(huggingface.HFLM, "__init__", spy)
    [suite] = lmeval.run_tasks(target, ["tiny_mc"], include_path=task_dir)

    assert given == [target.engine.model]  # HFLM wraps the model already loaded: no second copy
    assert suite["name"] == "tiny_mc" and suite["kind"] == "lm-eval"
    assert suite["source"] == f"lm-eval:tiny_mc@{task_dir.resolve()}"
    assert suite["version"].startswith("v1.0+sha256:") and len(suite["version"]) == len("v1.0+sha256:") + 16
    assert suite["n"] == len(ITEMS) and suite["k_shot"] == 0 and suite["chat_template"] is True
    assert suite["primary"] == "acc_norm"
    assert set(suite["metrics"]) == {"acc", "acc_norm"}
    assert suite["higher_is_better"] == {"acc": True, "acc_norm": True}
    assert [item["id"] for item in suite["items"]] == [str(i) for i in range(len(ITEMS))]
    for item, doc in zip(suite["items"], ITEMS):
        assert item["acc"] == float(item["pred"] == doc["answer"])
        assert item["acc_norm"] == float(item["pred_norm"] == doc["answer"])
        assert 0 <= item["pred"] < len(doc["choices"])
    for metric in ("acc", "acc_norm"):  # the suite value is the mean of the per-item values it reports
        assert suite["metrics"][metric] == pytest.approx(sum(i[metric] for i in suite["items"]) / len(ITEMS))
    json.dumps(suite)  # goes into the result file as it is


def test_limit_and_a_rerun_give_the_same_items(task_dir, target):
    [a] = lmeval.run_tasks(target, ["tiny_mc"], include_path=task_dir, limit=3)
    [b] = lmeval.run_tasks(target, ["tiny_mc"], include_path=task_dir, limit=3)
    assert a["n"] == 3 and a["items"] == b["items"] and a["version"] == b["version"]


def test_a_group_is_one_suite_over_all_its_tasks_documents(task_dir, target):
    [suite] = lmeval.run_tasks(target, ["tiny_group"], include_path=task_dir)
    n = len(ITEMS)
    assert suite["n"] == 2 * n
    assert [i["id"] for i in suite["items"]] == [f"{t}/{d}" for t in ("tiny_mc", "tiny_mc_b") for d in range(n)]
    assert suite["primary"] == "acc" and suite["metrics"]["acc"] == pytest.approx(
        sum(i["acc"] for i in suite["items"]) / (2 * n))


def test_local_generation_task(task_dir, target):
    [suite] = lmeval.run_tasks(target, ["tiny_gen"], include_path=task_dir)
    assert suite["primary"] == "exact_match" and suite["higher_is_better"] == {"exact_match": True}
    assert suite["version"].startswith("v2.0+sha256:")
    assert len(suite["items"]) == len(ITEMS)
    for item in suite["items"]:
        assert item["exact_match"] in (0.0, 1.0) and isinstance(item["output"], str)


def test_assistant_system_prompt_goes_to_lm_eval_and_the_limits_are_said(task_dir, tiny_model_dir, tmp_path,
                                                                        monkeypatch, capsys):
    import lm_eval.evaluator

    bot = tmp_path / "bot.yaml"
    bot.write_text(f"name: bot\nmodel: {tiny_model_dir}\nsystem_prompt: Answer in one word.\n", encoding="utf-8")
    prompts = []
    real_evaluate = lm_eval.evaluator.evaluate

    def spy(*args, **kwargs):
        out = real_evaluate(*args, **kwargs)
        prompts.extend(i.arguments[0] for t in kwargs["task_dict"]["tasks"].values() for i in t.instances)
        return out

    monkeypatch.setattr(lm_eval.evaluator, "evaluate", spy)
    assistant = open_target(assistant=bot, device="cpu")
    [suite] = lmeval.run_tasks(assistant, ["tiny_gen"], include_path=task_dir, limit=2)
    assert suite["n"] == 2 and suite["chat_template"] is True
    assert len(prompts) == 2 and all("Answer in one word." in p and "Question:" in p for p in prompts)
    assert "sources (RAG) and few-shot examples are not applied" in capsys.readouterr().out


def test_backend_runs_generation_tasks_and_refuses_loglikelihood_ones(task_dir, tiny_model_dir, tmp_path):
    from serve_helpers import running

    from gptsmith.config import load_config
    from gptsmith.serve.app import create_app

    app = create_app(load_config(None, {"serve.db": f"sqlite:///{tmp_path / 'b.db'}",
                                        "serve.rate_limit_per_minute": 0}), tiny_model_dir)
    with running(app) as url:
        backend = open_target(backend=url)
        with pytest.raises(InputError, match="log-likelihood.*--model DIR"):
            lmeval.run_tasks(backend, ["tiny_mc"], include_path=task_dir)
        [suite] = lmeval.run_tasks(backend, ["tiny_gen"], include_path=task_dir, limit=2)
        backend.close()
    assert suite["n"] == 2 and suite["chat_template"] is True
    assert all(isinstance(item["output"], str) for item in suite["items"])


def test_unknown_task_is_a_clear_error(task_dir, target):
    with pytest.raises(InputError, match=r"no task 'tiny_mx'.*did you mean tiny_mc"):
        lmeval.run_tasks(target, ["tiny_mx"], include_path=task_dir)


def test_a_task_whose_data_file_is_missing_is_a_clear_error(tmp_path, target, lm_eval_installed):
    (tmp_path / "broken.yaml").write_text(MC_YAML.format(data=tmp_path / "gone.jsonl").replace(
        "task: tiny_mc", "task: broken"), encoding="utf-8")
    with pytest.raises(InputError, match=r"lm-eval task broken .*could not be loaded.*gone\.jsonl"):
        lmeval.run_tasks(target, ["broken"], include_path=tmp_path)


def test_missing_task_folder_is_a_clear_error(tmp_path, target, lm_eval_installed):
    with pytest.raises(InputError, match="no such folder of lm-eval task YAML"):
        lmeval.run_tasks(target, ["tiny_mc"], include_path=tmp_path / "nope")


def test_missing_extra_names_the_install_command(monkeypatch, tmp_path):
    for name in [m for m in sys.modules if m == "lm_eval" or m.startswith("lm_eval.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now fails as if it were not installed
    no_engine = Target("backend", "m", "http://127.0.0.1:9/v1", remote=_open_backend("http://127.0.0.1:9", "m"))
    with pytest.raises(InputError) as e:
        lmeval.run_tasks(no_engine, ["hellaswag"])
    assert str(e.value) == "lm-eval tasks need the eval extra: pip install 'gptsmith[eval]'"
