"""The report card: `gptsmith report DIR`, and the report every training command writes at its end.

A real tiny `gptsmith pretrain` (CLI) and `sft` make the model directories; eval/compare results are written by hand
following the result-JSON contract of issue 10."""

import base64
import json
import shutil
from html.parser import HTMLParser

import pytest
import torch

from gptsmith.cli import main
from gptsmith.eval.report import report_after_training, write_report
from gptsmith.files import sha256_file

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
XSS = "<script>alert(1)</script>"


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, tokenizer_dir):
    """A tiny model made by the `gptsmith pretrain` command itself (6 steps), with its WORKDIR."""
    from test_pretrain import make_workdir

    root = tmp_path_factory.mktemp("report")
    work = make_workdir(root / "work", tokenizer_dir)
    out = root / "base"
    torch.set_num_threads(1)
    assert main(["pretrain", "--data", str(work), "--out", str(out), "--preset", "test", "--max-steps", "6",
                 "--seq-len", "64", "--batch-size", "4", "--lr", "3e-3", "--pretrain.eval_every", "3",
                 "--pretrain.eval_batches", "2", "--pretrain.warmup_steps", "2", "--pretrain.save_every", "100",
                 "--device", "cpu"]) == 0
    return out


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory):
    from test_sft import conversations

    path = tmp_path_factory.mktemp("reportdata") / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations(24)))
    return path


class Page(HTMLParser):
    """Every tag with its attributes, and the page's text."""

    def __init__(self, html: str):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []
        self.feed(html)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def check_self_contained(html: str) -> Page:
    """The HTML page opens with nothing but itself: images are data: PNGs, no script, no external URL."""
    page = Page(html)
    names = [t for t, _ in page.tags]
    assert "html" in names and "body" in names and "script" not in names and "link" not in names
    imgs = [a for t, a in page.tags if t == "img"]
    assert imgs
    for a in imgs:
        head, data = a["src"].split(",", 1)
        assert head == "data:image/png;base64"
        assert base64.b64decode(data, validate=True).startswith(PNG_SIGNATURE)
    for _, attrs in page.tags:
        for key in ("src", "href", "action", "srcset"):
            assert not str(attrs.get(key, "")).lower().startswith(("http:", "https:", "//")), attrs
    assert "http://" not in html and "https://" not in html
    return page


def copy_model(src, dst):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("checkpoints", "logs", "report*"))
    return dst


# ---------------------------------------------------------------------------------------------- pretrain

def test_pretrain_leaves_a_self_contained_report_card(pretrained):
    md, html = (pretrained / "report.md").read_text(), (pretrained / "report.html").read_text()
    page = check_self_contained(html)
    assert len([t for t, _ in page.tags if t == "img"]) == 2  # loss and learning rate
    for section in ("# Report card: base", "## Model", "## Data", "## Training", "## Evaluations", "## Samples",
                    "## Lineage"):
        assert section in md
    # the Markdown's plots are PNG files beside it, linked relatively (GitHub renders them)
    for link in ("report/loss.png", "report/lr.png"):
        assert f"]({link})" in md and (pretrained / link).read_bytes().startswith(PNG_SIGNATURE)

    lineage = json.loads((pretrained / "gptsmith_lineage.json").read_text())
    manifest = json.loads(open(lineage["data"]["manifest"]).read())
    for text in (md, html):
        # validation bits-per-byte before and after training, the data and its compression
        assert f"{lineage['metrics']['val_bpb_before']:.4f}" in text and f"{lineage['metrics']['val_bpb']:.4f}" in text
        assert lineage["data"]["manifest_sha256"] in text and "unchanged" in text
        assert f"{manifest['splits']['train']['documents']:,}" in text
        assert f"{manifest['bytes_per_token']:.4f} bytes per token" in text
        assert "131,392" in text  # parameters, from the safetensors headers
    # a base model's samples are continuations of a new document (the trainers write 2)
    assert md.count("**Prompt:**") == 2 and "**User:**" not in md


def test_report_command_writes_where_asked_and_prints_the_paths(pretrained, tmp_path, capsys):
    assert main(["report", str(pretrained), "--samples", "0", "--out", str(tmp_path / "card")]) == 0
    out = capsys.readouterr().out
    assert str(tmp_path / "card" / "report.md") in out and str(tmp_path / "card" / "report.html") in out
    md = (tmp_path / "card" / "report.md").read_text()
    assert "No samples" in md and (tmp_path / "card" / "report" / "loss.png").is_file()
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "no such model directory" in capsys.readouterr().err
    assert main(["report", str(pretrained), "--samples", "-1"]) == 2


# ---------------------------------------------------------------------------------------------- eval results

