"""Pretraining: loss falls, exact resume after kill -9, atomic checkpoints, determinism, HF compatibility,
bits-per-byte, continued pretraining and clear errors. Tiny model (preset `test`), seq 64, batch 8."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import python_doc_texts
from gptsmith.config import ProjectConfig, save_config
from gptsmith.errors import InputError
from gptsmith.train.common import (checkpoint_dirs, find_latest_checkpoint, lr_multiplier, save_checkpoint)
from gptsmith.train.pretrain import evaluate, pretrain, read_manifest

PRETRAIN = dict(seq_len=64, batch_size=8, max_steps=30, eval_every=10, save_every=10, warmup_steps=5,
                eval_batches=4, lr=3e-3)


def make_workdir(root, tokenizer_dir):
    """A WORKDIR exactly as the contract in `gptsmith prepare` describes: bos-prefixed documents packed
    into uint16 shards (train in two shards, to exercise sampling across files) + manifest.json."""
    import shutil
    from gptsmith.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    texts = python_doc_texts()
    splits = {"val": texts[::20], "train": [t for i, t in enumerate(texts) if i % 20]}
    (root / "tokens").mkdir(parents=True)
    shutil.copytree(tokenizer_dir, root / "tokenizer")
    manifest = {"format": "gptsmith.tokens.v1", "dtype": "uint16", "vocab_size": len(tok), "bos_token_id": 0,
                "tokenizer": "tokenizer", "splits": {}}
    for name, docs in splits.items():
        ids = []
        for t in docs:
            ids += [tok.bos_token_id] + tok.encode(t, add_special_tokens=False)
        parts = np.array_split(np.array(ids, dtype=np.uint16), 2 if name == "train" else 1)
        files = []
        for i, part in enumerate(parts):
            files.append(f"{name}_{i:05d}.bin")
            part.tofile(root / "tokens" / files[-1])
        manifest["splits"][name] = {"files": files, "tokens": len(ids), "documents": len(docs),
                                    "bytes": sum(len(t.encode("utf-8")) for t in docs)}
    manifest["bytes_per_token"] = manifest["splits"]["train"]["bytes"] / manifest["splits"]["train"]["tokens"]
    (root / "tokens" / "manifest.json").write_text(json.dumps(manifest))
    return root


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tokenizer_dir):
    return make_workdir(tmp_path_factory.mktemp("work") / "work", tokenizer_dir)


@pytest.fixture(autouse=True)
def one_thread():
    # The test machine is shared; one thread avoids spin-waiting on busy cores and keeps results bitwise stable.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_cfg(**pretrain_overrides) -> ProjectConfig:
    return ProjectConfig.model_validate({"model": {"preset": "test"},
                                         "pretrain": {**PRETRAIN, **pretrain_overrides}})


def subprocess_env():
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    src = os.path.join(os.path.dirname(__file__), "..", "src")
    env["PYTHONPATH"] = os.path.abspath(src) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def weights(out_dir):
    return load_file(str(out_dir / "model.safetensors"))


def assert_same_weights(a, b, tol=1e-5):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=tol, rtol=0), f"{k} differs by {(a[k] - b[k]).abs().max()}"


@pytest.fixture(scope="module")
def reference_run(workdir, tmp_path_factory):
    """One uninterrupted 30-step run, shared by the tests that compare against it."""
    out = tmp_path_factory.mktemp("ref") / "model"
    return out, pretrain(workdir, out, make_cfg())


# ---------------------------------------------------------------------------------------------- training

def test_validation_loss_falls_and_output_is_a_plain_hf_model(workdir, reference_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from gptsmith.model import build_model, llama_config, resolve_shape
    from gptsmith.tokenizer import load_tokenizer

    out, metrics = reference_run
    tok = load_tokenizer(workdir / "tokenizer")
    cfg = make_cfg()
    untrained = build_model(llama_config(resolve_shape(cfg.model), len(tok), 0, tok.eos_token_id, tok.pad_token_id),
                            seed=cfg.pretrain.seed)
    before = evaluate(untrained, workdir, 64, 4, 8, "cpu")
    assert before["loss"] > math.log(len(tok)) - 0.5  # an untrained model is close to uniform
    assert metrics["val_loss"] < before["loss"] - 0.75
    assert metrics["step"] == 30 and metrics["tokens_seen"] == 30 * 8 * 64
    assert metrics["tokens_per_s"] > 0 and metrics["mfu"] > 0

    # loads with transformers alone, and it is the trained model: same validation loss as in training
    model = AutoModelForCausalLM.from_pretrained(out)
    assert AutoTokenizer.from_pretrained(out).get_vocab() == tok.get_vocab()
    assert evaluate(model, workdir, 64, 4, 8, "cpu")["loss"] == pytest.approx(metrics["val_loss"], abs=1e-5)
    # and its logits equal the in-memory model's at the end of training (restored from the last checkpoint)
    state = torch.load(find_latest_checkpoint(out / "checkpoints") / "state.pt", weights_only=False)
    untrained.load_state_dict(state["model"])
    x = torch.randint(0, len(tok), (2, 32))
    with torch.no_grad():
        assert torch.allclose(model(x).logits, untrained(x).logits, atol=1e-5)

    lineage = json.loads((out / "gptsmith_lineage.json").read_text())
    assert lineage["data"]["manifest_sha256"] and lineage["parent_model"] is None
    assert lineage["config"]["pretrain"]["max_steps"] == 30
    for name in ("config.json", "generation_config.json", "tokenizer.json", "gptsmith.yaml", "loss.png"):
        assert (out / name).is_file(), name
    assert any(p.name.startswith("events.out.tfevents") for p in (out / "logs").iterdir())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "val/loss" in r] == [0, 10, 20, 30]  # step 0: the untrained baseline
    assert metrics["val_bpb_before"] == pytest.approx(before["bpb"], abs=1e-5)
    assert any("sample" in r for r in records)
    assert [d.name for _, d in checkpoint_dirs(out / "checkpoints")] == ["step_000020", "step_000030"]  # keep 2


def test_bits_per_byte_follow_from_loss(workdir, reference_run):
    _, metrics = reference_run
    split = read_manifest(workdir)["splits"]["val"]
    assert metrics["val_bpb"] == pytest.approx(metrics["val_loss"] / math.log(2) * split["tokens"] / split["bytes"])


def test_same_seed_same_result_and_other_seed_differs(workdir, reference_run, tmp_path):
    out, metrics = reference_run
    again = pretrain(workdir, tmp_path / "again", make_cfg())
    assert again["val_loss"] == pytest.approx(metrics["val_loss"], abs=1e-6)
    assert_same_weights(weights(out), weights(tmp_path / "again"), tol=1e-6)
    other = pretrain(workdir, tmp_path / "other", make_cfg(seed=7, max_steps=5, eval_every=5, save_every=5))
    assert other["val_loss"] != pytest.approx(metrics["val_loss"], abs=1e-3)


def test_resume_after_kill_9_matches_uninterrupted_run(workdir, reference_run, tmp_path, capfd):
    ref_out, ref = reference_run
    out = tmp_path / "model"
    cfg_file = save_config(make_cfg(), tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "gptsmith.cli", "pretrain", "--config", str(cfg_file),
                             "--data", str(workdir), "--out", str(out)],
                            env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while find_latest_checkpoint(out / "checkpoints") is None:
        assert proc.poll() is None, f"training exited early: {proc.stderr.read().decode()[-2000:]}"
        assert time.time() < deadline, "no checkpoint after 120 s"
        time.sleep(0.02)
    still_running = proc.poll() is None
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert still_running, "the run finished before it could be killed; the test proves nothing"
    killed_at = find_latest_checkpoint(out / "checkpoints")
    assert killed_at.name != "step_000030"
    assert not (out / "model.safetensors").exists()

    # a checkpoint the kill cut short: newer, but without its completion marker, so it must be ignored
    half = out / "checkpoints" / "step_000025"
    half.mkdir()
    (half / "state.pt").write_bytes(b"\x80\x04 torn")

    capfd.readouterr()
    resumed = pretrain(workdir, out, make_cfg(), resume=True)
    assert f"resumed from {killed_at}" in capfd.readouterr().out
    assert resumed["step"] == 30
    assert resumed["val_loss"] == pytest.approx(ref["val_loss"], abs=1e-5)
    assert resumed["train_loss"] == pytest.approx(ref["train_loss"], abs=1e-5)
    assert_same_weights(weights(out), weights(ref_out))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "train/loss" in r]
    assert steps == sorted(set(steps))  # no duplicated history from the killed run


def test_half_written_checkpoint_is_never_the_latest(tmp_path):
    root = tmp_path / "checkpoints"
    save_checkpoint(root, 10, {"step": 10})
    save_checkpoint(root, 20, {"step": 20})
    (root / "step_000030").mkdir()  # renamed but marker missing (hand-made; ours rename only after the marker)
    (root / ".step_000040.tmp-123").mkdir(parents=True)  # still being written when the process died
    assert find_latest_checkpoint(root).name == "step_000020"
    save_checkpoint(root, 50, {"step": 50}, keep=2)
    assert [d.name for _, d in checkpoint_dirs(root)] == ["step_000020", "step_000050"]
    assert not list(root.glob(".step_*"))


def test_ctrl_c_stops_at_a_step_and_saves_checkpoint_and_model(workdir, tmp_path):
    import threading
    out = tmp_path / "model"

    def press_ctrl_c_after_first_checkpoint():
        while find_latest_checkpoint(out / "checkpoints") is None:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=press_ctrl_c_after_first_checkpoint, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        pretrain(workdir, out, make_cfg(max_steps=100000))
    lineage = json.loads((out / "gptsmith_lineage.json").read_text())
    assert lineage["metrics"]["stop_reason"] == "interrupted" and 10 <= lineage["metrics"]["step"] < 100000
    assert find_latest_checkpoint(out / "checkpoints").name == f"step_{lineage['metrics']['step']:06d}"


def test_max_minutes_stops_and_saves(workdir, tmp_path):
    cfg = make_cfg(max_steps=100000, max_minutes=0.05)
    metrics = pretrain(workdir, tmp_path / "m", cfg)
    assert 0 < metrics["step"] < 100000
    assert metrics["stop_reason"].startswith(("max_minutes", "time budget"))
    if metrics["stop_reason"].startswith("time budget"):
        # the budget became a step count, so the LR schedule ran to its end instead of being cut mid-decay
        lrs = [r["train/lr"] for r in map(json.loads, (tmp_path / "m" / "metrics.jsonl").read_text().splitlines())
               if "train/lr" in r]
        assert lrs[-1] == pytest.approx(cfg.pretrain.lr * cfg.pretrain.min_lr_ratio, rel=0.05)
    assert (tmp_path / "m" / "model.safetensors").is_file()
    assert find_latest_checkpoint(tmp_path / "m" / "checkpoints").name == f"step_{metrics['step']:06d}"


def test_trains_on_a_workdir_written_by_prepare(tmp_path):
    from gptsmith.data.pipeline import prepare

    docs = tmp_path / "docs"
    docs.mkdir()
    for i, text in enumerate(python_doc_texts(40)):
        (docs / f"doc{i}.txt").write_text(text, encoding="utf-8")
    cfg = ProjectConfig.model_validate({"tokenizer": {"vocab_size": 400}, "data": {"val_fraction": 0.1},
                                        "model": {"preset": "test"},
                                        "pretrain": {**PRETRAIN, "max_steps": 10, "save_every": 10}})
    prepare([str(docs)], tmp_path / "work", cfg)
    metrics = pretrain(tmp_path / "work", tmp_path / "model", cfg)
    assert metrics["step"] == 10 and math.isfinite(metrics["val_loss"]) and math.isfinite(metrics["val_bpb"])


# ---------------------------------------------------------------------------------------------- continued pretraining

def test_init_from_continues_a_hf_model(workdir, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    parent = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    before = evaluate(parent, workdir, 64, 4, 8, "cpu")["loss"]
    metrics = pretrain(workdir, tmp_path / "cont", make_cfg(max_steps=20, init_from=str(tiny_model_dir)))
    assert metrics["val_loss"] < before - 0.5
    lineage = json.loads((tmp_path / "cont" / "gptsmith_lineage.json").read_text())
    assert lineage["parent_model"] == str(tiny_model_dir)
    AutoModelForCausalLM.from_pretrained(tmp_path / "cont")


def test_init_from_rejects_data_whose_vocab_does_not_fit(workdir, tiny_model_dir, tmp_path):
    import shutil
    bad = tmp_path / "work"
    shutil.copytree(workdir, bad)
    manifest = json.loads((bad / "tokens/manifest.json").read_text())
    manifest["vocab_size"] = 100000
    (bad / "tokens/manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match="vocab_size 100000 does not fit"):
        pretrain(bad, tmp_path / "out", make_cfg(init_from=str(tiny_model_dir)))


# ---------------------------------------------------------------------------------------------- errors and schedules

def test_clear_errors_for_bad_config_and_missing_data(workdir, tmp_path):
    with pytest.raises(InputError, match=r"seq_len \(512\) is longer than the model's context \(256\)"):
        pretrain(workdir, tmp_path / "a", make_cfg(seq_len=512))
    with pytest.raises(InputError, match="gptsmith prepare"):
        pretrain(tmp_path / "nope", tmp_path / "b", make_cfg())
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="manifest.json: not found"):
        pretrain(tmp_path / "empty", tmp_path / "c", make_cfg())


def test_cli_reports_errors_without_traceback(workdir, tmp_path, capsys):
    from gptsmith.cli import main

    rc = main(["pretrain", "--data", str(workdir), "--out", str(tmp_path / "o"), "--preset", "test",
               "--pretrain.seq_len", "1024"])
    assert rc == 2
    assert "seq_len (1024)" in capsys.readouterr().err


def test_refuses_to_overwrite_a_run_without_resume(workdir, reference_run):
    out, _ = reference_run
    with pytest.raises(InputError, match="--resume"):
        pretrain(workdir, out, make_cfg())


def test_lr_schedules():
    kw = dict(max_steps=100, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_multiplier(0, **kw) == pytest.approx(0.1)
    assert lr_multiplier(9, **kw) == pytest.approx(1.0)
    assert lr_multiplier(55, **kw) == pytest.approx(0.55)  # cosine midpoint between 1 and 0.1
    assert lr_multiplier(100, **kw) == pytest.approx(0.1)
    wsd = dict(kw, schedule="wsd", decay_fraction=0.2)
    assert lr_multiplier(79, **wsd) == 1.0
    assert lr_multiplier(90, **wsd) == pytest.approx(0.55)
    assert lr_multiplier(100, **wsd) == pytest.approx(0.1)
    assert lr_multiplier(99, **dict(kw, schedule="constant")) == 1.0
