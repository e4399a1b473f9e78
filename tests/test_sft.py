"""Supervised fine-tuning: assistant-only loss, full and LoRA training, merge, resume, clear errors."""

import json

import pytest
import torch
from safetensors.torch import load_file

from gptsmith.config import load_config
from gptsmith.errors import InputError
from gptsmith.files import sha256_file
from gptsmith.train.sft import build_trainer, latest_checkpoint, merge_lora, sft

QA = [("What is 2+2?", "Four."), ("Name a colour.", "Blue."), ("Say hi.", "Hi there!"),
      ("What is Python?", "A programming language."), ("Capital of France?", "Paris."), ("Is ice cold?", "Yes.")]


def conversations(n=48):
    convs = []
    for i in range(n):
        q, a = QA[i % len(QA)]
        # the suffix makes each conversation distinct, so the content-hash split puts some in validation
        m = [{"role": "user", "content": f"{q} #{i}"}, {"role": "assistant", "content": a}]
        if i % 3 == 0:
            m.insert(0, {"role": "system", "content": "Be brief."})
        if i % 4 == 0:
            m += [{"role": "user", "content": "Thanks."}, {"role": "assistant", "content": "You are welcome."}]
        convs.append(m)
    return convs


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("sftdata") / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations()))
    return path


def cfg(**kw):
    base = {"sft.max_steps": 30, "sft.lr": 3e-3, "sft.batch_size": 8, "sft.max_seq_len": 64, "sft.eval_every": 1000,
            "sft.save_every": 1000, "sft.val_fraction": 0.2, "sft.log_every": 5, "sft.device": "cpu"}
    base.update({f"sft.{k}": v for k, v in kw.items()})
    return load_config(None, base)


def test_labels_mask_everything_but_assistant_tokens(tiny_model_dir, tmp_path):
    convs = conversations(8)
    trainer, info = build_trainer(str(tiny_model_dir), convs, [], tmp_path, cfg())
    assert info["masking"] == "generation markers"
    tok = trainer.processing_class
    rows = {tuple(r["input_ids"]): r["labels"] for r in trainer.train_dataset}
    for conv in convs:
        ids = tok.apply_chat_template(conv, tokenize=True, return_dict=True)["input_ids"]
        labels = rows[tuple(ids)]
        trained = [i for i, lab in enumerate(labels) if lab != -100]
        assert all(labels[i] == ids[i] for i in trained)
        # the trained tokens, run by run, are exactly each assistant answer plus its end-of-turn token
        runs, run = [], []
        for i in range(len(ids)):
            if labels[i] != -100:
                run.append(ids[i])
            elif run:
                runs.append(tok.decode(run)), run.clear()
        if run:
            runs.append(tok.decode(run))
        assert runs == [m["content"] + "<|end|>" for m in conv if m["role"] == "assistant"]
        # ... and everything else (system and user text, every role header) is masked
        masked = tok.decode([ids[i] for i in range(len(ids)) if labels[i] == -100])
        for m in conv:
            if m["role"] != "assistant":
                assert m["content"] in masked
        assert masked.count("<|assistant|>") == sum(m["role"] == "assistant" for m in conv)
        assert "<|user|>" in masked


