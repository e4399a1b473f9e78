"""Data-parallel pretraining with torchrun: 2 CPU processes over gloo.

Each rank draws its own micro-batches (seeded by rank), accumulates 2 of them without syncing, and DDP
averages the gradients, so 2 ranks x 2 accumulation steps must train exactly like 1 process x 4 accumulation
steps — which also proves the ranks saw different data (identical data would equal 2 micro-batches, not 4)."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from gptsmith.config import save_config
from gptsmith.train.pretrain import pretrain
from test_pretrain import make_cfg, subprocess_env, workdir  # noqa: F401  (workdir is a fixture)


def test_two_gloo_ranks_with_accumulation_train_like_one_process(workdir, tmp_path):  # noqa: F811
    from transformers import AutoModelForCausalLM

    cfg = make_cfg(batch_size=2, grad_accum=2, max_steps=12, eval_every=6, save_every=6)
    cfg_file = save_config(cfg, tmp_path)
    ddp_out = tmp_path / "ddp"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "gptsmith.cli", "pretrain", "--config", str(cfg_file), "--data", str(workdir),
                           "--out", str(ddp_out), "--pretrain.device", "cpu"],
                          env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("saved ") == 1  # only rank 0 prints and writes
    assert "2 processes" in proc.stdout

    lineage = json.loads((ddp_out / "gptsmith_lineage.json").read_text())
    ddp = lineage["metrics"]
    assert ddp["ranks_in_sync"] is True  # gradients were averaged: both ranks ended with the same weights
    assert ddp["tokens_seen"] == 12 * 2 * 2 * 2 * 64

    torch.set_num_threads(1)
    single = pretrain(workdir, tmp_path / "single", make_cfg(batch_size=2, grad_accum=4, max_steps=12,
                                                              eval_every=6, save_every=6))
    assert ddp["val_loss"] == pytest.approx(single["val_loss"], abs=1e-4)
    a, b = load_file(str(ddp_out / "model.safetensors")), load_file(str(tmp_path / "single" / "model.safetensors"))
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-4), k
    AutoModelForCausalLM.from_pretrained(ddp_out)
