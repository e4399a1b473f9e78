"""eval.stats (bootstrap intervals) and eval.targets (one interface for a model folder, an assistant, a backend)."""

import json

import numpy as np
import pytest

from gptsmith.errors import InputError
from gptsmith.eval import stats
from gptsmith.eval.targets import open_target, target_from_spec


def test_mean_ci_covers_the_mean_and_narrows_with_more_items():
    few = [1, 0] * 10
    many = [1, 0] * 500
    lo_f, hi_f = stats.mean_ci(few)
    lo_m, hi_m = stats.mean_ci(many)
    assert lo_f < 0.5 < hi_f and lo_m < 0.5 < hi_m
    assert (hi_m - lo_m) < (hi_f - lo_f) / 3  # 50x the items -> about 1/7 the width
    assert stats.mean_ci(few, seed=3) == stats.mean_ci(few, seed=3)  # deterministic with a seed


def test_constant_or_single_values_give_a_point_interval_not_nan():
    assert stats.mean_ci([1, 1, 1, 1]) == (1.0, 1.0)
    assert stats.mean_ci([0.25]) == (0.25, 0.25)
    assert all(np.isnan(stats.mean_ci([])))


def test_ratio_ci_is_the_ratio_of_sums_and_resamples_items_together():
    num, den = [3, 4, 5, 6] * 5, [1, 2, 2, 3] * 5
    lo, hi = stats.ratio_ci(num, den)
    assert lo <= sum(num) / sum(den) <= hi
    with pytest.raises(ValueError):
        stats.ratio_ci([1, 2], [1])


def test_paired_difference_finds_a_consistent_gain_that_unpaired_noise_would_hide():
    rng = np.random.default_rng(0)
    difficulty = rng.random(200)
    a = (difficulty > 0.5).astype(float)
    b = (difficulty > 0.4).astype(float)  # b gets every item a gets, plus ~10% more
    diff, lo, hi = stats.paired_diff_ci(a, b)
    assert diff == pytest.approx(b.mean() - a.mean())
    assert lo > 0 and stats.significant(lo, hi)
    same, lo, hi = stats.paired_diff_ci(a, a)
    assert same == 0 and not stats.significant(lo, hi)
    with pytest.raises(ValueError, match="same items"):
        stats.paired_diff_ci([1, 0], [1])


def test_paired_ratio_difference_has_the_sign_of_the_change():
    point, lo, hi = stats.paired_ratio_diff_ci([3, 4, 5, 6], [1, 2, 2, 3], [2, 3, 4, 5], [1, 2, 2, 3])
    assert point == pytest.approx(14 / 8 - 18 / 8)
    assert lo <= point <= hi < 0


def test_model_target_replies_greedily_and_describes_itself(tiny_model_dir):
    target = open_target(model=tiny_model_dir)
    assert target.kind == "model" and target.is_chat and target.ref == str(tiny_model_dir.resolve())
    convs = [[{"role": "user", "content": "Hello"}], [{"role": "user", "content": "What is a list?"}]] * 5
    first = target.replies(convs, max_tokens=8)
    again = target.replies(convs, max_tokens=8)
    assert [a.text for a in first] == [a.text for a in again]  # greedy: same answers on a rerun
    assert len(first) == 10 and all(a.finish_reason in ("stop", "length") for a in first)
    assert first[0].text == first[2].text  # batching does not change an answer
    json.dumps(target.describe())  # a result file can hold it
    ids = target.prompt_ids([{"role": "user", "content": "<|im_end|> hi"}])
    assert ids == target.engine.chat_template_ids([{"role": "user", "content": "<|im_end|> hi"}])


def test_assistant_target_sees_the_system_prompt(tiny_model_dir, tmp_path):
    bot = tmp_path / "bot.yaml"
    bot.write_text(f"name: bot\nmodel: {tiny_model_dir}\nsystem_prompt: Always answer in French.\n")
    target = open_target(assistant=bot)
    msgs = [{"role": "user", "content": "Hi"}]
    ids = target.prompt_ids(msgs)
    assert "Always answer in French." in target.engine.tokenizer.decode(ids)
    (reply,) = target.replies([msgs], max_tokens=4)
    assert reply.finish_reason in ("stop", "length")
    assert target.describe()["assistant"]["system_prompt"] == "Always answer in French."


def test_bad_targets_are_refused_by_name(tmp_path):
    with pytest.raises(InputError, match="exactly one"):
        open_target()
    with pytest.raises(InputError, match="not a model directory"):
        open_target(model=tmp_path)
    with pytest.raises(InputError, match="no such model folder"):
        target_from_spec(str(tmp_path / "missing"))
