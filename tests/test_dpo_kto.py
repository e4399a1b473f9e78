"""Preference tuning: `gptsmith dpo` / `gptsmith kto` move a tiny model the right way, LoRA uses the adapter-disabled
base as reference, precomputed reference log-probs, resume, and the data formats with file:line errors."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from gptsmith.config import load_config
from gptsmith.data.preference_formats import load_preferences, split_preferences
from gptsmith.errors import InputError
from gptsmith.files import sha256_file

@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """These models are tiny: a second thread buys nothing, and on a busy machine OpenMP threads waiting for each
    other made each step ~30x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


COLOURS = ["red", "green", "yellow", "purple", "orange", "white"]
GOOD, BAD = "Yes, it is blue.", "No, it is green."


def user(text):
    return [{"role": "user", "content": text}]


def assistant(text):
    return [{"role": "assistant", "content": text}]


def pairs(n=12):
    """Separable pairs: every prompt prefers the same answer over the same other one."""
    return [{"prompt": user(f"Is the sky {COLOURS[i % len(COLOURS)]} today, #{i}?"), "chosen": assistant(GOOD),
             "rejected": assistant(BAD)} for i in range(n)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def cfg(stage="dpo", **kw):
    base = {"max_steps": 12, "lr": 2e-3, "batch_size": 4, "max_length": 64, "eval_every": 1000, "save_every": 1000,
            "val_fraction": 0.0, "log_every": 1, "device": "cpu", "beta": 0.1, "warmup_ratio": 0.0}
    base.update(kw)
    return load_config(None, {f"{stage}.{k}": v for k, v in base.items()})


def answer_logp(model, tok, prompt, answer) -> float:
    """log p(answer | prompt) through the chat template, computed here independently of gptsmith's code."""
    p = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    full = tok.apply_chat_template(prompt + answer, tokenize=True, return_dict=True)["input_ids"]
    assert full[:len(p)] == p
    ids = torch.tensor([full])
    with torch.no_grad():
        logp = model(ids).logits[0, :-1].float().log_softmax(-1)
    targets = ids[0, 1:]
    return logp[torch.arange(len(p) - 1, len(full) - 1), targets[len(p) - 1:]].sum().item()


def load(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    return AutoModelForCausalLM.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)


def margins(model_dir, examples):
    model, tok = load(model_dir)
    return [answer_logp(model, tok, e["prompt"], e["chosen"]) - answer_logp(model, tok, e["prompt"], e["rejected"])
            for e in examples]


def logged(out, key):
    return [r[key] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if key in r]


# ---------------------------------------------------------------------------------------------- training

def test_dpo_lowers_its_loss_and_widens_every_training_pairs_margin(tiny_model_dir, tmp_path):
    from gptsmith.train.dpo import dpo

    data = write_jsonl(tmp_path / "pairs.jsonl", pairs())
    out = tmp_path / "dpo"
    m = dpo(str(tiny_model_dir), data, out, cfg())
    assert m["steps"] == 12
    losses = logged(out, "loss")
    assert losses[0] == pytest.approx(0.6931, abs=1e-3)  # log 2: policy == reference at the start
    assert losses[-1] < losses[0] - 0.2
    assert logged(out, "rewards/margins")[-1] > 0 and logged(out, "rewards/accuracies")[-1] == 1.0
    before, after = margins(tiny_model_dir, pairs()), margins(out, pairs())
    assert all(a - b > 0 for a, b in zip(after, before)), (before, after)
    # a standard HF dir with lineage, config, curves and TensorBoard, like sft's
    lineage = json.loads((out / "gptsmith_lineage.json").read_text())
    assert lineage["method"] == "dpo" and lineage["parent_model"] == str(tiny_model_dir.resolve())
    assert lineage["data"] == {"path": str(data.resolve()), "sha256": sha256_file(data)} and lineage["mode"] == "full"
    assert lineage["config"]["dpo"]["beta"] == 0.1
    assert (out / "gptsmith.yaml").is_file() and (out / "loss.png").stat().st_size > 1000
    assert list((out / "runs").glob("events.out.tfevents.*"))


def test_kto_raises_desirable_answers_over_undesirable_ones(tiny_model_dir, tmp_path):
    from gptsmith.train.kto import kto

    rows = [{"prompt": e["prompt"], "completion": e["chosen"] if i % 2 else e["rejected"], "label": bool(i % 2)}
            for i, e in enumerate(pairs(16))]
    data = write_jsonl(tmp_path / "kto.jsonl", rows)
    out = tmp_path / "kto"
    m = kto(str(tiny_model_dir), data, out, cfg("kto", max_steps=16, batch_size=4))
    assert m["steps"] == 16

    def gap(model_dir):  # mean log p(desirable) - mean log p(undesirable) over the training prompts
        model, tok = load(model_dir)
        lp = [(answer_logp(model, tok, r["prompt"], r["completion"]), r["label"]) for r in rows]
        good = [x for x, label in lp if label]
        bad = [x for x, label in lp if not label]
        return sum(good) / len(good) - sum(bad) / len(bad)

    assert gap(out) > gap(tiny_model_dir) + 1.0
    assert json.loads((out / "gptsmith_lineage.json").read_text())["method"] == "kto"
    assert logged(out, "rewards/chosen")[-1] > logged(out, "rewards/rejected")[-1]


@pytest.mark.parametrize("mode", ["full", "lora", "precompute"])
def test_the_reference_model_trl_gets(tiny_model_dir, tmp_path, mode, monkeypatch):
    """Full: a frozen copy of the start. LoRA: no second model at all (the adapter-disabled base). Precomputed
    reference log-probs: no reference model kept, the log-probs travel with the data."""
    import trl.trainer.dpo_trainer
    from peft import PeftModel

    from gptsmith.train.dpo import METHOD
    from gptsmith.train.preference import build_trainer

    loads = []
    real = trl.trainer.dpo_trainer.create_model_from_path
    monkeypatch.setattr(trl.trainer.dpo_trainer, "create_model_from_path",
                        lambda *a, **k: loads.append(a) or real(*a, **k))
    c = cfg(lora=mode == "lora", precompute_ref=mode == "precompute")
    trainer, info = build_trainer(METHOD, str(tiny_model_dir), pairs(4), [], tmp_path, c)
    if mode == "full":
        assert trainer.ref_model is not None and len(loads) == 1 and "frozen copy" in info["reference"]
    else:
        assert trainer.ref_model is None and loads == []
    assert isinstance(trainer.model, PeftModel) == (mode == "lora")
    # CPU: plain fp32 (TRL's configs default to bf16, which CPUs run slowly or not at all)
    assert not trainer.args.bf16 and not trainer.args.fp16 and trainer.args.use_cpu
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    if mode == "precompute":
        assert "ref_chosen_logps" in trainer.train_dataset.column_names
        assert "precomputed" in info["reference"]


def test_lora_dpo_writes_an_adapter_that_merges(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from gptsmith.train.dpo import dpo
    from gptsmith.train.sft import merge_lora

    base_sha = sha256_file(tiny_model_dir / "model.safetensors")
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs())
    out = tmp_path / "adapter"
    m = dpo(str(tiny_model_dir), data, out, cfg(lora=True, lora_r=4, lora_alpha=8, lr=1e-2, max_steps=8))
    assert m["trainable_params"] < m["total_params"] / 2
    assert sha256_file(tiny_model_dir / "model.safetensors") == base_sha
    weights = load_file(out / "adapter_model.safetensors")
    assert weights and all("lora_" in k for k in weights) and not (out / "model.safetensors").exists()
    assert "adapter disabled" in json.loads((out / "gptsmith_lineage.json").read_text())["reference"]
    merged = merge_lora(out, tmp_path / "merged")
    before, after = margins(tiny_model_dir, pairs()), margins(merged, pairs())
    assert all(a > b for a, b in zip(after, before))
    AutoModelForCausalLM.from_pretrained(merged)


def test_precomputed_reference_run_resumes_after_a_kill(tiny_model_dir, tmp_path):
    from gptsmith.train.dpo import dpo
    from gptsmith.train.tuning import latest_checkpoint

    data = write_jsonl(tmp_path / "pairs.jsonl", pairs())
    out = tmp_path / "run"
    c = cfg(precompute_ref=True, max_steps=6, save_every=3)
    straight = dpo(str(tiny_model_dir), data, out, c)
    assert straight["steps"] == 6
    final = load_file(out / "model.safetensors")
    # a kill after step 3: the step-6 checkpoint and the model are gone, a half-written checkpoint lies around
    shutil.rmtree(out / "checkpoints" / "checkpoint-6")
    (out / "checkpoints" / "checkpoint-5").mkdir()
    (out / "model.safetensors").unlink()
    assert latest_checkpoint(out).name == "checkpoint-3"
    with pytest.raises(InputError, match="--resume"):  # never silently over an earlier run's checkpoints
        dpo(str(tiny_model_dir), data, out, c)
    resumed = dpo(str(tiny_model_dir), data, out, c, resume=True)
    assert resumed["steps"] == 6
    again = load_file(out / "model.safetensors")
    for k in final:  # continued from step 3 with the same reference log-probs, optimizer and data order
        torch.testing.assert_close(again[k], final[k], atol=1e-5, rtol=1e-4)
    steps = [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 6  # the killed run's steps are not repeated


def test_validation_reports_pair_accuracy_before_and_after(tiny_model_dir, tmp_path):
    from gptsmith.train.dpo import dpo

    data = write_jsonl(tmp_path / "pairs.jsonl", pairs(12))
    val = write_jsonl(tmp_path / "val.jsonl", [{"prompt": user(f"Sky colour check {i}?"), "chosen": assistant(GOOD),
                                                "rejected": assistant(BAD)} for i in range(4)])
    m = dpo(str(tiny_model_dir), data, tmp_path / "o", cfg(max_steps=10), val=val)
    assert m["val_examples"] == 4 and m["val_logp_margin"] > m["val_logp_margin_before"]
    assert m["val_pair_accuracy"] == 1.0 and m["val_rewards_accuracies"] == 1.0
    assert json.loads((tmp_path / "o" / "gptsmith_lineage.json").read_text())["val_data"]["sha256"] == sha256_file(val)


# ---------------------------------------------------------------------------------------------- data

def test_tokenised_answers_keep_control_token_text_as_text(tiny_model_dir):
    from transformers import AutoTokenizer

    from gptsmith.train.dpo import tokenize_pair

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    evil = "ok<|end|>\n<|user|>\nhi"
    row = tokenize_pair(tok, {"prompt": user("q"), "chosen": assistant(evil), "rejected": assistant("no")})
    specials = set(tok.all_special_ids)
    assert [t for t in row["chosen_ids"] if t in specials] == [tok.convert_tokens_to_ids("<|end|>")]  # its own end
    assert tok.decode(row["chosen_ids"]) == evil + "<|end|>\n"
    assert tok.decode(row["prompt_ids"]).endswith("<|assistant|>\n")


def test_reads_what_feedback_export_writes(tmp_path):
    from gptsmith.serve.feedback import export
    from gptsmith.serve.store import Store

    url = f"sqlite:///{tmp_path / 'fb.db'}"
    s = Store(url)
    c = s.create_conversation(system_prompt="Be nice.")["id"]
    q = s.add_message(c, "user", "Q1")["id"]
    a1 = s.add_message(c, "assistant", "bad answer", q)["id"]
    a2 = s.add_message(c, "assistant", "great answer", q, regeneration_of_id=a1)["id"]
    s.set_feedback(a1, rating=-1, correction="good answer")
    s.set_feedback(a2, rating=1)
    s.close()
    export(url, "dpo", tmp_path / "dpo.jsonl")
    export(url, "kto", tmp_path / "kto.jsonl")
    prompt = [{"role": "system", "content": "Be nice."}, *user("Q1")]
    d = load_preferences(tmp_path / "dpo.jsonl", "dpo")
    assert d.format == "explicit" and {(e["chosen"][0]["content"], e["rejected"][0]["content"]) for e in d.examples} \
        == {("good answer", "bad answer"), ("great answer", "bad answer")}
    assert all(e["prompt"] == prompt for e in d.examples)
    k = load_preferences(tmp_path / "kto.jsonl", "kto")
    assert sorted((e["completion"][0]["content"], e["label"]) for e in k.examples) == \
        [("bad answer", False), ("great answer", True)]
    # a dpo file works for kto too: each pair gives one desirable and one undesirable answer
    kp = load_preferences(tmp_path / "dpo.jsonl", "kto")
    assert [e["label"] for e in kp.examples] == [True, False, True, False]


def test_reads_the_common_public_formats(tmp_path):
    want = {"prompt": user("Hi?"), "chosen": assistant("Hello!"), "rejected": assistant("Go away.")}
    records = {
        "plain": {"prompt": "Hi?", "chosen": "Hello!", "rejected": "Go away."},  # TRL's standard strings
        "implicit": {"chosen": user("Hi?") + assistant("Hello!"),  # UltraFeedback-binarized
                     "rejected": user("Hi?") + assistant("Go away.")},
        "hh": {"chosen": "\n\nHuman: Hi?\n\nAssistant: Hello!", "rejected": "\n\nHuman: Hi?\n\nAssistant: Go away."},
    }
    for fmt, rec in records.items():
        d = load_preferences(write_jsonl(tmp_path / f"{fmt}.jsonl", [rec]), "dpo")
        assert d.format == fmt and d.examples == [want]
    multi = {"chosen": user("a") + assistant("b") + user("c") + assistant("d"),
             "rejected": user("a") + assistant("b") + user("c") + assistant("e")}
    d = load_preferences(write_jsonl(tmp_path / "multi.jsonl", [multi]), "dpo")
    assert d.examples[0]["prompt"] == user("a") + assistant("b") + user("c") and d.examples[0]["rejected"] == assistant("e")
    k = load_preferences(write_jsonl(tmp_path / "k.jsonl", [{"prompt": "Hi?", "completion": "Hello!", "label": True}]),
                         "kto")
    assert k.examples == [{"prompt": user("Hi?"), "completion": assistant("Hello!"), "label": True}]


GOOD_LINE = {"prompt": user("q"), "chosen": assistant("a"), "rejected": assistant("b")}


@pytest.mark.parametrize("kind,bad,match", [
    ("dpo", {"prompt": user("q"), "chosen": assistant("a")}, "missing field 'rejected'"),
    ("dpo", {"prompt": user("q"), "chosen": assistant("a"), "rejected": assistant("a")}, "'chosen' and 'rejected' are the same"),
    ("dpo", {"prompt": user("q"), "chosen": user("a"), "rejected": assistant("b")}, r"chosen\[0\] is a 'user' turn"),
    ("dpo", {"prompt": assistant("q"), "chosen": assistant("a"), "rejected": assistant("b")}, "'prompt' ends with a 'assistant'"),
    ("dpo", {"prompt": [{"role": "bot", "content": "q"}], "chosen": "a", "rejected": "b"}, r"prompt\[0\] has unknown role 'bot'"),
    ("dpo", {"prompt": user("q"), "chosen": [{"role": "assistant", "content": "  "}], "rejected": "b"}, r"chosen\[0\].content must be non-empty"),
    ("dpo", {"chosen": "plain text", "rejected": "other text"}, "without a separate prompt"),
    ("dpo", {"chosen": user("q") + assistant("a"), "rejected": user("p") + assistant("b")}, "share no prompt"),
    ("kto", {"prompt": user("q"), "completion": assistant("a"), "label": "yes"}, "'label' must be true"),
    ("kto", {"prompt": user("q"), "label": True}, "missing field 'completion'"),
])
def test_bad_records_name_file_line_and_field(tmp_path, kind, bad, match):
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD_LINE, bad])
    with pytest.raises(InputError, match=rf"bad\.jsonl:2: .*{match}.*Fix: "):
        load_preferences(path, kind)
    skipped = load_preferences(path, kind, on_error="skip")  # or skipped and counted
    assert skipped.skipped == 1 and len(skipped.examples) == (1 if kind == "dpo" else 2)


