"""Command-line verbs that are thin over their stage: every one loads the config (file + dotted overrides, a typo
is an error naming the closest key) and uses it; pretrain and sft never delete checkpoints unless asked."""

import json

import pytest

from gptsmith.cli import main

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


@pytest.fixture
def chats(tmp_path):
    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + "{not json\n" + json.dumps(GOOD) + "\n")
    return path


def test_data_convert_reads_on_error_from_the_config(chats, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    assert main(["data", "convert", str(chats), str(out), "--to", "sharegpt"]) == 2  # default: stop at bad input
    assert "chats.jsonl:2: invalid JSON" in capsys.readouterr().err and not out.exists()
    config = tmp_path / "c.yaml"
    config.write_text("data:\n  on_error: skip\n")
    assert main(["data", "convert", str(chats), str(out), "--to", "sharegpt", "--config", str(config)]) == 0
    assert len(out.read_text().splitlines()) == 2
    out.unlink()
    assert main(["data", "convert", str(chats), str(out), "--to", "sharegpt", "--data.on_error", "skip"]) == 0
    assert len(out.read_text().splitlines()) == 2
    # the named flag wins over the file
    assert main(["data", "convert", str(chats), str(out), "--config", str(config), "--on-error", "error"]) == 2


@pytest.mark.parametrize("verb", [["data", "convert", "IN", "OUT"], ["merge-lora", "--adapter", "A", "--out", "M"],
                                  ["feedback", "export", "--format", "sft", "--out", "OUT"]])
def test_a_typo_in_an_override_is_an_error_naming_the_key(verb, chats, tmp_path, capsys):
    argv = [str(chats) if a == "IN" else str(tmp_path / a) if a in ("OUT", "A", "M") else a for a in verb]
    assert main([*argv, "--data.on_eror", "skip"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'data.on_eror'" in err and "'data.on_error'" in err
    config = tmp_path / "typo.yaml"
    config.write_text("serve:\n  dbb: sqlite:///x.db\n")
    assert main([*argv, "--config", str(config)]) == 2
    assert "'serve.dbb'" in (err := capsys.readouterr().err) and "'serve.db'" in err
    assert not (tmp_path / "OUT").exists() and not (tmp_path / "M").exists()


def test_pretrain_refuses_an_earlier_runs_checkpoints_unless_overwrite(tmp_path, tokenizer_dir, capsys):
    from test_pretrain import make_workdir

    from gptsmith.train.common import checkpoint_dirs

    work = make_workdir(tmp_path / "work", tokenizer_dir)
    out = tmp_path / "model"
    argv = ["pretrain", "--data", str(work), "--out", str(out), "--preset", "test", "--max-steps", "2",
            "--seq-len", "32", "--batch-size", "2", "--pretrain.save_every", "1", "--pretrain.eval_every", "1",
            "--pretrain.eval_batches", "1", "--pretrain.warmup_steps", "0", "--device", "cpu"]
    assert main(argv) == 0
    first = checkpoint_dirs(out / "checkpoints")
    assert [step for step, _ in first] == [1, 2]
    stamp = (first[-1][1] / "state.pt").stat().st_mtime_ns
    capsys.readouterr()
    assert main(argv) == 2
    assert "--resume" in capsys.readouterr().err
    assert checkpoint_dirs(out / "checkpoints") == first and (first[-1][1] / "state.pt").stat().st_mtime_ns == stamp
    assert main([*argv, "--overwrite", "--resume"]) == 2
    assert "--overwrite deletes" in capsys.readouterr().err and checkpoint_dirs(out / "checkpoints") == first
    assert main([*argv, "--overwrite"]) == 0
    assert "deleted the checkpoints" in capsys.readouterr().out
    again = checkpoint_dirs(out / "checkpoints")
    assert [step for step, _ in again] == [1, 2] and (again[-1][1] / "state.pt").stat().st_mtime_ns != stamp
    assert not list(out.glob(".checkpoints.deleting-*"))
