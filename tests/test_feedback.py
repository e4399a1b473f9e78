"""`gptsmith feedback export`: ratings, corrections and regenerations in the store -> TRL training data."""

import json

import pytest
from trl.data_utils import is_conversational

from gptsmith.cli import main
from gptsmith.serve.feedback import export
from gptsmith.serve.store import Store


@pytest.fixture
def db(tmp_path):
    url = f"sqlite:///{tmp_path / 'fb.db'}"
    s = Store(url)
    # conversation 1: an answer with a correction, then two regenerations of the same turn
    c1 = s.create_conversation(system_prompt="Be nice.")["id"]
    q1 = s.add_message(c1, "user", "Q1")["id"]
    a1 = s.add_message(c1, "assistant", "bad answer", q1)["id"]
    a2 = s.add_message(c1, "assistant", "great answer", q1, regeneration_of_id=a1)["id"]
    a3 = s.add_message(c1, "assistant", "meh answer", q1, regeneration_of_id=a1)["id"]
    s.set_feedback(a1, rating=-1, correction="good answer")
    s.set_feedback(a2, rating=1)
    s.set_feedback(a3, rating=-1, comment="vague")
    # conversation 2: two turns, thumbs up on the first answer only; a comment alone exports nothing
    c2 = s.create_conversation()["id"]
    u1 = s.add_message(c2, "user", "hi")["id"]
    b1 = s.add_message(c2, "assistant", "hello", u1)["id"]
    u2 = s.add_message(c2, "user", "bye", b1)["id"]
    b2 = s.add_message(c2, "assistant", "ok", u2)["id"]
    s.set_feedback(b1, rating=1)
    s.set_feedback(b2, comment="fine I guess")
    # a thumb that was taken back (rating 0) counts as no rating
    s.set_feedback(b2, rating=1)
    s.set_feedback(b2, rating=0)
    s.close()
    return url


def read(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_sft_export(db, tmp_path):
    out = tmp_path / "sft.jsonl"
    assert export(db, "sft", out) == 3
    rows = read(out)
    sys_q1 = [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "Q1"}]
    assert rows == [
        {"messages": sys_q1 + [{"role": "assistant", "content": "good answer"}]},  # the correction, not "bad"
        {"messages": sys_q1 + [{"role": "assistant", "content": "great answer"}]},  # thumbs up
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
    ]
    assert all(is_conversational(r) for r in rows)


def test_dpo_export(db, tmp_path):
    out = tmp_path / "dpo.jsonl"
    assert export(db, "dpo", out) == 3
    rows = read(out)
    prompt = [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "Q1"}]
    pairs = {(r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in rows}
    assert pairs == {("good answer", "bad answer"),  # correction over the original
                     ("great answer", "bad answer"), ("great answer", "meh answer")}  # up over down, same turn
    assert all(r["prompt"] == prompt and r["chosen"][0]["role"] == "assistant" for r in rows)
    assert all(is_conversational(r) for r in rows)


def test_kto_export(db, tmp_path):
    out = tmp_path / "kto.jsonl"
    assert export(db, "kto", out) == 4
    rows = read(out)
    labels = {r["completion"][0]["content"]: r["label"] for r in rows}
    assert labels == {"bad answer": False, "great answer": True, "meh answer": False, "hello": True}
    hello = next(r for r in rows if r["completion"][0]["content"] == "hello")
    assert hello["prompt"] == [{"role": "user", "content": "hi"}]
    assert all(is_conversational(r) for r in rows)


def test_cli_export_and_errors(db, tmp_path, capsys):
    out = tmp_path / "cli.jsonl"
    assert main(["feedback", "export", "--db", db, "--format", "kto", "--out", str(out)]) == 0
    assert "wrote 4 kto examples" in capsys.readouterr().out
    assert len(read(out)) == 4
    missing = f"sqlite:///{tmp_path / 'nope.db'}"
    assert main(["feedback", "export", "--db", missing, "--format", "sft", "--out", str(out)]) == 2
    assert "not found" in capsys.readouterr().err
    assert len(read(out)) == 4  # a failed export leaves the previous file alone
    assert not (tmp_path / "nope.db").exists()


def test_cli_export_reads_the_configured_store(db, tmp_path, monkeypatch, capsys):
    """The store is serve.db, the key `gptsmith serve` writes to: from --config, a dotted override, or --db."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # no gptsmith.db here: the default store does not exist
    out = tmp_path / "kto.jsonl"
    config = tmp_path / "c.yaml"
    config.write_text(f"serve:\n  db: {db}\n")
    assert main(["feedback", "export", "--config", str(config), "--format", "kto", "--out", str(out)]) == 0
    assert "wrote 4 kto examples" in capsys.readouterr().out and len(read(out)) == 4
    out.unlink()
    assert main(["feedback", "export", "--serve.db", db, "--format", "sft", "--out", str(out)]) == 0
    assert len(read(out)) == 3
    missing = tmp_path / "c2.yaml"
    missing.write_text(f"serve:\n  db: sqlite:///{tmp_path / 'nope.db'}\n")
    assert main(["feedback", "export", "--config", str(missing), "--db", db, "--format", "kto", "--out", str(out)]) == 0
    assert len(read(out)) == 4  # --db wins over the file
    assert main(["feedback", "export", "--config", str(missing), "--format", "kto", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "nope.db" in err and "serve.db" in err and "--db" in err
    assert main(["feedback", "export", "--format", "kto", "--out", str(out)]) == 2
    assert "gptsmith.db" in capsys.readouterr().err and not (elsewhere / "gptsmith.db").exists()
