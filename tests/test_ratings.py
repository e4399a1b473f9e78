"""Arena ratings: online Elo and Bradley-Terry against hand-worked examples, the leaderboard's bootstrap
intervals, and clear errors for votes that make no sense."""

import math

import pytest
from scipy.optimize import minimize

from gptsmith.errors import InputError
from gptsmith.eval.ratings import bradley_terry, elo, leaderboard


def repeat(a, b, winner, n):
    return [(a, b, winner)] * n


def test_elo_by_hand():
    # vote 1: both at 1000, expected 0.5 each, A wins: +-4 * 0.5
    # vote 2: B (998) ties C (1000): B expected 1 / (1 + 10 ** (2 / 400)) = 0.4971218, so B gains 4 * 0.0028782
    expected_b = 1 / (1 + 10 ** (2 / 400))
    assert expected_b == pytest.approx(0.4971218, abs=1e-7)
    ratings = elo([("A", "B", "a"), {"model_a": "B", "model_b": "C", "winner": "tie"}])
    assert ratings == pytest.approx({"A": 1002.0, "B": 998.0 + 4 * (0.5 - expected_b),
                                     "C": 1000.0 - 4 * (0.5 - expected_b)})
    assert ratings["B"] == pytest.approx(998.011513, abs=1e-6)
    # both_bad is a tie; k and base are the caller's
    assert elo([("A", "B", "both_bad")]) == {"A": 1000.0, "B": 1000.0}
    assert elo([("A", "B", "b")], k=32, base=1500) == {"A": 1484.0, "B": 1516.0}


def test_bradley_terry_two_models_closed_form():
    """Two models: the likelihood peaks where the odds 10 ** (diff / 400) equal the win ratio; a tie counts half
    a win for each."""
    votes = repeat("A", "B", "a", 3) + repeat("B", "A", "a", 1) + repeat("A", "B", "tie", 1) \
        + repeat("A", "B", "both_bad", 1)
    bt = bradley_terry(votes)  # A: 3 + 1 = 4 wins, B: 1 + 1 = 2
    assert bt["A"] - bt["B"] == pytest.approx(400 * math.log10(4 / 2), abs=1e-4)
    assert (bt["A"] + bt["B"]) / 2 == pytest.approx(1000)


def test_bradley_terry_three_models_consistent_counts():
    """Strengths 4 : 2 : 1 and win counts that match them exactly (A-B 2:1, A-C 4:1, B-C 2:1): the maximum-
    likelihood ratings are 400 * log10(strength), centered on 1000."""
    votes = (repeat("A", "B", "a", 2) + repeat("A", "B", "b", 1) + repeat("A", "C", "a", 4)
             + repeat("A", "C", "b", 1) + repeat("B", "C", "a", 2) + repeat("B", "C", "b", 1))
    bt = bradley_terry(votes)
    logs = {m: 400 * math.log10(s) for m, s in {"A": 4, "B": 2, "C": 1}.items()}
    mean = sum(logs.values()) / 3
    assert bt == pytest.approx({m: 1000 + v - mean for m, v in logs.items()}, abs=1e-4)
    assert bt["A"] - bt["C"] == pytest.approx(400 * math.log10(4), abs=1e-4)


