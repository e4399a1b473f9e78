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


@dataclass
class Battles:
    """Checked votes as arrays, the form every rating is computed on (a bootstrap resample is an index array)."""
    names: list[str]  # sorted
    a: np.ndarray  # index into names of each vote's model_a
    b: np.ndarray
    score: np.ndarray  # model_a's score: 1, 0 or 0.5

    @classmethod
    def of(cls, votes: Iterable) -> Battles:
        vs = as_votes(votes)
        names = sorted({v.model_a for v in vs} | {v.model_b for v in vs})
        index = {n: i for i, n in enumerate(names)}
        return cls(names, np.array([index[v.model_a] for v in vs], dtype=np.int64),
                   np.array([index[v.model_b] for v in vs], dtype=np.int64),
                   np.array([SCORE_A[v.winner] for v in vs], dtype=np.float64))

    def take(self, rows: np.ndarray) -> Battles:
        return Battles(self.names, self.a[rows], self.b[rows], self.score[rows])


def elo_ratings(battles: Battles, k: float, scale: float, base: float) -> np.ndarray:
    """Online Elo over the votes in their order; a model without votes keeps `base`."""
    r = [base] * len(battles.names)
    for i, j, s in zip(battles.a.tolist(), battles.b.tolist(), battles.score.tolist()):
        step = k * (s - 1.0 / (1.0 + 10.0 ** ((r[j] - r[i]) / scale)))  # k * (score - expected score)
        r[i] += step
        r[j] -= step  # model_b's score and expected score are 1 minus model_a's
    return np.array(r)


def win_matrix(battles: Battles) -> np.ndarray:
    """wins[i, j]: how often names[i] beat names[j], a tie counting half a win for each."""
    p = len(battles.names)
    wins = np.zeros((p, p))
    np.add.at(wins, (battles.a, battles.b), battles.score)
    np.add.at(wins, (battles.b, battles.a), 1.0 - battles.score)
    return wins


def mle_exists(wins: np.ndarray) -> bool:
    """Zermelo's condition: the maximum-likelihood ratings are finite exactly when the graph "i beat or tied j"
    is strongly connected (no group of models that never lost, or never won, against the others)."""
    if len(wins) < 2:
        return False
    n, _ = connected_components(wins > 0, directed=True, connection="strong")
    return n == 1


def fit_strengths(wins: np.ndarray, prior_sd: float | None = None) -> np.ndarray:
    """Bradley-Terry log-strengths (natural units, mean 0) that maximise the likelihood of `wins`, times a
    Gaussian prior of sd `prior_sd` (natural units) on each when given. Newton's method with a backtracking line
    search: the log-likelihood is concave, and p x p systems are tiny, so it converges in a handful of steps to
    full precision (a general optimiser took 10x longer here, most of it in BLAS threads on a busy machine)."""
    p = len(wins)
    theta = np.zeros(p)
    if p < 2:
        return theta
    precision = 0.0 if prior_sd is None else 1.0 / prior_sd ** 2
    games = wins + wins.T
    shift = np.full((p, p), 1.0 / p)  # the ratings' common shift is free; this pins it (every step sums to 0)

    def objective(t: np.ndarray) -> float:  # the log-likelihood (plus log-prior), to maximise
        return float(np.sum(wins * -np.logaddexp(0.0, t[None, :] - t[:, None]))) - 0.5 * precision * float(t @ t)

    value = objective(theta)
    for _ in range(100):
        prob = expit(theta[:, None] - theta[None, :])  # prob[i, j]: P(i beats j)
        grad = (wins - games * prob).sum(axis=1) - precision * theta
        if np.abs(grad).max() < 1e-10 * max(1.0, games.sum()):
            break
        weight = games * prob * (1.0 - prob)
        curvature = np.diag(weight.sum(axis=1)) - weight + precision * np.eye(p)  # minus the Hessian
        step = np.linalg.solve(curvature + shift, grad)
        for _ in range(60):  # halve the step until the likelihood does not drop
            new = objective(theta + step)
            if new >= value - 1e-12 * abs(value):
                break
            step /= 2
        theta, value = theta + step, new
    return theta - theta.mean()


def bt_ratings(battles: Battles, scale: float, base: float) -> np.ndarray:
    """Bradley-Terry ratings of the models that have votes (NaN for the others, e.g. absent from a resample)."""
    present = np.zeros(len(battles.names), dtype=bool)
    present[battles.a] = present[battles.b] = True
    wins = win_matrix(battles)[np.ix_(present, present)]
    prior_sd = None if mle_exists(wins) else LN10  # `scale` rating points, in natural units
    out = np.full(len(battles.names), np.nan)
    out[present] = base + scale * fit_strengths(wins, prior_sd) / LN10
    return out


def elo(votes: Iterable, k: float = 4.0, scale: float = 400.0, base: float = 1000.0) -> dict[str, float]:
    """Online Elo in vote order (LMSYS's update rule): model name -> rating."""
    battles = Battles.of(votes)
    return dict(zip(battles.names, elo_ratings(battles, k, scale, base).tolist()))


def bradley_terry(votes: Iterable, scale: float = 400.0, base: float = 1000.0) -> dict[str, float]:
    """Maximum-likelihood Bradley-Terry ratings on the Elo scale (mean `base`): model name -> rating. Where the
    maximum-likelihood ratings are infinite (see the module's docstring) a weak prior keeps them finite."""
    battles = Battles.of(votes)
    return dict(zip(battles.names, bt_ratings(battles, scale, base).tolist()))


def _interval(samples: np.ndarray, confidence: float) -> list[float] | None:
    samples = samples[~np.isnan(samples)]  # a model missing from a resample has no rating in it
    if not len(samples):
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
    battles = Battles.of(votes)
    n, p = len(battles.score), len(battles.names)
    if not n:
        return []
    elo_now, bt_now = elo_ratings(battles, k, scale, base), bt_ratings(battles, scale, base)
    elo_samples, bt_samples = np.full((n_bootstrap, p), np.nan), np.full((n_bootstrap, p), np.nan)
    rng = np.random.default_rng(seed)
    for i in range(n_bootstrap):
        sample = battles.take(rng.integers(0, n, n))
        present = np.zeros(p, dtype=bool)
        present[sample.a] = present[sample.b] = True
        elo_samples[i, present] = elo_ratings(sample, k, scale, base)[present]
        bt_samples[i] = bt_ratings(sample, scale, base)
    votes_of = np.bincount(battles.a, minlength=p) + np.bincount(battles.b, minlength=p)
    wins_of = np.bincount(battles.a, battles.score == 1, p) + np.bincount(battles.b, battles.score == 0, p)
    ties_of = np.bincount(battles.a, battles.score == 0.5, p) + np.bincount(battles.b, battles.score == 0.5, p)
    rows = [{"name": name, "elo": float(elo_now[m]), "elo_ci": _interval(elo_samples[:, m], confidence),
             "bt": float(bt_now[m]), "bt_ci": _interval(bt_samples[:, m], confidence), "votes": int(votes_of[m]),
             "wins": int(wins_of[m]), "ties": int(ties_of[m]), "losses": int(votes_of[m] - wins_of[m] - ties_of[m])}
            for m, name in enumerate(battles.names)]
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
