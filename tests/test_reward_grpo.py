"""`gptsmith reward` learns to rank chosen over rejected answers it never saw, and `gptsmith grpo` raises a tiny
model's reward on a toy task; the rewards a user picks without code compute the right values; bad reward specs and
answers are refused with the flag, file and line named."""

import json
import textwrap

import pytest
import torch

from gptsmith.config import load_config
from gptsmith.errors import InputError
from gptsmith.files import sha256_file
from gptsmith.train import rewards as R

TOPICS = ["sky", "sea", "grass", "sun", "moon", "snow", "fire", "rain", "sand", "stone", "tree", "cloud"]


def user(text):
    return [{"role": "user", "content": text}]


def assistant(text):
    return [{"role": "assistant", "content": text}]


def toy_pairs(n=40):
    """Separable pairs: every chosen answer thanks the user, no rejected answer does."""
    return [{"prompt": user(f"Tell me about the {TOPICS[i % len(TOPICS)]}, #{i}."),
             "chosen": assistant(f"Thanks for asking: the {TOPICS[i % len(TOPICS)]} is lovely."),
             "rejected": assistant(f"The {TOPICS[i % len(TOPICS)]} is lovely.")} for i in range(n)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def logged(out, key):
    return [r[key] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if key in r]


def reward_cfg(**kw):
    base = {"max_steps": 10, "lr": 1e-3, "batch_size": 8, "max_length": 64, "eval_every": 5, "save_every": 1000,
            "val_fraction": 0.25, "log_every": 1, "device": "cpu", "warmup_ratio": 0.0}
    base.update(kw)
    return load_config(None, {f"reward.{k}": v for k, v in base.items()})


@pytest.fixture(scope="module")
def reward_run(tiny_model_dir, tmp_path_factory):
    from gptsmith.train.reward import reward

    tmp = tmp_path_factory.mktemp("reward")
    data = write_jsonl(tmp / "pairs.jsonl", toy_pairs())
    val = write_jsonl(tmp / "val.jsonl", [{**p, "prompt": user(f"And what about the {t}?")}
                                          for p, t in zip(toy_pairs(len(TOPICS)), TOPICS)])
    out = tmp / "rm"
    metrics = reward(str(tiny_model_dir), data, out, reward_cfg(), val=val)
    return out, data, val, metrics


# ---------------------------------------------------------------------------------------------- reward

def test_reward_model_ranks_held_out_chosen_answers_above_rejected(reward_run, tiny_model_dir):
    from transformers import AutoModelForSequenceClassification

    from gptsmith.train.reward import score

    out, data, val, m = reward_run
    assert m["steps"] == 10 and m["val_pairs"] == len(TOPICS)
    assert m["val_accuracy"] > 0.9 and "val_accuracy_before" in m  # the untrained head's, for comparison
    assert m["val_margin"] > m["val_margin_before"] + 1.0
    # a standard HF sequence-classification dir with one output
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.num_labels == 1 and model.config.pad_token_id is not None
    # score() ranks every held-out chosen answer above its rejected one
    held = [json.loads(line) for line in val.read_text().splitlines()]
    chosen = score(out, [p["prompt"] + p["chosen"] for p in held])
    rejected = score(out, [p["prompt"] + p["rejected"] for p in held])
    assert all(c > r for c, r in zip(chosen, rejected)), (chosen, rejected)
    # lineage, config, curves, TensorBoard
    lineage = json.loads((out / "gptsmith_lineage.json").read_text())
    assert lineage["method"] == "reward" and lineage["parent_model"] == str(tiny_model_dir.resolve())
    assert lineage["data"] == {"path": str(data.resolve()), "sha256": sha256_file(data)}
    assert lineage["metrics"]["val_accuracy"] == m["val_accuracy"]
    assert json.loads((out / "reward_metrics.json").read_text())["val_accuracy"] == m["val_accuracy"]
    assert logged(out, "accuracy") and logged(out, "eval_accuracy")
    assert (out / "gptsmith.yaml").is_file() and (out / "loss.png").stat().st_size > 1000
    assert list((out / "runs").glob("events.out.tfevents.*"))


def test_reward_with_lora_writes_a_merged_standard_directory(tiny_model_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from gptsmith.train.reward import reward, score

    data = write_jsonl(tmp_path / "pairs.jsonl", toy_pairs(16))
    out = tmp_path / "rm-lora"
    m = reward(str(tiny_model_dir), data, out, reward_cfg(max_steps=2, lora=True, lora_r=4))
    assert m["trainable_params"] < m["total_params"]
    assert not (out / "adapter_config.json").exists()
    assert AutoModelForSequenceClassification.from_pretrained(out).config.num_labels == 1
    assert len(score(out, [toy_pairs(1)[0]["prompt"] + toy_pairs(1)[0]["chosen"]])) == 1
    assert json.loads((out / "gptsmith_lineage.json").read_text())["mode"] == "lora (merged)"


def test_reward_model_as_a_grpo_reward_scores_like_score(reward_run):
    from gptsmith.train.reward import score

    out = reward_run[0]
    fn = R.RewardModelReward(str(out))
    prompts = [user("Tell me about the sea.")] * 2
    completions = [assistant("Thanks for asking: the sea is lovely."), assistant("The sea is lovely.")]
    got = fn(prompts=prompts, completions=completions, answer=[None, None], trainer_state=None)
    assert got == pytest.approx(score(out, [p + c for p, c in zip(prompts, completions)]), abs=1e-5)
    assert got[0] > got[1]
    # what a grpo run's lineage records about the reward model it used
    from gptsmith.train.grpo import reward_model_identity
    ident = reward_model_identity(out)
    assert ident["path"] == str(out.resolve()) and ident["val_accuracy"] == reward_run[3]["val_accuracy"]
    assert ident["data"]["sha256"] == sha256_file(reward_run[1])


def test_a_causal_lm_is_not_a_reward_model(tiny_model_dir):
    from gptsmith.train.reward import score

    with pytest.raises(InputError, match="not a reward model"):
        score(tiny_model_dir, [user("hi") + assistant("hello")])


# ---------------------------------------------------------------------------------------------- rewards

@pytest.mark.parametrize("kind,answer,completion,expected", [
    ("exact", "42", "  42\n", 1.0), ("exact", "42", "42.", 0.0), ("exact", ["x", "42"], "42", 1.0),
    ("exact", "Paris", "paris", 0.0),
    ("contains", "blue", "The sky is blue today", 1.0), ("contains", "Blue", "the sky is blue", 0.0),
    ("regex", r"^\d+$", "123", 1.0), ("regex", r"(?i)hello", "HELLO there", 1.0), ("regex", r"^\d+$", "12a", 0.0),
    ("numeric", "1000", "It costs $1,000.", 1.0), ("numeric", 42, "6 * 7 = 42", 1.0),
    ("numeric", "0.5", "first 3, then 0.50", 1.0), ("numeric", "42", "42 or 43", 0.0),
    ("numeric", "-3", "minus: \u22123", 1.0), ("numeric", "7", "no number", 0.0),
    ("numeric", 1e-07, "tiny: 0.0000001", 1.0), ("numeric", 2.0, "it is 2", 1.0), ("exact", 2.5, "2.5", 1.0),
])
def test_answer_checks_compute_the_documented_values(kind, answer, completion, expected):
    fn = R.matcher_reward(kind)
    assert fn.__name__ == kind
    # TRL hands chat completions as messages, plain ones as strings: both score the same
    assert fn(prompts=["p"], completions=[completion], answer=[answer]) == [expected]
    assert fn(prompts=[user("p")], completions=[assistant(completion)], answer=[answer]) == [expected]


def test_a_reward_fn_file_is_loaded_and_called_as_trl_calls_it(tmp_path):
    f = tmp_path / "my_rewards.py"
    f.write_text(textwrap.dedent("""
        def short(prompts, completions, answer, **kwargs):
            return [1.0 / (1 + len(c)) for c in completions]
    """))
    fn = R.load_reward_fn(f"{f}:short")
    assert fn(prompts=["a", "b"], completions=["", "xyz"], answer=[None, None], trainer_state=None) == [1.0, 0.25]


@pytest.mark.parametrize("body,spec_tail,message", [
    ("def other(prompts, completions, **kw):\n    return []\n", ":missing", "has no function 'missing'.*other"),
    ("def strict(prompts, completions):\n    return []\n", ":strict", r"must accept \*\*kwargs"),
    ("raise RuntimeError('boom')\n", ":f", "importing .* failed: RuntimeError: boom"),
    ("X = 3\n", ":X", "not a function"),
    ("", "", "path/to/file.py:function_name"),
])
def test_bad_reward_fn_specs_name_the_flag_and_file(tmp_path, body, spec_tail, message):
    f = tmp_path / "r.py"
    f.write_text(body)
    with pytest.raises(InputError, match="--reward-fn") as e:
        R.load_reward_fn(f"{f}{spec_tail}")
    assert e.match(message)


def test_a_missing_reward_fn_file_is_named():
    with pytest.raises(InputError, match="--reward-fn.*no such file nowhere.py"):
        R.load_reward_fn("nowhere.py:f")


# ---------------------------------------------------------------------------------------------- grpo inputs

def grpo_cfg(**kw):
    base = {"max_steps": 2, "lr": 1e-2, "batch_size": 8, "num_generations": 4, "max_completion_length": 4,
            "device": "cpu", "save_every": 1000, "log_every": 1}
    base.update(kw)
    return load_config(None, {f"grpo.{k}": v for k, v in base.items()})


@pytest.mark.parametrize("rows,kw,message", [
    ([{"prompt": "a", "answer": "1"}, {"prompt": "b"}], {"rewards": ["exact"]},
     r"prompts.jsonl:2: --reward exact needs an \"answer\""),
    ([{"prompt": "a", "answer": "(unclosed"}], {"rewards": ["regex"]},
     r"prompts.jsonl:1: \"answer\" '\(unclosed' is not a valid regular expression"),
    ([{"prompt": "a", "answer": "forty-two"}], {"rewards": ["numeric"]},
     r"prompts.jsonl:1: \"answer\" 'forty-two' is not a number"),
    ([{"prompt": "a", "answer": "1"}, {"question": "b"}], {"rewards": ["exact"]},
     r"prompts.jsonl:2: missing field 'prompt'"),
    ([{"prompt": [{"role": "assistant", "content": "hi"}], "answer": "1"}], {"rewards": ["exact"]},
     r"prompts.jsonl:1: 'prompt' ends with a 'assistant' turn"),
    ([{"prompt": "a", "answer": "1"}], {}, "grpo needs a reward"),
    ([{"prompt": "a", "answer": "1"}], {"rewards": ["exact"], "batch_size": 6},
     r"batch_size x grpo.grad_accum \(6 x 1\) must be a multiple of grpo.num_generations \(4\)"),
    ([{"prompt": "a", "answer": "1"}], {"rewards": ["exact", "contains"], "reward_weights": [1.0]},
     "--reward-weights has 1 weights for 2 rewards"),
    ([{"prompt": "a", "answer": "1"}], {"rewards": ["exact"], "use_vllm": True}, "--vllm .* CUDA"),
])
def test_bad_grpo_inputs_are_refused_before_training(tiny_model_dir, tmp_path, rows, kw, message):
    from gptsmith.train.grpo import grpo

    data = write_jsonl(tmp_path / "prompts.jsonl", rows)
    with pytest.raises(InputError, match=message):
        grpo(str(tiny_model_dir), data, tmp_path / "out", grpo_cfg(**kw))
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_grpo_skips_unusable_answers_with_on_error_skip(tmp_path):
    from gptsmith.train.grpo import check_answers, load_prompts

    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "answer": "1"}, {"prompt": "b"}, "not an object",
                                              {"prompt": "c", "answer": 3}])
    rows, wheres, skipped, _ = load_prompts(data, on_error="skip")
    assert skipped == 1 and [r["prompt"] for r in rows] == [user("a"), user("b"), user("c")]
    kept, _, dropped = check_answers(rows, wheres, ["numeric"], on_error="skip")
    assert dropped == 1 and [r["answer"] for r in kept] == ["1", 3]