def test_bradley_terry_is_the_likelihood_maximum():
    """Counts that fit no strengths exactly: compare with a direct maximisation of the likelihood written out
    here in probabilities, and check the ranking follows the win rates."""
    votes = (repeat("A", "B", "a", 5) + repeat("A", "B", "b", 2) + repeat("B", "C", "a", 3)
             + repeat("B", "C", "tie", 2) + repeat("C", "B", "a", 1) + repeat("A", "C", "a", 2)
             + repeat("C", "A", "a", 1))
    wins = {("A", "B"): 5, ("B", "A"): 2, ("B", "C"): 3 + 1, ("C", "B"): 1 + 1, ("A", "C"): 2, ("C", "A"): 1}

    def neg_log_likelihood(x):
        r = {"A": x[0], "B": x[1], "C": 0.0}
        return -sum(n * math.log(1 / (1 + 10 ** ((r[j] - r[i]) / 400))) for (i, j), n in wins.items())

    best = minimize(neg_log_likelihood, [0.0, 0.0], method="Nelder-Mead",
                    options={"xatol": 1e-8, "fatol": 1e-12, "maxiter": 20_000}).x
    bt = bradley_terry(votes)
    assert bt["A"] - bt["C"] == pytest.approx(best[0], abs=1e-3)
    assert bt["B"] - bt["C"] == pytest.approx(best[1], abs=1e-3)
    assert neg_log_likelihood([bt["A"] - bt["C"], bt["B"] - bt["C"]]) <= neg_log_likelihood(best) + 1e-9
    rows = leaderboard(votes, n_bootstrap=0)
    win_rate = {r["name"]: (r["wins"] + r["ties"] / 2) / r["votes"] for r in rows}
    assert [r["name"] for r in rows] == sorted(win_rate, key=win_rate.get, reverse=True) == ["A", "B", "C"]


def test_one_sided_votes_stay_finite():
    """After one vote (or a model that never lost) the maximum likelihood is at infinity; the ratings stay finite
    and in the order of the votes."""
    bt = bradley_terry([("A", "B", "a")])
    assert 1000 < bt["A"] < 1400 and bt["B"] == pytest.approx(2000 - bt["A"])
    bt = bradley_terry(repeat("A", "B", "a", 3) + repeat("B", "C", "a", 3))
    assert bt["A"] > bt["B"] > bt["C"] and all(math.isfinite(r) for r in bt.values())


def test_leaderboard_rows_intervals_and_seed():
    votes = (repeat("A", "B", "a", 6) + repeat("A", "B", "b", 2) + repeat("B", "C", "a", 5)
             + repeat("B", "C", "b", 3) + repeat("A", "C", "tie", 2) + repeat("A", "C", "both_bad", 1)
             + repeat("C", "A", "b", 3))
    rows = leaderboard(votes, n_bootstrap=100, seed=1)
    assert [r["name"] for r in rows] == ["A", "B", "C"]
    a = rows[0]
    assert (a["votes"], a["wins"], a["ties"], a["losses"]) == (14, 9, 3, 2)
    assert sum(r["votes"] for r in rows) == 2 * len(votes)
    bt = bradley_terry(votes)
    for r in rows:
        assert r["bt"] == pytest.approx(bt[r["name"]])
        assert r["bt_ci"][0] <= r["bt"] <= r["bt_ci"][1]
        assert r["elo_ci"][0] <= r["elo"] <= r["elo_ci"][1]
        assert r["bt_ci"][0] < r["bt_ci"][1]
    assert leaderboard(votes, n_bootstrap=100, seed=1) == rows  # the same seed, the same intervals
    assert leaderboard(votes, n_bootstrap=100, seed=2) != rows
    assert leaderboard(votes, n_bootstrap=0)[0]["bt_ci"] is None
    assert leaderboard([]) == []


@pytest.mark.parametrize("votes, message", [
    ([("A", "B", "A")], "winner 'A' is not one of a, b, tie, both_bad"),
    ([("A", "B", "a"), ("A", "A", "tie")], "vote 1: 'A' is voted against itself"),
    ([("A", "", "a")], "model_b must be a model name"),
    ([{"model_a": "A", "winner": "a"}], "model_b must be a model name"),
    ([("A", "B")], "is not a vote"),
])
def test_bad_votes(votes, message):
    for fn in (elo, bradley_terry, leaderboard):
        with pytest.raises(InputError, match=message):
            fn(votes)


def test_bad_leaderboard_arguments():
    with pytest.raises(InputError, match="n_bootstrap"):
        leaderboard([("A", "B", "a")], n_bootstrap=-1)
    with pytest.raises(InputError, match="confidence"):
        leaderboard([("A", "B", "a")], confidence=95)
