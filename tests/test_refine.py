"""`gptsmith refine`: feedback stored since the live version -> a candidate trained from it -> evaluated against
live -> promoted only when better; a running `serve --registry` then answers with the new version."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from serve_helpers import running, wait_for

from gptsmith.cli import main
from gptsmith.config import load_config
from gptsmith.errors import InputError
from gptsmith.registry import Registry

ANSWER = "The answer is blue."
QUESTIONS = ["What colour is the sky?", "Which colour is the sea?", "Name a cool colour.",
             "What is my favourite colour?", "What colour are jeans?", "Tell me a colour.", "Pick a colour, any.",
             "What colour is a bluebird?"]
FAST = {"max_steps": 40, "lr": 3e-3, "save_every": 5, "log_every": 5, "warmup_ratio": 0.0}


def refine_config(tmp_path, **overrides):
    return load_config(None, {"refine.train": FAST, "refine.suites": [], "refine.min_sft_examples": 2,
                              "refine.min_dpo_pairs": 2, "refine.min_kto_examples": 2, **overrides})


@pytest.fixture
def reg(tmp_path, tiny_model_dir):
    reg = Registry.open(tmp_path / "reg", create=True, name="chat")
    reg.add(tiny_model_dir)
    reg.promote("v1")
    return reg


def corrections_db(tmp_path, n: int = len(QUESTIONS), name: str = "fb.db") -> str:
    """A store with `n` answers, each thumbed down and corrected to ANSWER (one fixed answer to many questions)."""
    from gptsmith.serve.store import Store

    url = f"sqlite:///{tmp_path / name}"
    s = Store(url)
    for q in QUESTIONS[:n]:
        c = s.create_conversation()["id"]
        u = s.add_message(c, "user", q)["id"]
        a = s.add_message(c, "assistant", "grape " * 5, u)["id"]
        s.set_feedback(a, rating=-1, correction=ANSWER)
    s.close()
    return url


def logp_of_answer(model_dir, questions=QUESTIONS) -> float:
    """Sum over QUESTIONS of log p(ANSWER | question) under the chat template."""
    from gptsmith.refine import open_scorer
    from gptsmith.train.preference import completion_logps, prompt_and_answer_ids

    model, tok = open_scorer(Path(model_dir), "cpu")
    rows = []
    for q in questions:
        p, a = prompt_and_answer_ids(tok, [{"role": "user", "content": q}], [{"role": "assistant", "content": ANSWER}])
        rows.append({"prompt_ids": p, "answer_ids": a})
    return sum(completion_logps(model, rows, "answer_ids"))


def statuses(reg) -> dict:
    return {v["version"]: v["status"] for v in reg.versions()}


# ---------------------------------------------------------------------------------------------- the whole loop
def sse_done(client: httpx.Client, conv_id: str, content: str) -> dict:
    with client.stream("POST", f"/api/conversations/{conv_id}/messages",
                       json={"content": content, "settings": {"max_tokens": 6, "temperature": 0}}) as r:
        assert r.status_code == 200, r.read()
        events = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:")]
    done = [e for e in events if e.get("type") == "done" or "message" in e and e.get("type") != "start"]
    return (done or events)[-1]


def answer_id(client: httpx.Client, conv_id: str) -> int:
    msgs = client.get(f"/api/conversations/{conv_id}").json()["messages"]
    return [m for m in msgs if m["role"] == "assistant"][-1]["id"]


def test_refine_end_to_end_through_the_api_and_a_running_server(reg, tmp_path):
    """Feedback through the real HTTP API (corrections, thumbs, an arena vote) -> refine -> v2 learned the
    corrections, is promoted, and the server that is running answers with v2 without a restart."""
    from gptsmith.serve.app import create_app

    db = f"sqlite:///{tmp_path / 'serve.db'}"
    bot = tmp_path / "bot.yaml"
    bot.write_text(f"name: helper\nmodel: {reg.version_dir('v1')}\n")
    cfg = load_config(None, {"serve.db": db, "serve.registry": str(reg.root), "serve.registry_seconds": 0.05,
                             "serve.store_flush_seconds": 0.05, "serve.rate_limit_per_minute": 0})
    app = create_app(cfg, assistants=[str(bot)])
    body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    with running(app) as url, httpx.Client(base_url=url, timeout=120) as client:
        for q in QUESTIONS:
            conv = client.post("/api/conversations", json={}).json()["id"]
            sse_done(client, conv, q)
            r = client.post(f"/api/messages/{answer_id(client, conv)}/feedback",
                            json={"rating": -1, "correction": ANSWER})
            assert r.status_code == 200, r.text
        conv = client.post("/api/conversations", json={}).json()["id"]
        sse_done(client, conv, "Say something.")
        assert client.post(f"/api/messages/{answer_id(client, conv)}/feedback", json={"rating": 1}).status_code == 200
        with client.stream("POST", "/api/arena/battles", json={"content": "Which colour?", "max_tokens": 6}) as r:
            assert r.status_code == 200
            battle = [json.loads(x[5:]) for x in r.iter_lines() if x.startswith("data:")][0]["battle_id"]
        assert client.post(f"/api/arena/battles/{battle}/vote", json={"winner": "a"}).status_code == 200
        assert client.post("/v1/chat/completions", json=body).json()["system_fingerprint"] == "v1"

        before = logp_of_answer(reg.version_dir("v1"))
        # its own process, as a user runs it (two threads of one process must not load models at once)
        done = subprocess.run([sys.executable, "-m", "gptsmith.cli", "refine", "--registry", str(reg.root), "--db",
                               db, "--method", "sft", "--refine.train", json.dumps(FAST), "--refine.suites", "[]"],
                              capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr
        assert "v2 is live (was v1" in done.stdout
        assert reg.live() == "v2" and statuses(reg) == {"v1": "retired", "v2": "live"}
        wait_for(lambda: client.get("/api/info").json()["version"] == "v2", timeout=120,
                 what="the running server on v2")
        assert client.post("/v1/chat/completions", json=body).json()["system_fingerprint"] == "v2"
        assert logp_of_answer(reg.version_dir("v2")) > before + 5  # it learned the corrections

    run = next((reg.root / "refine").iterdir())
    record = json.loads((run / "refine.json").read_text())
    assert record["verdict"] == "promote" and record["promoted"] and record["candidate"] == "v2"
    assert record["counts"]["sft"]["held_out"] >= 1 and record["counts"]["dpo"]["held_out"] >= 1
    names = {c["name"]: c for c in record["checks"]}
    assert names["held-out correction bits-per-byte falls"]["passed"]
    assert list((reg.version_dir("v2") / "eval").glob("eval-*.json"))  # the checks, as an eval result
    show = reg.show("v2")
    assert show["parent"] == "v1" and show["method"] == "sft" and show["data"][0]["sha256"]

    # rollback restores the previous live version
    assert main(["models", "rollback", "--registry", str(reg.root)]) == 0
    assert reg.live() == "v1" and statuses(reg)["v2"] == "retired"


# ---------------------------------------------------------------------------------------------- refusing
def reversed_dpo_candidate(tmp_path, tiny_model_dir) -> Path:
    """A model DPO-trained on reversed preferences: the junk answers over the corrections."""
    from gptsmith.train.dpo import dpo

    pairs = tmp_path / "reversed.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": q}],
                                         "chosen": [{"role": "assistant", "content": "grape " * 5}],
                                         "rejected": [{"role": "assistant", "content": ANSWER}]}) + "\n"
                             for q in QUESTIONS))
    cfg = load_config(None, {f"dpo.{k}": v for k, v in {**FAST, "max_steps": 30, "lr": 1e-3, "beta": 0.05,
                                                         "save_every": 1000, "val_fraction": 0.0}.items()})
    out = tmp_path / "bad"
    dpo(str(tiny_model_dir), pairs, out, cfg)
    return out


def test_a_bad_candidate_is_refused_with_the_failing_check_named(reg, tmp_path, tiny_model_dir, capsys):
    db = corrections_db(tmp_path)
    bad = reversed_dpo_candidate(tmp_path, tiny_model_dir)
    capsys.readouterr()
    from gptsmith.refine import Options, refine

    notes = tmp_path / "notes.txt"  # a regression suite (text: bits-per-byte) through eval.run.evaluate
    notes.write_text("A list holds items in order. A dict maps keys to values. " * 20)
    cfg = refine_config(tmp_path, **{"refine.suites": [str(notes)]})
    record = refine(reg.root, db, cfg, Options(candidate=bad))
    assert any(c["name"] == "suite notes bpb not worse" for c in record["checks"])
    assert record["verdict"] == "keep live" and not record["promoted"]
    assert {"held-out preference accuracy does not drop", "held-out correction bits-per-byte does not rise"} <= \
        set(record["failed"])
    assert reg.live() == "v1" and statuses(reg) == {"v1": "live", "v2": "rejected"}
    out = capsys.readouterr().out
    assert "failed check: held-out preference accuracy does not drop: live 1.0000, candidate 0.0000, needs >= " \
        "1.0000" in out and "keeping v1 live" in out
    bpb = next(c for c in record["checks"] if c["name"] == "held-out correction bits-per-byte does not rise")
    assert bpb["candidate"] > bpb["live"] * 1.01
    # rerun: the same run, every step already done, nothing added
    again = refine(reg.root, db, cfg, Options(candidate=bad))
    assert again["run"] == record["run"] and len(reg.versions()) == 2
    assert "resuming run" in capsys.readouterr().out
    assert reg.read()["versions"]["v2"]["rejected_by"] == record["run"]
    # pruned, then the same run again: the verdict stands and says the candidate is gone
    assert main(["models", "prune", "--registry", str(reg.root)]) == 0
    assert refine(reg.root, db, cfg, Options(candidate=bad))["verdict"] == "keep live"
    assert "rejected v2 before; it has been pruned since" in capsys.readouterr().out and statuses(reg) == {"v1": "live"}


# ---------------------------------------------------------------------------------------------- trust
def sft_run(reg, db, tmp_path, steps: int, promote: bool = True, opts=None, **more) -> dict:
    from gptsmith.refine import refine

    cfg = refine_config(tmp_path, **{"refine.method": "sft", "refine.train": {**FAST, "max_steps": steps},
                                     "refine.promote": promote, **more})
    return refine(reg.root, db, cfg, opts)


def add_corrections(db: str, questions: list[str]) -> None:
    from gptsmith.serve.store import Store

    s = Store(db)
    for q in questions:
        c = s.create_conversation()["id"]
        a = s.add_message(c, "assistant", "grape " * 5, s.add_message(c, "user", q)["id"])["id"]
        s.set_feedback(a, rating=-1, correction=ANSWER)
    s.close()


def test_a_rerun_with_other_settings_is_another_run_and_trains_anew(reg, tmp_path, capsys):
    from gptsmith.refine import Options

    db = corrections_db(tmp_path)
    first = sft_run(reg, db, tmp_path, 2, promote=False)
    capsys.readouterr()
    second = sft_run(reg, db, tmp_path, 4, promote=False)  # --refine.train '{"max_steps": 4}'
    assert second["run"] != first["run"] and "resuming" not in capsys.readouterr().out
    assert (first["candidate"], second["candidate"]) == ("v2", "v3")
    assert second["candidate_weights_sha256"] != first["candidate_weights_sha256"]
    # a tolerance is a setting too; the same settings are the same run, which resumes and trains nothing
    other = sft_run(reg, db, tmp_path, 4, promote=False, opts=Options(dry_run=True), **{"refine.bpb_tolerance": 0.5})
    assert other["run"] not in (first["run"], second["run"])
    again = sft_run(reg, db, tmp_path, 4, promote=False)
    assert again["run"] == second["run"] and "resuming run" in capsys.readouterr().out
    assert len(reg.versions()) == 3


def test_a_moved_run_folder_or_swapped_weights_never_reach_the_registry_as_this_runs(reg, tmp_path):
    import shutil

    db = corrections_db(tmp_path)
    first = sft_run(reg, db, tmp_path, 2, promote=False)
    (reg.root / "refine" / first["run"]).rename(tmp_path / "moved-aside")
    second = sft_run(reg, db, tmp_path, 6, promote=False)
    assert second["candidate"] == "v3"  # not v2, the older weights once trained in a folder of that name
    from gptsmith.files import weights_sha256
    assert reg.read()["versions"]["v3"]["weights_sha256"] == second["candidate_weights_sha256"] \
        == weights_sha256(reg.version_dir("v3")) != weights_sha256(reg.version_dir("v2"))
    # a crash right after add, then v3's weights replaced by other ones: the rerun refuses to evaluate them
    state_file = reg.root / "refine" / second["run"] / "state.json"
    state = json.loads(state_file.read_text())
    state["steps"] = {k: v for k, v in state["steps"].items() if k in ("collect", "train", "add")}
    state_file.write_text(json.dumps(state))
    for w in reg.version_dir("v2").glob("*.safetensors"):
        shutil.copy(w, reg.version_dir("v3") / w.name)
    with pytest.raises(InputError, match="not the ones this run trained .* refusing to evaluate it"):
        sft_run(reg, db, tmp_path, 6)
    assert reg.live() == "v1"


def test_an_unfinished_run_resumes_over_its_own_window_only_with_the_same_settings(reg, tmp_path, monkeypatch,
                                                                                  capsys):
    import gptsmith.refine as refine_module
    from gptsmith.refine import Options

    db = corrections_db(tmp_path)

    def crash(run, cfg, opts):
        raise KeyboardInterrupt  # killed while training: only collect is recorded

    monkeypatch.setattr(refine_module, "train_candidate", crash)
    with pytest.raises(KeyboardInterrupt):
        sft_run(reg, db, tmp_path, 2)
    (killed,) = (reg.root / "refine").iterdir()
    add_corrections(db, ["Late question one?", "Late question two?"])  # arrives after the snapshot
    capsys.readouterr()
    same = sft_run(reg, db, tmp_path, 2, opts=Options(dry_run=True))
    assert same["run"] == killed.name and same["counts"]["sft"]["train"] + same["counts"]["sft"]["held_out"] == 8
    other = sft_run(reg, db, tmp_path, 2, opts=Options(dry_run=True), **{"refine.method": "kto"})
    assert other["run"] != killed.name and other["counts"]["kto"]["train"] + other["counts"]["kto"]["held_out"] == 10
    assert f"unfinished run {killed.name} had other settings" in capsys.readouterr().out


def test_a_rerun_after_rollback_says_what_registry_json_says(reg, tmp_path, capsys):
    db = corrections_db(tmp_path)
    first = sft_run(reg, db, tmp_path, FAST["max_steps"])
    assert first["promoted"] and reg.live() == "v2"
    assert main(["models", "rollback", "--registry", str(reg.root)]) == 0
    capsys.readouterr()
    again = sft_run(reg, db, tmp_path, FAST["max_steps"])
    out = capsys.readouterr().out
    assert again["run"] == first["run"] and "v2 is live" not in out
    assert "registry.json now says v2 is retired and v1 is live" in out and reg.live() == "v1"


def test_feedback_given_during_a_run_is_used_by_the_next_run(reg, tmp_path, tiny_model_dir, monkeypatch):
    """The cut-off is a snapshot taken at collect: what arrives while the run trains waits, and is not lost."""
    import gptsmith.refine as refine_module
    from gptsmith.refine import Options

    db = corrections_db(tmp_path)
    train = refine_module.train_candidate

    def feedback_meanwhile(run, cfg, opts):
        add_corrections(db, ["Late question one?", "Late question two?", "Late question three?", "Late four?"])
        return train(run, cfg, opts)

    monkeypatch.setattr(refine_module, "train_candidate", feedback_meanwhile)
    first = sft_run(reg, db, tmp_path, 2, promote=False, opts=Options(candidate=tiny_model_dir))
    assert sum(c["train"] + c["held_out"] for c in first["counts"].values()) == 3 * len(QUESTIONS)  # sft, dpo, kto
    monkeypatch.setattr(refine_module, "train_candidate", train)
    reg.promote(first["candidate"])
    nxt = sft_run(reg, db, tmp_path, 2, opts=Options(dry_run=True))
    assert {f: c["train"] + c["held_out"] for f, c in nxt["counts"].items()} == {"sft": 4, "dpo": 4, "kto": 4}
    assert nxt["since"] > first["until"]
    # --candidate: refine did not train it, and its lineage says so
    show = reg.show(first["candidate"])
    assert (show["method"], show["parent"], show["data"]) == ("external", None, [])
    assert show["consumed_through"] == first["until"] and show["refine_run"] == first["run"]


# ---------------------------------------------------------------------------------------------- crash safety
HOLD_AFTER_FIRST_CHECKPOINT = """
import sys, time
from transformers import Trainer
save = Trainer._save_checkpoint
def save_then_hold(self, *args, **kwargs):  # the test, not the clock, decides when the kill comes: mid-training
    save(self, *args, **kwargs)
    time.sleep(3600)