def test_answers_of_mixed_kinds_become_lists_of_strings(tmp_path):
    from gptsmith.train.grpo import to_dataset

    assert to_dataset([{"prompt": "a", "answer": "1"}, {"prompt": "b", "answer": 3}])["answer"] == [["1"], ["3"]]
    assert to_dataset([{"prompt": "a", "answer": 2}, {"prompt": "b", "answer": 3.5}])["answer"] == [2, 3.5]
    assert to_dataset([{"prompt": "a", "answer": "x"}, {"prompt": "b"}])["answer"] == ["x", None]
    with pytest.raises(InputError, match="one type on every line"):
        to_dataset([{"prompt": "a", "meta": "x"}, {"prompt": "b", "meta": 1}])


def test_answers_file_gives_each_prompt_its_answer_by_id(tmp_path):
    from gptsmith.train.grpo import attach_answers, load_prompts

    data = write_jsonl(tmp_path / "p.jsonl", [{"id": 1, "prompt": "one plus one?"}, {"id": "b", "prompt": "x?"}])
    answers = write_jsonl(tmp_path / "a.jsonl", [{"id": "b", "answer": ["x", "X"]}, {"id": 1, "answer": 2}])
    rows, wheres, _, _ = load_prompts(data)
    attach_answers(rows, wheres, answers)
    assert [(r["id"], r["answer"]) for r in rows] == [("1", 2), ("b", ["x", "X"])]

    write_jsonl(answers, [{"id": 1, "answer": 2}])
    with pytest.raises(InputError, match=r"p.jsonl:2: id 'b' has no line in --answers"):
        attach_answers(*load_prompts(data)[:2], answers)
    write_jsonl(answers, [{"id": 1, "answer": 2}, {"id": "1", "answer": 3}])
    with pytest.raises(InputError, match=r"a.jsonl:2: id '1' is given twice \(first at .*a.jsonl:1\)"):
        attach_answers(*load_prompts(data)[:2], answers)
    write_jsonl(answers, [{"id": 1, "answer": 2}])
    write_jsonl(data, [{"prompt": "no id"}])
    with pytest.raises(InputError, match=r'p.jsonl:1: no "id", which --answers'):
        attach_answers(*load_prompts(data)[:2], answers)


