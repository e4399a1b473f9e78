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
from gptsmith.train.pretrain import evaluate, pretrain

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


def test_bits_per_byte_are_the_scored_windows_loss_over_their_own_bytes(tmp_path, tokenizer_dir):
    """Windows of very uneven bytes/token: bpb must be the scored windows' nats over those windows' bytes,
    not their loss scaled by the whole split's bytes/token."""
    import shutil
    from gptsmith.model import build_model, llama_config, resolve_shape
    from gptsmith.tokenizer import load_tokenizer
    from gptsmith.train.pretrain import lm_loss

    tok = load_tokenizer(tokenizer_dir)
    seq_len = 16
    dense = tok.encode(" return the value of the function" * 8, add_special_tokens=False)[:seq_len - 1]
    sparse = tok.encode("{[()]}~^`$%#@!" * 8, add_special_tokens=False)[:seq_len - 1]
    # every document is separator + 15 tokens, so window k's targets are document k's tokens + the next separator
    docs = [dense, sparse, dense, dense] + [sparse] * 12
    ids = [t for d in docs for t in [tok.bos_token_id] + d] + [tok.bos_token_id]
    (tmp_path / "w" / "tokens").mkdir(parents=True)
    shutil.copytree(tokenizer_dir, tmp_path / "w" / "tokenizer")
    np.array(ids, dtype=np.uint16).tofile(tmp_path / "w" / "tokens" / "val_00000.bin")
    doc_bytes = [len(tok.decode(d, clean_up_tokenization_spaces=False).encode("utf-8")) for d in docs]  # ASCII: exact
    (tmp_path / "w" / "tokens" / "manifest.json").write_text(json.dumps({
        "format": "gptsmith.tokens.v1", "dtype": "uint16", "vocab_size": len(tok), "bos_token_id": tok.bos_token_id,
        "tokenizer": "tokenizer", "splits": {"val": {"files": ["val_00000.bin"], "tokens": len(ids),
                                                     "documents": len(docs), "bytes": sum(doc_bytes)}}}))
    model = build_model(llama_config(resolve_shape(make_cfg().model), len(tok), 0, tok.eos_token_id,
                                     tok.pad_token_id), seed=0)

    res = evaluate(model, tmp_path / "w", seq_len, batches=2, batch_size=2)  # the first 4 windows
    windows = torch.tensor([ids[k * seq_len:(k + 1) * seq_len + 1] for k in range(4)], dtype=torch.long)
    with torch.no_grad():
        nats = lm_loss(model, windows).item() * 4 * seq_len
    assert res["loss"] == pytest.approx(nats / (4 * seq_len), rel=1e-5)
    assert res["bpb"] == pytest.approx(nats / math.log(2) / sum(doc_bytes[:4]), rel=1e-5)


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


# ---------------------------------------------------------------------------------------------- resume semantics