@pytest.mark.parametrize("lora", [False, True])
def test_cpu_lm_head_scores_assistant_tokens_exactly_like_trls(tiny_model_dir, tmp_path, lora, capsys):
    """The CPU fast path (only assistant positions projected) gives TRL's per-token log-probs, metrics, loss and
    gradients: same training, less work."""
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    trainer, info = build_trainer(str(tiny_model_dir), conversations(16), [], tmp_path, cfg(lora=lora))
    assert info["lm_head"] == "compact (assistant tokens only)"
    assert "sft: LM head: compact (assistant tokens only)" in capsys.readouterr().out  # the log says which ran
    batch = next(iter(trainer.get_train_dataloader()))
    assert (batch["labels"] == -100).float().mean() > 0.3  # prompt and padding: positions the fast path skips
    ours = trainer.model.get_base_model() if lora else trainer.model
    ref = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    ref.load_state_dict({k.replace("base_layer.", ""): v for k, v in ours.state_dict().items() if "lora_" not in k})
    add_fused_lm_head(ref, outputs=("log_probs", "entropy", "is_top1"))
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    a, b = ours(**inputs, fused_lm_head=True), ref(**inputs, fused_lm_head=True)
    assert torch.equal(a.label_mask, b.label_mask)
    torch.testing.assert_close(a.log_probs, b.log_probs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.entropy, b.entropy, atol=1e-4, rtol=1e-5)
    assert torch.equal(a.is_top1, b.is_top1)
    a.loss.backward(), b.loss.backward()
    torch.testing.assert_close(a.loss, b.loss)
    grads = dict(ref.named_parameters())
    trained = [(n, p) for n, p in ours.named_parameters() if p.requires_grad]
    assert trained and all(p.grad is not None for _, p in trained)
    if lora:  # the adapter (lora_B starts at zero, so the outputs match the base) gets its gradient
        assert any(p.grad.abs().sum() > 0 for n, p in trained if "lora_B" in n)
    else:
        for name, p in trained:
            torch.testing.assert_close(p.grad, grads[name].grad, atol=1e-6, rtol=1e-4)


def test_compact_lm_head_needs_a_forward_patched_by_trl(tiny_model_dir):
    """Feature detection on the model itself: a forward TRL did not give a `fused_lm_head=` keyword (TRL's main
    branch no longer does) is left alone, so training takes TRL's own path."""
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    from gptsmith.train.sft import trl_has_fused_lm_head, use_compact_lm_head

    plain = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    assert not trl_has_fused_lm_head(plain)
    assert use_compact_lm_head(plain) is False
    assert plain.forward.__func__ is type(plain).forward  # untouched
    add_fused_lm_head(plain)
    assert trl_has_fused_lm_head(plain) and use_compact_lm_head(plain) is True


def test_trl_without_fused_lm_head_internals_trains_on_trls_standard_path(tiny_model_dir, data_file, tmp_path,
                                                                         monkeypatch, capsys):
    """A TRL like its main branch: no `FusedCausalLMOutput`, no fused LM head patched onto the model, the loss from
    the model's own forward. sft detects it, says so, and trains."""
    import transformers
    import trl.trainer.sft_trainer
    import trl.trainer.utils

    monkeypatch.delattr(trl.trainer.utils, "FusedCausalLMOutput")
    monkeypatch.setattr(trl.trainer.sft_trainer, "add_fused_lm_head", lambda *args, **kwargs: None)
    monkeypatch.setattr(trl.trainer.sft_trainer.SFTTrainer, "compute_loss", transformers.Trainer.compute_loss)
    m = sft(str(tiny_model_dir), data_file, tmp_path / "chat", cfg(max_steps=12))
    assert "sft: LM head: TRL standard" in capsys.readouterr().out
    assert m["steps"] == 12 and m["val_loss"] < m["val_loss_before"]