# ---------------------------------------------------------------------------------------------- grpo training

LETTER = "e"


def sampled_reward(model_dir, prompts, per_prompt=16, max_new_tokens=4) -> float:
    """Share of sampled answers (temperature 1, fixed seed) containing LETTER, computed here with transformers'
    generate and the chat template, independently of gptsmith's training code."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    torch.manual_seed(0)
    hits = total = 0
    for p in prompts:
        ids = tok.apply_chat_template(user(p), add_generation_prompt=True, return_tensors="pt", return_dict=True)
        out = model.generate(**ids, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                             max_new_tokens=max_new_tokens, num_return_sequences=per_prompt,
                             pad_token_id=tok.pad_token_id)
        for seq in out:
            hits += LETTER in tok.decode(seq[ids["input_ids"].shape[1]:], skip_special_tokens=True)
            total += 1
    return hits / total


def test_grpo_raises_a_tiny_models_reward_on_a_toy_task(tiny_model_dir, tmp_path):
    """Reward 1 when the 4-token answer contains the letter "e" (--reward contains, answer "e"): a random 2-layer
    model starts near chance; GRPO must move it clearly up. A --reward-fn adding 0 rides along: it is called with
    the answer column, and its metrics are logged beside the check's."""
    from gptsmith.cli import main

    prompts = [f"Say something, #{i}." for i in range(8)]
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p, "answer": LETTER} for p in prompts])
    seen = tmp_path / "seen.json"
    fn_file = tmp_path / "zero.py"
    fn_file.write_text(textwrap.dedent(f"""
        import json
        def zero(prompts, completions, answer, **kwargs):
            json.dump({{"answer": answer, "keys": sorted(kwargs)}}, open({str(seen)!r}, "w"))
            return [0.0] * len(completions)
    """))
    out = tmp_path / "grpo"
    rc = main(["grpo", "--model", str(tiny_model_dir), "--data", str(data), "--out", str(out),
               "--reward", "contains", "--reward-fn", f"{fn_file}:zero", "--num-generations", "8",
               "--batch-size", "16", "--max-completion-length", "4", "--max-steps", "20", "--lr", "1e-2",
               "--device", "cpu", "--grpo.log_every", "1", "--grpo.save_every", "1000"])
    assert rc in (0, None)
    before, after = sampled_reward(tiny_model_dir, prompts), sampled_reward(out, prompts)
    assert after > before + 0.15, (before, after)
    # the reward curve: mean and std per step, each reward's own
    assert len(logged(out, "reward")) == 20 and len(logged(out, "reward_std")) == 20
    assert len(logged(out, "rewards/contains/mean")) == 20 and set(logged(out, "rewards/zero/mean")) == {0.0}
    called = json.loads(seen.read_text())
    assert set(called["answer"]) == {LETTER} and "completion_ids" in called["keys"]
    lineage = json.loads((out / "gptsmith_lineage.json").read_text())
    assert lineage["method"] == "grpo" and lineage["data"]["sha256"] == sha256_file(data)
    assert [r["weight"] for r in lineage["rewards"]] == [1.0, 1.0]
    assert lineage["reward_files"] == [{"path": str(fn_file.resolve()), "sha256": sha256_file(fn_file)}]
    assert lineage["config"]["grpo"]["rewards"] == ["contains"]
    assert (out / "loss.png").stat().st_size > 1000 and list((out / "runs").glob("events.out.tfevents.*"))
    m = json.loads((out / "grpo_metrics.json").read_text())
    assert m["steps"] == 20 and "reward_last" in m


def test_grpo_resumes_from_its_checkpoint(tiny_model_dir, tmp_path):
    from gptsmith.train.grpo import grpo

    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Hi #{i}", "answer": LETTER} for i in range(4)])
    out = tmp_path / "grpo"
    grpo(str(tiny_model_dir), data, out, grpo_cfg(rewards=["contains"], max_steps=2, save_every=2))
    with pytest.raises(InputError, match="--resume"):
        grpo(str(tiny_model_dir), data, out, grpo_cfg(rewards=["contains"], max_steps=4, save_every=2))
    m = grpo(str(tiny_model_dir), data, out, grpo_cfg(rewards=["contains"], max_steps=4, save_every=2), resume=True)
    assert m["steps"] == 4
    assert [h["step"] for h in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if "reward" in h] == [1, 2, 3, 4]