def eval_result(model_dir, name=XSS):
    target = {"kind": "model", "name": name, "ref": str(model_dir.resolve()), "lineage": {}}
    return {"kind": "eval", "format": 1, "created": "2026-11-24T12:00:00Z", "seed": 0, "gptsmith_version": "0.1.0",
            "target": target, "suites": [
                {"name": "quiz|mc", "kind": "multiple_choice", "version": "sha256:0123456789abcdef", "source": "q.jsonl",
                 "n": 40, "k_shot": 2, "chat_template": False, "primary": "acc_norm",
                 "metrics": {"acc": 0.4875, "acc_norm": 0.5523}, "higher_is_better": {"acc": True, "acc_norm": True},
                 "items": [{"id": "0", "acc": 1.0, "acc_norm": 1.0, "pred": 1, "pred_norm": 1}]},
                {"name": "python-docs", "kind": "text", "version": "builtin:1", "source": "builtin:python-docs",
                 "n": 12, "k_shot": 0, "chat_template": False, "primary": "bpb",
                 "metrics": {"bpb": 1.2346, "ppl": 31.7, "tokens": 5000, "bytes": 11000},
                 "higher_is_better": {"bpb": False, "ppl": False}, "items": []}]}


def compare_result(model_dir):
    """This model is B; A is named with markup. A won 10, B 7, 3 ties: A's win rate 0.575 in [0.45, 0.70]."""
    me = {"kind": "model", "name": "base", "ref": str(model_dir.resolve()), "lineage": {}}
    other = {"kind": "backend", "name": XSS, "ref": "http://127.0.0.1:9/v1", "lineage": {}}
    return {"kind": "compare", "format": 1, "created": "2026-11-24T13:00:00Z", "seed": 0, "a": other, "b": me,
            "judge": {"kind": "model", "name": "judge-model", "ref": "/models/judge"},
            "prompts": {"source": "p.jsonl", "version": "sha256:00"}, "n": 20, "wins_a": 10, "ties": 3, "wins_b": 7,
            "win_rate_a": 0.575, "ci": [0.45, 0.70],
            "length_controlled": {"win_rate_a": 0.6, "ci": [0.4, 0.8], "method": "logistic"}, "items": []}


def test_eval_and_compare_results_appear_in_both_outputs(pretrained, tmp_path):
    model = copy_model(pretrained, tmp_path / "model")
    (model / "eval").mkdir()
    (model / "eval" / "eval-20261124-120000.json").write_text(json.dumps(eval_result(model)))
    (model / "eval" / "compare-20261124-130000.json").write_text(json.dumps(compare_result(model)))
    (model / "eval" / "broken.json").write_text('{"kind": "eval", "suites": [')
    (model / "eval" / "other.json").write_text(json.dumps({"kind": "leaderboard", "rows": []}))
    (model / "eval" / "future.json").write_text(json.dumps({"kind": "eval", "format": 99, "suites": []}))
    (model / "eval" / "odd.json").write_text(json.dumps({"kind": "eval", "format": 1, "suites": {"a": 1}}))
    (model / "eval" / "half.json").write_text(json.dumps({"kind": "compare", "format": 1, "a": [], "wins_a": "x"}))
    (model / "eval" / "shape.json").write_text(json.dumps({"kind": "eval", "format": 1, "target": "t",
                                                           "suites": [{"primary": ["x"], "metrics": [1]}, 7]}))

    md_path, html_path = write_report(model, samples=0)
    md, html = md_path.read_text(), html_path.read_text()
    page = check_self_contained(html)
    assert len([t for t, _ in page.tags if t == "img"]) == 3  # + the latest eval's bar chart
    assert (model / "report" / "eval.png").read_bytes().startswith(PNG_SIGNATURE)
    for text in (md, html):
        assert "0.5523" in text and "0.4875" in text and "1.2346" in text  # suite metrics
        assert "acc_norm" in text.replace("acc\\_norm", "acc_norm") and "lower is better" in text
        # seen from this model (B): 7 wins, 3 ties, 10 losses, win rate 1 - 0.575 with the interval flipped
        assert "42.5% [30.0%, 55.0%]" in text and "40.0% [20.0%, 60.0%]" in text
        assert "judge-model" in text
        for bad in ("broken.json", "other.json", "future.json", "odd.json", "half.json"):
            assert bad in text  # a note names each file that was left out
        assert "not valid JSON" in text
        assert XSS not in text  # markup in a model name is shown, never run
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert XSS in "".join(Page(html).text)  # ... and reads as the name itself
    assert "shape.json" in md  # a result of an unexpected shape still gets its heading, with what it has
    row = next(line for line in md.splitlines() if line.startswith("| quiz"))
    assert row.startswith("| quiz\\|mc |") and row.count(" | ") == 8  # a | in a name keeps the table's columns
    compare_row = next(line for line in md.splitlines() if "judge-model" in line)
    assert "| 7 | 3 | 10 |" in compare_row