def test_template_without_generation_markers_is_masked_by_prefix_rendering(tiny_model_dir, tmp_path):
    import shutil

    from transformers import AutoTokenizer

    model_dir = tmp_path / "m"
    shutil.copytree(tiny_model_dir, model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.chat_template = ("{%- for m in messages -%}{{- '<|' + m['role'] + '|>\\n' + m['content'] + '<|end|>\\n' -}}"
                         "{%- endfor -%}{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- endif -%}")
    (model_dir / "chat_template.jinja").unlink()
    tok.save_pretrained(model_dir)
    convs = conversations(4)
    trainer, info = build_trainer(str(model_dir), convs, [], tmp_path / "o", cfg())
    assert info["masking"] == "prefix rendering"
    for conv, row in zip(convs, trainer.train_dataset):
        ids, labels = row["input_ids"], row["labels"]
        trained = tok.decode([t for t, lab in zip(ids, labels) if lab != -100])
        assert trained == "".join(m["content"] + "<|end|>" for m in conv if m["role"] == "assistant")
        masked = tok.decode([t for t, lab in zip(ids, labels) if lab == -100])
        assert all(m["content"] in masked for m in conv if m["role"] != "assistant")


def test_full_sft_lowers_val_loss_and_writes_a_plain_hf_dir(tiny_model_dir, data_file, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "chat"
    m = sft(str(tiny_model_dir), data_file, out, cfg())
    assert m["steps"] == 30 and m["val_conversations"] > 0
    assert m["val_loss"] < m["val_loss_before"] - 1.0
    assert 0 < m["val_bpb"] < m["val_bpb_before"]
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    text = tok.apply_chat_template([{"role": "user", "content": "Say hi."}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|assistant|>\n")
    assert tok.convert_tokens_to_ids("<|end|>") in model.generation_config.eos_token_id
    lineage = json.loads((out / "gptsmith_lineage.json").read_text())
    assert lineage["parent_model"] == str(tiny_model_dir.resolve())
    assert lineage["data"]["sha256"] == sha256_file(data_file) and lineage["mode"] == "full"
    assert (out / "gptsmith.yaml").is_file() and (out / "loss.png").stat().st_size > 1000
    assert list((out / "runs").glob("events.out.tfevents.*"))


def test_lora_trains_only_the_adapter_and_merges_exactly(tiny_model_dir, data_file, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_sha = sha256_file(tiny_model_dir / "model.safetensors")
    out = tmp_path / "adapter"
    m = sft(str(tiny_model_dir), data_file, out, cfg(lora=True, max_steps=10, lora_r=4, lora_alpha=8, packing=True))
    assert m["trainable_params"] < m["total_params"] / 2
    assert sha256_file(tiny_model_dir / "model.safetensors") == base_sha  # base weights untouched
    weights = load_file(out / "adapter_model.safetensors")
    assert weights and all("lora_" in k for k in weights)
    assert any("lora_B" in k and w.abs().max() > 0 for k, w in weights.items())  # B starts at zero: it trained
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_model_dir.resolve())

    merged = merge_lora(out, tmp_path / "merged")
    ids = torch.tensor([[1, 5, 42, 77, 100, 3]])
    with torch.no_grad():
        ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out)(ids).logits
        got = AutoModelForCausalLM.from_pretrained(merged)(ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)(ids).logits
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    assert (got - base).abs().max() > 1e-3  # the adapter changed the model
    assert not list(merged.glob("adapter_*")) and (merged / "chat_template.jinja").is_file()

    # the CLI verb loads the config like every other (default: the adapter's own) and records it beside the model
    from gptsmith.cli import main

    assert main(["merge-lora", "--adapter", str(out), "--out", str(tmp_path / "m2"), "--sft.log_every", "3"]) == 0
    recorded = load_config(tmp_path / "m2" / "gptsmith.yaml")
    assert recorded.sft.lora_r == 4 and recorded.sft.log_every == 3


def test_resume_continues_from_the_last_finished_checkpoint(tiny_model_dir, data_file, tmp_path):
    import shutil

    out = tmp_path / "run"
    straight = sft(str(tiny_model_dir), data_file, out, cfg(max_steps=8, save_every=4))
    # emulate a kill after step 4: the step-8 checkpoint and the final weights are gone, and a checkpoint that
    # was being written when the process died (no trainer_state.json yet) is lying around
    shutil.rmtree(out / "checkpoints" / "checkpoint-8")
    (out / "checkpoints" / "checkpoint-6").mkdir()
    (out / "model.safetensors").unlink()
    assert latest_checkpoint(out).name == "checkpoint-4"
    resumed = sft(str(tiny_model_dir), data_file, out, cfg(max_steps=8, save_every=4), resume=True)
    assert resumed["steps"] == 8 and "val_loss_before" not in resumed  # continued, not restarted
    # model, optimizer, schedule, RNG and data position all restored: the same result as never stopping
    assert resumed["val_loss"] == pytest.approx(straight["val_loss"], abs=1e-5)
    assert (out / "model.safetensors").is_file()
    # resuming with other data is refused instead of silently mixing runs
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"messages": conversations(3)[1]}) + "\n")
    with pytest.raises(InputError, match="different data"):
        sft(str(tiny_model_dir), other, out, cfg(max_steps=10), resume=True)


