"""Which assistant settings answer best, by measurement: a greedy search over settings on a dev question set, then
the winner against a baseline on held-out questions it was never chosen on.

    result = tune_assistant(engine, start, axes, dev_suite, retriever=r, may_start=fits_the_budget)
    result.profile              # the settings kept (an assistant profile as a dict)
    result.trials               # every setting tried: its dev score with a 95% interval, vs the one it challenged

The search walks the axes in order (e.g. how many sources, the system prompt, few-shot examples): each option is
tried against the current best and replaces it only when its dev score is higher; a tie keeps the cheaper prompt
(fewer tokens), so a setting must pay for the context it uses. Greedy search tries sum(options) settings instead
of their product: on a laptop CPU each costs a pass over the dev set. Choosing on the dev set and reporting on
another (see `holdout_report`) keeps the reported gain honest: the maximum of several noisy dev scores is biased
upwards, a held-out score of the one chosen is not.

Scores come from `gptsmith eval` (gptsmith.eval.run.evaluate) on a multiple-choice suite, through the same Target
every other measurement uses, so the prompt scored is exactly the one the assistant sends (system prompt, sources,
examples). A time budget stops the search between trials; what was not tried is reported as such.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path

from gptsmith.eval import stats


@dataclass
class Axis:
    name: str  # what is varied, e.g. "sources"
    options: list[tuple[str, dict]]  # (label, patch of the profile) tried against the current best


@dataclass
class Trial:
    label: str
    profile: dict
    score: float  # the suite's primary metric (mean over dev items)
    lo: float
    hi: float  # its 95% bootstrap interval
    n: int  # dev items
    prompt_tokens: float  # mean prompt size: the setting's cost on every request
    seconds: float
    diff: tuple[float, float, float] | None = None  # paired (diff, lo, hi) vs the setting it challenged
    kept: bool = False
    axis: str = ""


@dataclass
class TuneResult:
    profile: dict
    trials: list[Trial] = field(default_factory=list)
    not_tried: list[str] = field(default_factory=list)  # labels skipped: the time budget ran out

    @property
    def best(self) -> Trial:
        return [t for t in self.trials if t.kept][-1]


def patched(profile: dict, patch: dict) -> dict:
    """A deep copy of `profile` with `patch` applied: nested dicts merge, a None value removes the key."""
    out = copy.deepcopy(profile)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = patched(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def assistant_target(engine, profile: dict, retriever=None, embedder=None):
    """A Target for `profile` over an engine (and retriever) already loaded: trying ten settings loads the model
    and the index once, not ten times."""
    from gptsmith.assist.fewshot import FewShotLibrary
    from gptsmith.assist.profile import parse_assistant
    from gptsmith.assist.prompt import Assistant
    from gptsmith.eval.targets import Target

    checked = parse_assistant(profile, Path(f"<{profile.get('name', 'assistant')}>"), Path.cwd())
    examples = None
    if checked.few_shot is not None and checked.few_shot.k > 0:
        examples = FewShotLibrary.load(checked.few_shot.file, embedder)
        if retriever is not None:
            examples.query_vector = retriever.query_vector
    bot = Assistant(checked, retriever if checked.rag is not None else None, examples)
    return Target("assistant", checked.name, f"<{checked.name}>", engine=engine, assistant=bot)


def mean_prompt_tokens(target, items: list[dict]) -> float:
    """The mean size of the prompt `target` builds for the suite's questions."""
    sizes = [len(target.prompt_ids([{"role": "user", "content": it["question"]}])) for it in items]
    return sum(sizes) / max(1, len(sizes))


def score(target, suite: Path, seed: int = 0) -> tuple[dict, list[dict]]:
    """(the suite's result, its items) from `gptsmith eval` on one multiple-choice or generation suite."""
    from gptsmith.eval.run import evaluate

    result = evaluate(target, [str(suite)], seed=seed)
    return result, result["suites"][0]["items"]


def tune_assistant(engine, start: dict, axes: list[Axis], dev_suite: Path, retriever=None, embedder=None,
                   may_start=None, seed: int = 0, on_trial=None) -> TuneResult:
    """Greedy search from `start` over `axes` on `dev_suite` (see the module docstring). `may_start(last_trial)`
    says whether another trial fits the time left (the last one's seconds are the estimate); False skips the rest,
    which are listed in `not_tried`. `on_trial(trial)` is called after each trial."""
    from gptsmith.eval.results import metric_ci
    from gptsmith.eval.suites import load_suite

    items = load_suite(dev_suite).items

    def run(label: str, profile: dict, axis: str) -> tuple[Trial, list[float]]:
        t0 = time.perf_counter()
        target = assistant_target(engine, profile, retriever, embedder)
        result, scored = score(target, dev_suite, seed)
        suite = result["suites"][0]
        values = [float(it[suite["primary"]]) for it in scored]
        lo, hi = metric_ci(scored, suite["primary"], seed)
        trial = Trial(label, profile, suite["metrics"][suite["primary"]], lo, hi, len(values),
                      mean_prompt_tokens(target, items), time.perf_counter() - t0, axis=axis)
        return trial, values

    best, best_values = run("start", start, "")
    best.kept = True
    out = TuneResult(copy.deepcopy(start), [best])
    if on_trial:
        on_trial(best)
    for axis in axes:
        for label, patch in axis.options:
            if out.not_tried or (may_start is not None and not may_start(out.trials[-1])):
                out.not_tried.append(f"{axis.name}: {label}")
                continue
            trial, values = run(label, patched(out.profile, patch), axis.name)
            trial.diff = stats.paired_diff_ci(best_values, values, seed=seed)
            better = trial.score > best.score or (trial.score == best.score
                                                   and trial.prompt_tokens < best.prompt_tokens)
            if better:
                trial.kept = True
                best, best_values, out.profile = trial, values, trial.profile
            out.trials.append(trial)
            if on_trial:
                on_trial(trial)
    return out


@dataclass
class HoldoutReport:
    n: int
    before: tuple[float, float, float]  # score, lo, hi
    after: tuple[float, float, float]
    diff: tuple[float, float, float]  # paired after - before, with its interval
    before_result: dict
    after_result: dict

    @property
    def verdict(self) -> str:
        d, lo, hi = self.diff
        if lo > 0:
            return "better (the interval of the gain excludes zero)"
        if hi < 0:
            return "worse (the interval of the change is below zero)"
        return "no significant difference on these items"


def holdout_report(before_target, after_target, test_suite: Path, out_dir: Path | None = None,
                   seed: int = 0) -> HoldoutReport:
    """Both targets on the held-out suite (results written to `out_dir` when given); the paired difference is the
    one `gptsmith eval --baseline` computes (items paired by id)."""
    from gptsmith.eval.results import metric_ci
    from gptsmith.eval.run import evaluate

    before = evaluate(before_target, [str(test_suite)], out_dir=out_dir, seed=seed)
    after = evaluate(after_target, [str(test_suite)], out_dir=out_dir, seed=seed, baseline=before)
    sb, sa = before["suites"][0], after["suites"][0]
    metric = sb["primary"]
    row = next(r for r in after["baseline"]["comparison"] if r["metric"] == metric)
    return HoldoutReport(row["n"], (sb["metrics"][metric], *metric_ci(sb["items"], metric, seed)),
                         (sa["metrics"][metric], *metric_ci(sa["items"], metric, seed)),
                         (row["diff"], row["lo"], row["hi"]), before, after)
