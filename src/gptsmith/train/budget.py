"""Time budgets (`--minutes`): how many steps fit, how the estimate follows the machine's speed, and what a
finished run bought. Plain arithmetic, no torch: the quickstart and the CLI import it to print the verdict.

A budget is planned from measured step times, and measured again as training goes: a machine that was busy
for the first steps (another job, a cold cache) must not fix a run's length at a fraction of what it can do,
and one that slows down must not overrun its budget.
"""

from __future__ import annotations

from dataclasses import dataclass

# The timed steps leave out what happens between them only partly (the final evaluation, the save, the report
# card): plan for 92% of what is left.
HEADROOM = 0.92
# How much each new measurement window moves the estimate of seconds per step: fast enough that a machine which
# became quiet is followed within a few windows, slow enough that one window with an evaluation in it does not
# swing the plan.
EMA_WEIGHT = 0.4
# The first plan is made after at most 20 timed steps or this share of the budget, whichever comes first.
CALIBRATION_SHARE = 0.05
# Re-plan after this many steps: each re-plan also re-shapes the LR schedule, so not after every step.
REPLAN_EVERY = 10


def plan_time_budget(step: int, seconds_per_step: float, seconds_left: float, max_steps: int) -> int:
    """The run's total step count under a time budget: as many steps as fit in what is left, with headroom for
    what the timed steps did not include (the final evaluation and save), at most max_steps."""
    return max(step + 1, min(max_steps, step + int(HEADROOM * seconds_left / seconds_per_step)))


@dataclass
class StepSpeed:
    """Seconds per optimizer step: an exponential moving average over measurement windows (what the plan
    uses) and the fastest window seen (what the budget would have bought had the machine stayed that fast)."""

    ema: float
    best: float

    @classmethod
    def first(cls, seconds_per_step: float) -> "StepSpeed":
        return cls(seconds_per_step, seconds_per_step)

    def update(self, seconds_per_step: float) -> None:
        self.ema = (1 - EMA_WEIGHT) * self.ema + EMA_WEIGHT * seconds_per_step
        self.best = min(self.best, seconds_per_step)


def steps_at_speed(budget_seconds: float, seconds_per_step: float, max_steps: int) -> int:
    """Steps a whole budget buys at one speed, planned as the run plans (with its headroom)."""
    if not seconds_per_step or seconds_per_step <= 0:
        return max_steps
    return min(max_steps, int(HEADROOM * budget_seconds / seconds_per_step))


def training_verdict(metrics: dict, expected_steps: int | None = None, stage: str = "") -> str:
    """One line saying what a run bought, from the metrics pretrain or sft return (steps_done,
    steps_planned_at_start, steps_planned, steps_at_best_speed, stop_reason).

    `expected_steps`: the step count the caller's plan assumed (the quickstart's figure for a quiet machine);
    without it the run's own plan and its fastest measured speed are the yardstick. E.g.
    "pretrain: trained 41 of ~650 planned steps (6%): the machine was busy; the model is undertrained, expect
    babble"."""
    prefix = f"{stage}: " if stage else ""
    done = int(metrics.get("steps_done", metrics.get("steps", metrics.get("step", 0))) or 0)
    own = [int(v) for v in (metrics.get("steps_planned_at_start"), metrics.get("steps_at_best_speed"),
                            metrics.get("steps_planned")) if v]
    reference = int(expected_steps) if expected_steps else max(own, default=done)
    if reference <= 0:
        return f"{prefix}trained {done} steps"
    share = done / reference
    of = f"{done} of ~{reference} planned steps ({share:.0%})"
    stop = str(metrics.get("stop_reason") or "")
    if stop == "interrupted":
        return f"{prefix}interrupted after {of}: the model is undertrained"
    if share >= 0.8:
        return f"{prefix}trained {done} steps" + ("" if done >= reference else
                                                  f" ({share:.0%} of ~{reference} planned)")
    best = metrics.get("steps_at_best_speed")
    if best and best >= 1.5 * done:
        why = f"the machine was busy (at its fastest measured speed the budget buys ~{int(best)} steps)"
    elif expected_steps:
        why = "the machine was busy or slower than the plan assumed"
    else:
        why = "the run stopped early"
    expect = "expect babble" if share < 0.4 else "expect weaker answers"
    return f"{prefix}trained {of}: {why}; the model is undertrained, {expect}"