# ---------------------------------------------------------------------------------------------- lineage

def test_missing_parent_and_data_are_reported_not_a_crash(tiny_model_dir, tmp_path):
    model = copy_model(tiny_model_dir, tmp_path / "chat")
    gone = tmp_path / "deleted" / XSS
    lineage = {"stage": "sft", "parent_model": str(gone), "mode": "full", "data_format": "messages",
               "data": {"path": str(tmp_path / "gone.jsonl"), "sha256": "ab" * 32},
               "metrics": {"steps": 3, "val_bpb_before": 7.25, "val_bpb": 6.125, "train_conversations": 9}}
    (model / "gptsmith_lineage.json").write_text(json.dumps(lineage))
    (model / "metrics.jsonl").write_text('{"step": 1, "train/loss": 5.0}\nnot json\n{"step": 2, "train/loss": 4.0}\n')

    md_path, html_path = write_report(model, samples=1)
    md, html = md_path.read_text(), html_path.read_text()
    check_self_contained(html)
    lineage_part = md.split("## Lineage", 1)[1]
    first, second = [line for line in lineage_part.splitlines() if line[:3] in ("1. ", "2. ")]
    assert first.endswith("/chat: this model, stage sft") and second.endswith(": missing")
    for text in (md, html):
        assert "no longer exists" in text and "7.2500" in text and "6.1250" in text
        assert "(missing)" in text  # the conversation file is gone too
        assert "1 line(s) are not JSON" in text
        assert "unknown" in text  # no manifest and no text: compression cannot be known
        assert XSS not in text
    assert "**User:**" in md  # the test model has a chat template: a chat sample


def test_unreadable_lineage_is_a_note(tiny_model_dir, tmp_path):
    model = copy_model(tiny_model_dir, tmp_path / "m")
    (model / "gptsmith_lineage.json").write_text("{not json")
    md = write_report(model, samples=0)[0].read_text().replace("\\_", "_")  # Markdown escapes _
    assert "gptsmith_lineage.json" in md and "not valid JSON" in md and "## Model" in md
    (model / "gptsmith_lineage.json").write_text(json.dumps({"stage": 3, "parent_model": 5, "metrics": [1],
                                                             "data": {"manifest": 7, "workdir": ["x"]}}))
    (model / "config.json").write_text("[]")
    md = write_report(model, samples=0)[0].read_text()
    assert "## Lineage" in md and "not a JSON object" in md


def test_a_report_that_fails_is_a_warning_not_a_failed_run(tiny_model_dir, monkeypatch, capsys):
    import gptsmith.eval.report as report

    def broken(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(report, "write_report", broken)
    report_after_training(tiny_model_dir)  # does not raise
    err = capsys.readouterr().err
    assert "warning" in err and "No space left on device" in err and f"gptsmith report {tiny_model_dir}" in err


# ---------------------------------------------------------------------------------------------- sft

def test_sft_writes_a_report_that_follows_its_parent_back_to_the_data(pretrained, chat_data, tmp_path):
    from gptsmith.config import load_config
    from gptsmith.train.sft import sft

    settings = {"sft.max_steps": 3, "sft.lr": 3e-3, "sft.batch_size": 8, "sft.max_seq_len": 64,
                "sft.eval_every": 1000, "sft.save_every": 1000, "sft.val_fraction": 0.2, "sft.log_every": 1,
                "sft.device": "cpu"}
    out = tmp_path / "chat"
    sft(str(pretrained), chat_data, out, load_config(None, settings))
    md, html = (out / "report.md").read_text(), (out / "report.html").read_text()
    check_self_contained(html)
    pre = json.loads((pretrained / "gptsmith_lineage.json").read_text())
    sft_lineage = json.loads((out / "gptsmith_lineage.json").read_text())
    for text in (md, html):
        assert sha256_file(chat_data) in text  # this stage's data ...
        assert pre["data"]["manifest_sha256"] in text  # ... and, through the parent, the pretraining data
        assert f"{sft_lineage['metrics']['val_bpb_before']:.4f}" in text
        assert f"{sft_lineage['metrics']['val_bpb']:.4f}" in text
    assert "2. " + str(pretrained).replace("_", "\\_") + ": found, stage pretrain" in md
    assert md.count("**User:**") == 2  # chat samples through the template
    assert "](report/loss.png)" in md  # sft's curves, from the metrics.jsonl it now writes
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()][:1] == [1]

    adapter = tmp_path / "adapter"
    sft(str(pretrained), chat_data, adapter, load_config(None, {**settings, "sft.lora": True, "sft.lora_r": 4,
                                                                "sft.lora_alpha": 8}))
    md = (adapter / "report.md").read_text()
    assert "LoRA adapter" in md and "adapter parameters" in md and pre["data"]["manifest_sha256"] in md
    assert md.count("**User:**") == 2  # samples of the adapter merged into its base in memory
    check_self_contained((adapter / "report.html").read_text())