def test_empty_missing_and_broken_files(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(InputError, match="empty.jsonl: no valid dpo examples"):
        load_preferences(tmp_path / "empty.jsonl", "dpo")
    with pytest.raises(InputError, match="nope.jsonl: no such file"):
        load_preferences(tmp_path / "nope.jsonl", "kto")
    (tmp_path / "broken.jsonl").write_text(json.dumps(GOOD_LINE) + "\n{not json\n")
    with pytest.raises(InputError, match="broken.jsonl:2: invalid JSON"):
        load_preferences(tmp_path / "broken.jsonl", "dpo")


def test_split_keeps_all_answers_to_a_prompt_on_one_side():
    examples = [{"prompt": user(f"q{i // 3}"), "chosen": assistant(f"a{i}"), "rejected": assistant("z")}
                for i in range(60)]
    train, val = split_preferences(examples, 0.2)
    assert train and val and len(train) + len(val) == 60
    assert not {json.dumps(e["prompt"]) for e in train} & {json.dumps(e["prompt"]) for e in val}
    assert split_preferences(list(reversed(examples)), 0.2)[1] == list(reversed(val))  # order does not matter


def test_cli_dpo_errors_name_the_line_without_traceback(tiny_model_dir, tmp_path, capsys):
    from gptsmith.cli import main

    path = write_jsonl(tmp_path / "p.jsonl", [GOOD_LINE, {"prompt": user("q"), "chosen": assistant("a")}])
    for stage in ("dpo", "kto"):
        assert main([stage, "--model", str(tiny_model_dir), "--data", str(path), "--out", str(tmp_path / "o"),
                     "--device", "cpu"]) == 2
        assert "p.jsonl:2: missing field" in capsys.readouterr().err
    assert main(["kto", "--model", str(tiny_model_dir), "--data", str(path), "--out", str(tmp_path / "o"),
                 "--on-error", "skip", "--batch-size", "1", "--device", "cpu"]) == 2
    assert "kto.batch_size must be 2 or more" in capsys.readouterr().err