def test_a_new_run_never_deletes_an_earlier_runs_checkpoints(tiny_model_dir, data_file, tmp_path, capsys):
    from gptsmith.cli import main

    out = tmp_path / "run"
    sft(str(tiny_model_dir), data_file, out, cfg(max_steps=4, save_every=2))
    before = {p: p.stat().st_mtime_ns for p in (out / "checkpoints").rglob("*")}
    assert latest_checkpoint(out).name == "checkpoint-4"
    with pytest.raises(InputError, match="already holds checkpoints.*--resume.*--overwrite"):
        sft(str(tiny_model_dir), data_file, out, cfg(max_steps=4, save_every=2))
    argv = ["sft", "--model", str(tiny_model_dir), "--data", str(data_file), "--out", str(out), "--device", "cpu",
            "--max-steps", "2", "--sft.save_every", "2", "--sft.max_seq_len", "64", "--sft.eval_every", "1000"]
    assert main(argv) == 2
    assert "--resume" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in (out / "checkpoints").rglob("*")} == before  # all still there
    assert main([*argv, "--overwrite"]) == 0  # asked for: the old checkpoints go, the new run starts over
    assert [p.name for p in (out / "checkpoints").glob("checkpoint-*")] == ["checkpoint-2"]


def test_model_without_chat_template_gets_ours(tmp_path, data_file):
    """A base model whose tokenizer has no chat template and no role tokens (like GPT-2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator([data_file.read_text()] * 3, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    base = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=32, n_layer=1, n_head=2)).save_pretrained(base)
    tok.save_pretrained(base)

    out = tmp_path / "out"
    m = sft(str(base), data_file, out, cfg(max_steps=3))
    tok2 = AutoTokenizer.from_pretrained(out)
    assert tok2.eos_token == "<|end|>" and "<|assistant|>" in tok2.get_vocab()
    assert "<|assistant|>" in tok2.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False,
                                                        add_generation_prompt=True)
    assert m["steps"] == 3

    lora = sft(str(base), data_file, tmp_path / "lora", cfg(max_steps=2, lora=True, lora_target_modules=["c_attn"]))
    assert lora["steps"] == 2  # LoRA keeps the vocabulary: a plain-text template ending answers with eos
    assert "### Assistant:" in (tmp_path / "lora" / "chat_template.jinja").read_text()


def test_qlora_on_cpu_is_a_clear_error(tiny_model_dir, data_file, tmp_path):
    with pytest.raises(InputError, match="--qlora needs a CUDA GPU.*--lora"):
        sft(str(tiny_model_dir), data_file, tmp_path / "q", cfg(qlora=True))


def test_missing_model_and_adapter_are_clear_errors(data_file, tmp_path):
    with pytest.raises(InputError, match="cannot load a model"):
        sft(str(tmp_path / "nope"), data_file, tmp_path / "o", cfg())
    with pytest.raises(InputError, match="adapter_config.json"):
        merge_lora(tmp_path, tmp_path / "m")


def test_cli_sft_reports_errors_without_traceback(tiny_model_dir, data_file, tmp_path, capsys):
    from gptsmith.cli import main

    assert main(["sft", "--model", str(tiny_model_dir), "--data", str(data_file), "--out", str(tmp_path / "o"),
                 "--qlora", "--device", "cpu"]) == 2
    assert "--qlora needs a CUDA GPU" in capsys.readouterr().err
    assert main(["merge-lora", "--adapter", str(tmp_path), "--out", str(tmp_path / "m")]) == 2
    assert "adapter_config.json" in capsys.readouterr().err


def test_time_budget_stops_training_early_with_a_usable_model(tiny_model_dir, data_file, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "chat"
    m = sft(str(tiny_model_dir), data_file, out, cfg(max_steps=10_000, max_minutes=1e-4))
    assert 1 <= m["steps"] == m["steps_done"] < m["steps_planned"] == 10_000
    assert m["stop_reason"] == "time budget (0.0001 min)"
    from gptsmith.train.budget import training_verdict
    assert training_verdict(m, stage="sft").startswith(f"sft: trained {m['steps']} of ~10000 planned steps")
    AutoModelForCausalLM.from_pretrained(out)
