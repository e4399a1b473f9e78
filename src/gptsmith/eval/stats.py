"""Confidence intervals for evaluation numbers, by bootstrap (scipy.stats.bootstrap, percentile method).

Every score gptsmith prints comes from a finite set of items, so it carries sampling noise: 0.55 vs 0.52 on 100
questions is not a difference anyone should act on. These helpers turn per-item values into an interval, and a
pair of runs over the same items into a difference with an interval; `significant` says whether it excludes 0.
The percentile method is used because BCa needs a jackknife per resample and breaks on constant data (all items
right), which small suites hit often.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

CONFIDENCE = 0.95
N_RESAMPLES = 2000


def _bootstrap(data: tuple, statistic, paired: bool, confidence: float, n_resamples: int, seed: int
               ) -> tuple[float, float]:
    from scipy.stats import bootstrap

    arrays = tuple(np.asarray(d, dtype=float) for d in data)
    if len(arrays[0]) < 2 or all(np.ptp(a) == 0 for a in arrays):  # no spread: the interval is the point
        value = float(statistic(*arrays))
        return value, value
    res = bootstrap(arrays, statistic, paired=paired, vectorized=True, confidence_level=confidence,
                    n_resamples=n_resamples, method="percentile", rng=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def mean_ci(values: Sequence[float], confidence: float = CONFIDENCE, n_resamples: int = N_RESAMPLES,
            seed: int = 0) -> tuple[float, float]:
    """Interval for the mean of per-item values (accuracy from 0/1 items, a win rate from 1/0.5/0)."""
    if len(values) == 0:
        return float("nan"), float("nan")
    return _bootstrap((values,), lambda x, axis=-1: np.mean(x, axis=axis), False, confidence, n_resamples, seed)


def ratio_ci(numerators: Sequence[float], denominators: Sequence[float], confidence: float = CONFIDENCE,
             n_resamples: int = N_RESAMPLES, seed: int = 0) -> tuple[float, float]:
    """Interval for sum(numerators) / sum(denominators) with items resampled together (bits-per-byte:
    bits over bytes of the same documents)."""
    if len(numerators) != len(denominators):
        raise ValueError(f"{len(numerators)} numerators but {len(denominators)} denominators")
    if len(numerators) == 0:
        return float("nan"), float("nan")

    def ratio(num, den, axis=-1):
        return np.sum(num, axis=axis) / np.sum(den, axis=axis)

    return _bootstrap((numerators, denominators), ratio, True, confidence, n_resamples, seed)


def paired_diff_ci(a: Sequence[float], b: Sequence[float], confidence: float = CONFIDENCE,
                   n_resamples: int = N_RESAMPLES, seed: int = 0) -> tuple[float, float, float]:
    """mean(b) - mean(a) over the same items (callers align items by id first), with its interval. Pairing
    removes the items' own difficulty from the noise, so it finds real differences a two-sample test misses."""
    if len(a) != len(b):
        raise ValueError(f"paired values need the same items: {len(a)} vs {len(b)}")
    if len(a) == 0:
        return float("nan"), float("nan"), float("nan")
    diff = np.asarray(b, dtype=float) - np.asarray(a, dtype=float)
    lo, hi = mean_ci(diff, confidence, n_resamples, seed)
    return float(diff.mean()), lo, hi


def paired_ratio_diff_ci(num_a: Sequence[float], den_a: Sequence[float], num_b: Sequence[float],
                         den_b: Sequence[float], confidence: float = CONFIDENCE, n_resamples: int = N_RESAMPLES,
                         seed: int = 0) -> tuple[float, float, float]:
    """sum(num_b)/sum(den_b) - sum(num_a)/sum(den_a) over the same items resampled together (bits-per-byte of
    two models on the same documents)."""
    if not len(num_a) == len(den_a) == len(num_b) == len(den_b):
        raise ValueError("paired ratios need the same items in all four sequences")
    if len(num_a) == 0:
        return float("nan"), float("nan"), float("nan")

    def diff(na, da, nb, db, axis=-1):
        return np.sum(nb, axis=axis) / np.sum(db, axis=axis) - np.sum(na, axis=axis) / np.sum(da, axis=axis)

    point = float(diff(*(np.asarray(x, dtype=float) for x in (num_a, den_a, num_b, den_b))))
    lo, hi = _bootstrap((num_a, den_a, num_b, den_b), diff, True, confidence, n_resamples, seed)
    return point, lo, hi


def significant(lo: float, hi: float) -> bool:
    """True when the interval excludes 0 (a difference the data supports at the interval's confidence)."""
    return bool(lo > 0 or hi < 0)