Trainer._save_checkpoint = save_then_hold
from gptsmith.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_kill_9_during_refine_then_rerun_reaches_the_same_end_state(reg, tmp_path):
    db = corrections_db(tmp_path)
    args = ["refine", "--registry", str(reg.root), "--db", db, "--method", "sft", "--refine.train", json.dumps(FAST),
            "--refine.suites", "[]"]
    proc = subprocess.Popen([sys.executable, "-c", HOLD_AFTER_FIRST_CHECKPOINT, *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: list((reg.root / "refine").glob("*/candidate/checkpoints/checkpoint-*/trainer_state.json"))
                 or proc.poll() is not None, timeout=600, what="the first checkpoint")
        assert proc.poll() is None, "refine ended before its first checkpoint"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert reg.live() == "v1" and len(reg.versions()) == 1  # a killed run changed nothing in the registry
    runs = list((reg.root / "refine").iterdir())
    assert len(runs) == 1
    assert list(json.loads((runs[0] / "state.json").read_text())["steps"]) == ["collect"]

    # the rerun is the same run: it resumes training from the checkpoint and finishes (deciding only: --no-promote)
    done = subprocess.run([sys.executable, "-m", "gptsmith.cli", *args, "--no-promote"], capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    assert "resuming run" in done.stdout and "resuming from checkpoint-5" in done.stdout
    assert "--no-promote: make it live with `gptsmith models promote v2" in done.stdout
    assert statuses(reg) == {"v1": "live", "v2": "candidate"}
    record = json.loads((runs[0] / "refine.json").read_text())
    assert record["verdict"] == "promote" and not record["promoted"]
    # once more without --no-promote: every step is done, only the promotion is left
    done = subprocess.run([sys.executable, "-m", "gptsmith.cli", *args], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    assert "v2 is live (was v1" in done.stdout and "resuming from checkpoint" not in done.stdout
    assert [p.name for p in (reg.root / "refine").iterdir()] == [runs[0].name]
    assert statuses(reg) == {"v1": "retired", "v2": "live"}
    assert [e["event"] for e in reg.read()["history"]] == ["add", "promote", "add", "promote"]
    assert not (reg.version_dir("v2") / "checkpoints").exists()


# ---------------------------------------------------------------------------------------------- plans and errors
def test_dry_run_trains_nothing_and_writes_no_version(reg, tmp_path, capsys):
    db = corrections_db(tmp_path)
    assert main(["refine", "--registry", str(reg.root), "--db", db, "--dry-run", "--refine.min_dpo_pairs", "2",
                 "--refine.suites", "[]"]) == 0
    out = capsys.readouterr().out
    assert "dpo: " in out and "held out (dpo)" in out and "method: dpo" in out and "parent v1" in out
    assert "held-out preference accuracy" in out and "bits-per-byte" in out
    # a correction is held out from sft and dpo alike: the checks never score what the candidate trained on
    held = {f: {line.split(": ", 1)[1] for line in out.splitlines() if line.startswith(f"  held out ({f})")}
            for f in ("sft", "dpo")}
    assert held["sft"] and held["sft"] == held["dpo"]
    assert len(reg.versions()) == 1 and not (reg.root / "refine").exists()


def test_builtin_suite_missing_is_a_note_not_an_error(reg, tmp_path, capsys):
    db = corrections_db(tmp_path)
    assert main(["refine", "--registry", str(reg.root), "--db", db, "--dry-run", "--refine.min_dpo_pairs", "2",
                 "--suite", "chat-sanity"]) == 0
    out = capsys.readouterr().out
    from gptsmith.eval.run import _builtin
    if _builtin("chat-sanity") is None:
        assert "note: the regression suite 'chat-sanity' is not available" in out
    else:
        assert "check: regression suite chat-sanity" in out


def test_not_enough_feedback_and_no_live_version(reg, tmp_path, tiny_model_dir, capsys):
    db = corrections_db(tmp_path, n=2)
    assert main(["refine", "--registry", str(reg.root), "--db", db]) == 2
    err = capsys.readouterr().err
    assert "not enough feedback" in err and "dpo: 1 pairs to train on, need 4" in err
    assert "sft: 1 corrections/good answers to train on, need 4" in err
    assert main(["refine", "--registry", str(reg.root), "--db", db, "--method", "kto"]) == 2
    assert "kto: 1 thumbs to train on, need 8" in capsys.readouterr().err
    assert len(reg.versions()) == 1 and not (reg.root / "refine").exists()

    # feedback older than the live version does not count
    old_db = corrections_db(tmp_path, name="old.db")
    time.sleep(1.1)  # registry times have one-second resolution: v2 is made in a later second than the feedback
    reg.promote(reg.add(tiny_model_dir))
    assert main(["refine", "--registry", str(reg.root), "--db", old_db, "--refine.min_sft_examples", "1"]) == 2
    assert "sft: 0 corrections" in capsys.readouterr().err

    empty = Registry.open(tmp_path / "empty", create=True)
    empty.add(tiny_model_dir)
    assert main(["refine", "--registry", str(empty.root), "--db", db]) == 2
    err = capsys.readouterr().err
    assert "has no live version to refine" in err and "models promote" in err
    assert main(["refine", "--registry", str(tmp_path / "nowhere"), "--db", db]) == 2
    assert main(["refine", "--registry", str(reg.root), "--db", f"sqlite:///{tmp_path / 'missing.db'}"]) == 2
    assert "feedback store not found" in capsys.readouterr().err
    assert main(["refine", "--registry", str(reg.root), "--db", db, "--tolerance", "bogus=1"]) == 2
    assert "NAME=VALUE" in capsys.readouterr().err


def test_split_is_deterministic_and_holds_out_at_least_one():
    from gptsmith.refine import split

    exs = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": ANSWER}]} for q in QUESTIONS]
    train, held = split(exs, "sft", 0.2)
    assert held and train and len(train) + len(held) == len(exs)
    assert split(list(reversed(exs)), "sft", 0.2)[1] == [e for e in reversed(exs) if e in held]
    assert split(exs[:2], "sft", 0.2)[1] and split(exs[:2], "sft", 0.2)[0]
    assert split(exs[:1], "sft", 0.2) == (exs[:1], [])


def test_decision_rules():
    """Better somewhere it should be, worse nowhere beyond the tolerance; a suite's significant drop fails."""
    from gptsmith.config import RefineConfig
    from gptsmith.refine import check, decide, suite_checks

    up = check("acc rises", "improve", 0.5, 0.75, "> 0.5", True)
    flat = check("acc rises", "improve", 0.5, 0.5, "> 0.5", False)
    guard = check("bpb does not rise", "guard", 2.0, 2.1, "<= 2.02", False)
    assert decide([up])["verdict"] == "promote"
    assert decide([flat]) == {"verdict": "keep live", "failed": ["acc rises"]}
    assert decide([up, guard]) == {"verdict": "keep live", "failed": ["bpb does not rise"]}
    assert decide([])["verdict"] == "keep live"  # nothing held out: nothing shows an improvement

    def result(diff, significant):
        row = {"suite": "quiz", "metric": "acc", "base": 0.8, "new": 0.8 + diff, "diff": diff,
               "significant": significant, "better": diff > 0 if significant else None}
        return {"suites": [{"name": "quiz", "primary": "acc"}], "baseline": {"comparison": [row]}}

    r = RefineConfig()
    assert suite_checks(result(-0.1, True), r)[0]["passed"] is False
    assert suite_checks(result(-0.01, True), r)[0]["passed"] is True   # within the 0.02 tolerance
    assert suite_checks(result(-0.1, False), r)[0]["passed"] is True   # not significant
    assert suite_checks(result(+0.1, True), r)[0]["passed"] is True


def test_judge_check_needs_the_win_rate_interval_to_reach_the_threshold(monkeypatch, tmp_path):
    from types import SimpleNamespace

    import gptsmith.eval.compare
    from gptsmith.config import RefineConfig
    from gptsmith.refine import Options
    from gptsmith.refine.checks import judge_check

    seen = {}

    def fake_compare(a, b, prompts, judge, out_dir, device):
        seen.update(a=a, b=b, judge=judge)
        return {"win_rate_a": 0.3, "ci": [0.1, 0.45]}

    monkeypatch.setattr(gptsmith.eval.compare, "compare", fake_compare)
    run = SimpleNamespace(registry=SimpleNamespace(version_dir=lambda v: tmp_path / v), live="v1", folder=tmp_path)
    opts = Options(judge="http://judge", prompts=tmp_path / "p.txt")
    [c] = judge_check(run, tmp_path / "v2", opts, RefineConfig())
    assert not c["passed"] and c["candidate"] == 0.3 and "0.45" in c["threshold"]
    assert seen == {"a": str(tmp_path / "v2"), "b": str(tmp_path / "v1"), "judge": "http://judge"}
    assert judge_check(run, tmp_path / "v2", opts, RefineConfig(judge_min_upper=0.4))[0]["passed"]
    assert judge_check(run, tmp_path / "v2", Options(), RefineConfig()) == []