def copy_run(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return dst


def lrs_by_step(out_dir):
    return {r["step"]: r["train/lr"] for r in map(json.loads, (out_dir / "metrics.jsonl").read_text().splitlines())
            if "train/lr" in r}


def test_resume_with_a_larger_max_steps_trains_to_it_and_says_so(workdir, reference_run, tmp_path, capfd):
    ref_out, _ = reference_run
    out = copy_run(ref_out, tmp_path / "model")
    capfd.readouterr()
    metrics = pretrain(workdir, out, make_cfg(max_steps=40), resume=True)
    printed = capfd.readouterr().out
    assert metrics["step"] == 40 and metrics["tokens_seen"] == 40 * 8 * 64
    assert "max_steps 40 (the run was planned for 30): training to step 40" in printed
    assert json.loads((out / "gptsmith_lineage.json").read_text())["metrics"]["step"] == 40
    assert find_latest_checkpoint(out / "checkpoints").name == "step_000040"
    # the finished run's LR had decayed to its end; the extension continues there instead of jumping back up
    lrs = lrs_by_step(out)
    end = PRETRAIN["lr"] * 0.1
    assert lrs[30] == pytest.approx(end) and all(lrs[s] == pytest.approx(end) for s in lrs if s > 30)


def test_resume_with_more_steps_before_the_decay_equals_a_run_planned_that_long(workdir, tmp_path):
    short = dict(max_steps=4, warmup_steps=5, eval_every=4, save_every=4)
    pretrain(workdir, tmp_path / "a", make_cfg(**short))
    extended = pretrain(workdir, tmp_path / "a", make_cfg(**dict(short, max_steps=8)), resume=True)
    planned = pretrain(workdir, tmp_path / "b", make_cfg(**dict(short, max_steps=8)))
    assert extended["step"] == planned["step"] == 8
    assert extended["val_loss"] == pytest.approx(planned["val_loss"], abs=1e-6)
    assert_same_weights(weights(tmp_path / "a"), weights(tmp_path / "b"), tol=1e-6)


def test_resume_refuses_fewer_steps_than_done(workdir, reference_run, tmp_path):
    out = copy_run(reference_run[0], tmp_path / "model")
    with pytest.raises(InputError, match="already at step 30, so --max-steps 20 cannot be honoured"):
        pretrain(workdir, out, make_cfg(max_steps=20), resume=True)


def test_resume_without_the_original_flags_takes_the_runs_saved_config(workdir, reference_run, tmp_path, capsys):
    from gptsmith.cli import main

    ref_out, ref = reference_run
    out = copy_run(ref_out, tmp_path / "model")
    # the README's resume line: no --preset, no schedule flags (the defaults are another model and schedule)
    rc = main(["pretrain", "--data", str(workdir), "--out", str(out), "--resume"])
    assert rc == 0, capsys.readouterr().err
    lineage = json.loads((out / "gptsmith_lineage.json").read_text())
    assert lineage["config"]["model"]["preset"] == "test" and lineage["config"]["pretrain"]["seq_len"] == 64
    assert lineage["metrics"]["step"] == 30
    assert lineage["metrics"]["val_loss"] == pytest.approx(ref["val_loss"], abs=1e-6)


def test_resume_refuses_settings_that_change_the_model_or_the_training(workdir, reference_run, tmp_path):
    out = copy_run(reference_run[0], tmp_path / "model")
    tiny = ProjectConfig.model_validate({"model": {"preset": "tiny"}, "pretrain": PRETRAIN})
    with pytest.raises(InputError, match=r"model preset 'tiny' \(the run's: 'test'\).*another --out"):
        pretrain(workdir, out, tiny, resume=True)
    with pytest.raises(InputError, match=r"pretrain.lr 0.01 \(the run's: 0.003\)"):
        pretrain(workdir, out, make_cfg(lr=0.01), resume=True)
    # the same shape spelled differently is no conflict
    same = ProjectConfig.model_validate({"model": {"preset": "test", "n_layer": 2}, "pretrain": PRETRAIN})
    assert pretrain(workdir, out, same, resume=True)["step"] == 30


def test_a_time_budget_run_stopped_and_resumed_equals_the_uninterrupted_one(workdir, tmp_path, monkeypatch):
    import gptsmith.train.pretrain as loop

    # the calibration's timing decides the step count; fix its result so the test, not the clock, decides
    monkeypatch.setattr(loop, "plan_time_budget", lambda **kw: 16)
    cfg = make_cfg(max_steps=200, max_minutes=30, eval_every=5, save_every=5)
    whole = pretrain(workdir, tmp_path / "whole", cfg)
    assert whole["step"] == 16 and whole["stop_reason"] == "time budget (30 min)"

    real_checkpoint = loop.checkpoint

    def checkpoint_then_die(run):
        real_checkpoint(run)
        if run.step == 10:
            raise SystemExit("killed right after the step-10 checkpoint")

    monkeypatch.setattr(loop, "checkpoint", checkpoint_then_die)
    with pytest.raises(SystemExit):
        pretrain(workdir, tmp_path / "split", cfg)
    assert not (tmp_path / "split" / "model.safetensors").exists()

    def no_recalibration(run, sigint):
        raise AssertionError("a resumed run must continue the saved plan, not calibrate again")

    # the resumed run keeps re-planning from its measured speed; the fixed plan makes that re-plan the same
    monkeypatch.setattr(loop, "checkpoint", real_checkpoint)
    monkeypatch.setattr(loop, "calibrate_time_budget", no_recalibration)
    resumed = pretrain(workdir, tmp_path / "split", cfg, resume=True)
    assert resumed["step"] == 16
    assert resumed["val_loss"] == pytest.approx(whole["val_loss"], abs=1e-6)
    assert_same_weights(weights(tmp_path / "split"), weights(tmp_path / "whole"), tol=1e-6)
    assert lrs_by_step(tmp_path / "split") == pytest.approx(lrs_by_step(tmp_path / "whole"))

    # a new --minutes on resume is a new budget for the whole run: planned again (after 1 + 5 timed steps)
    monkeypatch.undo()
    monkeypatch.setattr(loop, "plan_time_budget", lambda **kw: 26)
    longer = pretrain(workdir, tmp_path / "whole", make_cfg(max_steps=200, max_minutes=60, eval_every=5,
                                                            save_every=5), resume=True)
    assert longer["step"] == 26 and longer["stop_reason"] == "time budget (60 min)"


def test_a_budget_whose_first_steps_were_slow_is_replanned_from_the_measured_speed(workdir, tmp_path, monkeypatch):
    """The filer's busy machine: the first steps are slow (another job), the rest fast. The step count planned
    from the first steps must grow as the speed is measured again, the LR must still end its decay on the last
    step, and the result must say what the run bought."""
    import gptsmith.train.pretrain as loop
    from gptsmith.train.budget import training_verdict

    now = [0.0]  # a clock the test moves: 3 s per step for the first 6 steps, then 0.5 s; nothing else takes time
    real_step = loop.train_step

    def timed_step(run):
        loss = real_step(run)
        now[0] += 3.0 if run.step <= 6 else 0.5
        return loss

    monkeypatch.setattr(loop, "clock", lambda: now[0])
    monkeypatch.setattr(loop, "train_step", timed_step)
    cfg = make_cfg(max_steps=250, max_minutes=1.0, eval_every=20, save_every=1000, warmup_steps=50)
    m = pretrain(workdir, tmp_path / "m", cfg)
    # calibrated on steps 2-3 at 3 s/step (timing stops once 5% of the budget is spent): 3 + 0.92 * (60 - 9) / 3
    # = 18 steps; the fast steps after step 6 raise the plan well beyond
    assert m["steps_planned_at_start"] == 18
    assert m["steps_done"] == m["step"] == m["steps_planned"] > 2 * m["steps_planned_at_start"]
    assert m["stop_reason"] == "time budget (1 min)"
    assert now[0] <= 60.0  # the plan never outgrew the budget
    assert m["steps_at_best_speed"] == int(0.92 * 60 / 0.5)
    lrs = lrs_by_step(tmp_path / "m")
    assert lrs[max(lrs)] == pytest.approx(cfg.pretrain.lr * cfg.pretrain.min_lr_ratio, rel=1e-3)
    # the 18-step first plan could not hold a 50-step warmup: it became a quarter of the plan, so at step 10 the
    # LR is on its way down from the peak (not at 11/50 of it, still warming up), and it never jumps up
    assert lrs[10] > 0.5 * cfg.pretrain.lr
    steps = sorted(lrs)
    assert all(lrs[a] >= lrs[b] - 1e-12 for a, b in zip(steps, steps[1:]))
    verdict = training_verdict(m, expected_steps=2 * m["steps_done"], stage="pretrain")
    assert verdict.startswith(f"pretrain: trained {m['steps_done']} of ~{2 * m['steps_done']} planned steps (50%)")
    assert "undertrained" in verdict


def test_a_budget_spent_before_any_plan_says_what_it_bought(workdir, tmp_path, monkeypatch):
    """A machine so busy that the budget is gone before the timing ends: the run stops and saves, plans nothing,
    and its result measures the speed it had (40 s a step: a 1-minute budget buys 1)."""
    import gptsmith.train.pretrain as loop
    from gptsmith.train.budget import training_verdict

    now = [0.0]
    real_step = loop.train_step

    def slow_step(run):
        loss = real_step(run)
        now[0] += 40.0
        return loss

    monkeypatch.setattr(loop, "clock", lambda: now[0])
    monkeypatch.setattr(loop, "train_step", slow_step)
    m = pretrain(workdir, tmp_path / "m", make_cfg(max_steps=250, max_minutes=1.0, eval_every=20, save_every=1000))
    assert m["steps_done"] == 2 and m["stop_reason"] == "max_minutes (1)"
    assert m["steps_planned"] is None and m["steps_planned_at_start"] is None
    assert m["steps_at_best_speed"] == 1 and (tmp_path / "m" / "model.safetensors").is_file()
    assert training_verdict(m, expected_steps=650).startswith("trained 2 of ~650 planned steps (0%)")


def test_the_verdict_says_what_a_run_bought():
    from gptsmith.train.budget import training_verdict

    busy = {"steps_done": 41, "steps_planned_at_start": 41, "steps_planned": 41, "steps_at_best_speed": 60,
            "stop_reason": "time budget (4 min)"}
    assert training_verdict(busy, expected_steps=650) == (
        "trained 41 of ~650 planned steps (6%): the machine was busy or slower than the plan assumed; "
        "the model is undertrained, expect babble")
    contended = {**busy, "steps_at_best_speed": 500}
    assert "the machine was busy (at its fastest measured speed the budget buys ~500 steps)" in \
        training_verdict(contended)
    assert training_verdict({**busy, "steps_done": 600}, 650) == "trained 600 steps (92% of ~650 planned)"
    assert training_verdict({"step": 30, "steps_planned": 30, "stop_reason": "max_steps"}) == "trained 30 steps"
    assert training_verdict({**busy, "stop_reason": "interrupted"}, 650).startswith("interrupted after 41 of ~650")
    assert training_verdict({"steps": 5, "steps_planned": 40}, stage="sft").startswith("sft: trained 5 of ~40")


# ---------------------------------------------------------------------------------------------- init-from any causal LM

def foreign_tokenizer(texts, with_bos: bool):
    """A byte-level BPE with <s>/</s> special tokens and no <|endoftext|>, as many open models have."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>", "<pad>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>" if with_bos else None, eos_token="</s>",
                                   pad_token="<pad>")


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_init_from_any_causal_lm_with_its_own_tokenizer(arch, tmp_path):
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
    from gptsmith.data.pipeline import clean, tokenize

    texts = python_doc_texts(60)
    # GPT-2 style: eos only, no num_key_value_heads / intermediate_size; Llama style: bos <s> and eos </s>
    tok = foreign_tokenizer(texts, with_bos=arch == "llama")
    assert "<|endoftext|>" not in tok.get_vocab()
    if arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=64, n_layer=2, n_head=4,
                                           eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id))
    else:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                             max_position_embeddings=128, bos_token_id=tok.bos_token_id,
                                             eos_token_id=tok.eos_token_id))
    parent = tmp_path / "parent"
    model.save_pretrained(parent)
    tok.save_pretrained(parent)

    docs = tmp_path / "docs"
    docs.mkdir()
    for i, text in enumerate(texts):
        (docs / f"doc{i}.txt").write_text(text, encoding="utf-8")
    cfg = ProjectConfig.model_validate({"data": {"val_fraction": 0.1}, "model": {"preset": "test"},
                                        "pretrain": {**PRETRAIN, "max_steps": 10, "save_every": 10,
                                                     "init_from": str(parent)}})
    clean([str(docs)], tmp_path / "work", cfg)
    manifest = tokenize(tmp_path / "work", cfg, tokenizer_dir=parent)  # the fix the error message suggests
    separator = tok.bos_token_id if arch == "llama" else tok.eos_token_id
    assert manifest["bos_token_id"] == separator

    metrics = pretrain(tmp_path / "work", tmp_path / "out", cfg)
    assert metrics["step"] == 10 and metrics["val_bpb"] < metrics["val_bpb_before"]
    assert metrics["mfu"] > 0
    out = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert out.config.model_type == arch  # its architecture is kept, not converted
    assert json.loads((tmp_path / "out" / "gptsmith_lineage.json").read_text())["parent_model"] == str(parent)


def test_flops_per_token_matches_the_llama_formula_and_counts_any_model():
    from transformers import GPT2Config, GPT2LMHeadModel
    from gptsmith.config import ModelConfig
    from gptsmith.model import build_model, flops_per_token, llama_config, resolve_shape

    model = build_model(llama_config(resolve_shape(ModelConfig(preset="test")), 512, 0, 5, 1))
    c, seq = model.config, 64
    d, L, kv = c.hidden_size, c.num_hidden_layers, c.num_key_value_heads * c.hidden_size // c.num_attention_heads
    n = L * (2 * d * d + 2 * d * kv + 3 * d * c.intermediate_size) + d * c.vocab_size
    assert flops_per_token(model, seq) == 6.0 * n + 12.0 * L * d * seq
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=512, n_positions=128, n_embd=64, n_layer=2, n_head=4))
    n = 2 * (64 * 3 * 64 + 64 * 64 + 2 * 64 * 256) + 64 * 512  # c_attn, c_proj, mlp c_fc + c_proj, lm_head
    assert flops_per_token(gpt2, seq) == 6.0 * n + 12.0 * 2 * 64 * seq


# ---------------------------------------------------------------------------------------------- shared pieces

def test_the_token_shard_format_lives_in_one_module():
    from pathlib import Path
    import gptsmith
    import gptsmith.data.shards as shards
    import gptsmith.train.pretrain as loop

    src = Path(gptsmith.__file__).parent
    assert sum(f.read_text().count('"gptsmith.tokens.v1"') for f in src.rglob("*.py")) == 1
    assert loop.TokenShards is shards.TokenShards and loop.read_manifest is shards.read_manifest


def test_peak_flops_come_from_the_table_for_the_dtype_that_runs(monkeypatch):
    from gptsmith.train.common import matmul_kind, peak_flops, table_peak_flops

    monkeypatch.delenv("GPTSMITH_PEAK_FLOPS", raising=False)
    assert table_peak_flops("NVIDIA A100-SXM4-80GB", "bf16") == 312e12
    assert table_peak_flops("NVIDIA A100-SXM4-80GB", "fp32") == 19.5e12
    assert table_peak_flops("NVIDIA H100 PCIe", "bf16") == 756e12  # not the SXM figure
    assert table_peak_flops("NVIDIA L40S", "tf32") == 183e12 and table_peak_flops("NVIDIA L4", "tf32") == 60e12
    assert table_peak_flops("Tesla T4", "bf16") is None  # no bf16 tensor cores: measured instead

    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA A100-SXM4-80GB")
    assert peak_flops(cuda, torch.bfloat16) == 312e12
    tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        assert matmul_kind(cuda, None) == "tf32" and peak_flops(cuda, None) == 156e12
        torch.backends.cuda.matmul.allow_tf32 = False
        assert matmul_kind(cuda, None) == "fp32" and peak_flops(cuda, None) == 19.5e12
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    assert matmul_kind(torch.device("cpu"), None) == "fp32"


def test_one_device_rule_for_pretrain_sft_and_the_engine(monkeypatch, tiny_model_dir):
    import gptsmith.device as device
    from gptsmith.engine.core import Engine
    from gptsmith.train.sft import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(device, "mps_available", lambda: True)
    assert device.select_device("auto") == torch.device("mps") and resolve_device("auto") == "mps"
    monkeypatch.setattr(device, "mps_available", lambda: False)
    assert device.select_device("auto") == torch.device("cpu") and resolve_device("auto") == "cpu"
    with pytest.raises(InputError, match="pretrain.device is 'mps' but Apple MPS is not available"):
        device.select_device("mps", setting="pretrain.device")
    with pytest.raises(InputError, match="sft.device is 'cuda' but no CUDA GPU"):
        resolve_device("cuda")
    with pytest.raises(InputError, match="'mps' but Apple MPS is not available"):
        Engine.load(tiny_model_dir, device="mps")
    with pytest.raises(InputError, match="'gpu' is not a device"):
        device.select_device("gpu")


def test_one_loss_plot_for_pretrain_and_sft(monkeypatch, tmp_path):
    import gptsmith.train.common as common
    from gptsmith.train.common import MetricsLog
    from gptsmith.train.sft import save_loss_plot

    drawn = []
    monkeypatch.setattr(common, "save_loss_plot", lambda path, train, val, **kw: drawn.append((train, val)))
    save_loss_plot([{"step": 1, "loss": 2.5}, {"step": 1, "eval_loss": 2.7}], tmp_path / "sft.png")
    log = MetricsLog(tmp_path)
    log.log(1, **{"train/loss": 3.0, "val/loss": 3.1})
    log.plot()
    log.writer.close()
    assert drawn == [([(1, 2.5)], [(1, 2.7)]), ([(1, 3.0)], [(1, 3.1)])]
