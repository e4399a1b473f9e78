"""Ratings from pairwise votes (the blind arena's): online Elo and Bradley-Terry, with bootstrap intervals.

A vote is (model_a, model_b, winner) with winner "a", "b", "tie" or "both_bad"; "both_bad" counts as a tie for
the ratings, as in LMSYS Chatbot Arena. Both ratings are on the Elo scale: `scale` points of difference mean
10:1 odds of winning, and the average model sits at `base`.

- `elo`: online Elo as Chatbot Arena computed it: every model starts at `base`, each vote moves both models by
  k * (score - expected score), in vote order. Cheap and familiar, but it depends on the order of the votes.
- `bradley_terry`: the maximum-likelihood fit of P(i beats j) = 1 / (1 + 10 ** ((r_j - r_i) / scale)) to all
  votes at once (a tie is half a win each way); order-free, and what Chatbot Arena ranks by.
- `leaderboard`: both, with percentile-bootstrap intervals (the votes resampled with replacement and refit) and
  each model's vote counts.

The maximum-likelihood fit has no finite answer when some group of models never lost (or never won) against
the rest, e.g. after a single vote: the likelihood keeps growing as their ratings run off to infinity. Then, and
only then, the fit adds a weak Gaussian prior (sd = `scale` points around `base`), which keeps the ratings
finite and in the right order; with enough votes the plain maximum-likelihood fit is used.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize
from scipy.sparse.csgraph import connected_components
from scipy.special import expit

from gptsmith.errors import InputError

WINNERS = ("a", "b", "tie", "both_bad")
SCORE_A = {"a": 1.0, "b": 0.0, "tie": 0.5, "both_bad": 0.5}  # model_a's score; model_b's is 1 - it
LN10 = math.log(10)


@dataclass(frozen=True)
class Vote:
    model_a: str
    model_b: str
    winner: str  # a | b | tie | both_bad


def as_votes(votes: Iterable) -> list[Vote]:
    """Votes given as Vote, dicts {model_a, model_b, winner} or (model_a, model_b, winner) tuples, checked."""
    out = []
    for i, v in enumerate(votes):
        if isinstance(v, Vote):
            a, b, w = v.model_a, v.model_b, v.winner
        elif isinstance(v, Mapping):
            a, b, w = v.get("model_a"), v.get("model_b"), v.get("winner")
        else:
            try:
                a, b, w = v
            except (TypeError, ValueError):
                raise InputError(f"vote {i}: {v!r} is not a vote; give (model_a, model_b, winner) or a dict "
                                 "with those keys") from None
        for field, name in (("model_a", a), ("model_b", b)):
            if not isinstance(name, str) or not name.strip():
                raise InputError(f"vote {i}: {field} must be a model name, got {name!r}")
        if w not in WINNERS:
            raise InputError(f"vote {i}: winner {w!r} is not one of {', '.join(WINNERS)}")
        if a == b:
            raise InputError(f"vote {i}: '{a}' is voted against itself; a vote compares two different models")
        out.append(Vote(a, b, w))
    return out


def elo(votes: Iterable, k: float = 4.0, scale: float = 400.0, base: float = 1000.0) -> dict[str, float]:
    """Online Elo in vote order (LMSYS's update rule): model name -> rating."""
    ratings: dict[str, float] = {}
    for v in as_votes(votes):
        ra, rb = ratings.setdefault(v.model_a, base), ratings.setdefault(v.model_b, base)
        expected_a = 1.0 / (1.0 + 10.0 ** ((rb - ra) / scale))
        score_a = SCORE_A[v.winner]
        ratings[v.model_a] = ra + k * (score_a - expected_a)
        ratings[v.model_b] = rb + k * ((1.0 - score_a) - (1.0 - expected_a))
    return ratings


def win_matrix(votes: list[Vote], names: list[str]) -> np.ndarray:
    """wins[i, j]: how often names[i] beat names[j], a tie counting half a win for each."""
    index = {n: i for i, n in enumerate(names)}
    wins = np.zeros((len(names), len(names)))
    for v in votes:
        a, b, s = index[v.model_a], index[v.model_b], SCORE_A[v.winner]
        wins[a, b] += s
        wins[b, a] += 1.0 - s
    return wins


def mle_exists(wins: np.ndarray) -> bool:
    """Zermelo's condition: the maximum-likelihood ratings are finite exactly when the graph "i beat or tied j"
    is strongly connected (no group of models that never lost, or never won, against the others)."""
    if len(wins) < 2:
        return False
    n, _ = connected_components(wins > 0, directed=True, connection="strong")
    return n == 1


def fit_strengths(wins: np.ndarray, prior_sd: float | None = None) -> np.ndarray:
    """Bradley-Terry log-strengths (natural units, mean 0) that maximise the likelihood of `wins`, plus a
    Gaussian prior of sd `prior_sd` (natural units) on each when given."""
    p = len(wins)
    if p < 2:
        return np.zeros(p)
    precision = 0.0 if prior_sd is None else 1.0 / prior_sd ** 2

    def loss(theta):
        d = theta[:, None] - theta[None, :]  # d[i, j] = theta_i - theta_j
        nll = float(np.sum(wins * np.logaddexp(0.0, -d))) + 0.5 * precision * float(theta @ theta)
        g = wins * expit(-d)  # d nll / d d[i, j] = -g[i, j]
        return nll, g.sum(axis=0) - g.sum(axis=1) + precision * theta

    result = minimize(loss, np.zeros(p), jac=True, method="L-BFGS-B",
                      options={"gtol": 1e-10, "ftol": 1e-15, "maxiter": 10_000})
    return result.x - result.x.mean()  # only differences are identified: center them


def bradley_terry(votes: Iterable, scale: float = 400.0, base: float = 1000.0) -> dict[str, float]:
    """Maximum-likelihood Bradley-Terry ratings on the Elo scale (mean `base`): model name -> rating. Where the
    maximum-likelihood ratings are infinite (see the module's docstring) a weak prior keeps them finite."""
    vs = as_votes(votes)
    names = sorted({v.model_a for v in vs} | {v.model_b for v in vs})
    wins = win_matrix(vs, names)
    prior_sd = None if mle_exists(wins) else LN10  # `scale` rating points, in natural units
    theta = fit_strengths(wins, prior_sd)
    return {n: float(base + scale * t / LN10) for n, t in zip(names, theta)}


def _interval(samples: list[float], confidence: float) -> list[float] | None:
    if not samples:
        return None
    tail = 100 * (1 - confidence) / 2
    lo, hi = np.percentile(samples, [tail, 100 - tail])
    return [float(lo), float(hi)]


def leaderboard(votes: Iterable, n_bootstrap: int = 200, seed: int = 0, confidence: float = 0.95,
                k: float = 4.0, scale: float = 400.0, base: float = 1000.0) -> list[dict]:
    """One row per model, best Bradley-Terry rating first: {name, elo, elo_ci, bt, bt_ci, votes, wins, ties,
    losses}. The intervals are percentile-bootstrap ones over `n_bootstrap` resamples of the votes (with
    replacement, in the resampled order for Elo), the same for the same `seed`; None when n_bootstrap is 0.
    Ties count "tie" and "both_bad" votes."""
    if not isinstance(n_bootstrap, int) or n_bootstrap < 0:
        raise InputError(f"n_bootstrap must be a whole number >= 0, got {n_bootstrap!r}")
    if not 0 < confidence < 1:
        raise InputError(f"confidence must be between 0 and 1 (e.g. 0.95), got {confidence!r}")
    vs = as_votes(votes)
    if not vs:
        return []
    elo_now, bt_now = elo(vs, k, scale, base), bradley_terry(vs, scale, base)
    elo_samples: dict[str, list[float]] = {n: [] for n in bt_now}
    bt_samples: dict[str, list[float]] = {n: [] for n in bt_now}
    rng = np.random.default_rng(seed)
    for _ in range(n_bootstrap):
        sample = [vs[i] for i in rng.integers(0, len(vs), len(vs))]
        for samples, ratings in ((elo_samples, elo(sample, k, scale, base)),
                                 (bt_samples, bradley_terry(sample, scale, base))):
            for name, r in ratings.items():  # a model missing from this resample has no rating in it
                samples[name].append(r)
    rows = []
    for name in bt_now:
        wins = sum((v.model_a == name and v.winner == "a") or (v.model_b == name and v.winner == "b") for v in vs)
        losses = sum((v.model_a == name and v.winner == "b") or (v.model_b == name and v.winner == "a") for v in vs)
        n = sum(name in (v.model_a, v.model_b) for v in vs)
        rows.append({"name": name, "elo": elo_now[name], "elo_ci": _interval(elo_samples[name], confidence),
                     "bt": bt_now[name], "bt_ci": _interval(bt_samples[name], confidence),
                     "votes": n, "wins": wins, "ties": n - wins - losses, "losses": losses})
    return sorted(rows, key=lambda r: (-r["bt"], r["name"]))


def print_leaderboard(rows: list[dict], n_votes: int, console=None) -> None:
    """The leaderboard as a table in the terminal (rich), best first."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    if not rows:
        console.print("no arena votes yet: vote in the web UI's Arena (gptsmith serve with two or more models)")
        return

    def interval(ci: list[float] | None) -> str:
        return "" if ci is None else f"{ci[0]:.0f}-{ci[1]:.0f}"

    table = Table(title=f"Arena leaderboard: {n_votes} votes", box=box.SIMPLE_HEAD,
                  caption="Bradley-Terry (BT) and online Elo ratings with 95% bootstrap intervals; W/T/L: "
                          "wins, ties (incl. both bad), losses")
    table.add_column("#", justify="right")
    table.add_column("model", overflow="fold")  # a name is never cut short
    for name in ("BT", "BT 95% CI", "Elo", "Elo 95% CI", "votes", "W/T/L"):
        table.add_column(name, justify="right", no_wrap=True)
    for i, r in enumerate(rows, 1):
        table.add_row(str(i), r["name"], f"{r['bt']:.0f}", interval(r["bt_ci"]), f"{r['elo']:.0f}",
                      interval(r["elo_ci"]), str(r["votes"]), f"{r['wins']}/{r['ties']}/{r['losses']}")
    console.print(table)