# ---------------------------------------------------------------------------------------------- first impressions

def test_the_eval_table_shows_each_intervals_and_the_chance_level(pretrained, tmp_path):
    """The card shows the interval `gptsmith eval` prints for every metric, the suite's chance level, and marks a
    result whose interval contains chance (a 4-choice quiz answered right 7 times in 20: not better than guessing)."""
    from gptsmith.eval.results import metric_ci

    model = copy_model(pretrained, tmp_path / "model")
    result = eval_result(model, name="base")
    quiz = result["suites"][0]
    quiz["items"] = [{"id": str(i), "acc": float(i < 7), "acc_norm": float(i < 7), "pred": 0, "pred_norm": 0}
                     for i in range(20)]
    quiz.update(n=20, chance=0.25, metrics={"acc": 0.35, "acc_norm": 0.35})
    (model / "eval").mkdir()
    (model / "eval" / "eval-20261124-120000.json").write_text(json.dumps(result))
    lo, hi = metric_ci(quiz["items"], "acc_norm", seed=0)
    assert lo < 0.25 < hi
    md_path, html_path = write_report(model, samples=0)
    for text in (md_path.read_text(), html_path.read_text()):
        assert f"[{lo:.4f}, {hi:.4f}]" in text  # acc_norm's interval, as the CLI prints it
        assert "0.2500" in text and "(within the CI: no better than guessing)" in text
        assert "cannot be told from guessing" in text
    row = next(line for line in md_path.read_text().splitlines() if line.startswith("| python-docs"))
    assert "| - | - |" in row  # a text suite stores no items here and has no chance level


def test_the_loss_plot_has_the_validation_points_a_short_sft_run_recorded(tiny_model_dir, tmp_path):
    """A time-boxed sft run can end before its first periodic evaluation: its validation loss before and after
    training (in the lineage) are still drawn, and the plot says what it shows."""
    from gptsmith.eval.report import curve_plots, validation_points

    records = [{"step": 1, "train/loss": 5.0}, {"step": 2, "train/loss": 4.5}, {"step": 3, "train/loss": 4.0}]
    metrics = {"steps": 3, "val_loss_before": 5.5, "val_loss": 4.25}
    assert validation_points(records, metrics) == [(0, 5.5), (3, 4.25)]
    # a point the trainer logged at a step wins over the lineage's figure for it
    assert validation_points(records + [{"step": 3, "val/loss": 4.2}], metrics) == [(0, 5.5), (3, 4.2)]
    plots = curve_plots(records, tmp_path, "sft", metrics)
    assert plots[0]["title"] == "Loss (train and validation)"
    assert curve_plots(records, tmp_path, "sft", {})[0]["title"] == "Loss (train; no validation loss recorded)"


def test_the_card_counts_documents_as_prepare_printed_them(pretrained):
    from gptsmith.data.shards import corpus_counts

    lineage = json.loads((pretrained / "gptsmith_lineage.json").read_text())
    counts = corpus_counts(json.loads(open(lineage["data"]["manifest"]).read()))
    md = (pretrained / "report.md").read_text()
    assert f"Documents kept {counts['kept']:,}" in md
    for split, c in counts["splits"].items():
        assert f"| {split} | {c['documents']:,} | {c['tokens']:,} | {c['bytes']:,} |" in md


def test_eval_of_a_local_model_rewrites_its_card(tiny_model_dir, tmp_path):
    """The card sft wrote said "No eval results"; `gptsmith eval` into MODEL/eval/ re-writes it with them."""
    from gptsmith.eval.run import evaluate
    from gptsmith.eval.targets import open_target

    model = copy_model(tiny_model_dir, tmp_path / "chat")
    write_report(model, samples=0)
    assert "No eval results" in (model / "report.md").read_text()
    quiz = tmp_path / "quiz.jsonl"
    quiz.write_text("".join(json.dumps({"question": f"{i} + 1 =", "choices": [str(i + 1), "x", "y", "z"],
                                        "answer": 0}) + "\n" for i in range(6)))
    target = open_target(model=model, device="cpu")
    try:
        result = evaluate(target, [str(quiz)], out_dir=model / "eval")
    finally:
        target.close()
    assert result["suites"][0]["chance"] == 0.25
    md = (model / "report.md").read_text()
    assert "No eval results" not in md and "quiz" in md and "**User:**" in md  # samples from the loaded engine
    assert "| 0.2500" in md


def test_the_card_says_what_the_run_bought(pretrained):
    lineage = json.loads((pretrained / "gptsmith_lineage.json").read_text())
    assert lineage["metrics"]["steps_done"] == 6 and lineage["metrics"]["verdict"] == "trained 6 steps"
    assert "| what the run bought | trained 6 steps |" in (pretrained / "report.md").read_text()
