"""The power of a paired study's tests (report/power.py): exact properties, a simulation, the CLI."""

import math

import numpy as np
import pytest
from scipy import stats

from critical_tokens.report.power import main, power_superiority, power_tost, smallest_n


def test_without_an_effect_the_superiority_test_rejects_at_its_level():
    # effect 0: t is central, P(T_{n-1} > t_{1-a, n-1}) = a, with a = alpha / hypotheses.
    assert power_superiority(4.4, 0.0, 10) == pytest.approx(0.05)
    assert power_superiority(4.4, 0.0, 10, hypotheses=12) == pytest.approx(0.05 / 12)
    # Power grows with the effect and with n, and only effect / sd matters.
    assert power_superiority(4.4, 1.0, 20) < power_superiority(4.4, 2.0, 20) < power_superiority(4.4, 2.0, 40)
    assert power_superiority(4.4, 3.0, 30) == pytest.approx(power_superiority(1.0, 3.0 / 4.4, 30))


def test_at_large_n_the_superiority_power_is_the_normal_one():
    # n = 5000: t ~ N(effect sqrt(n) / sd, 1), c -> z_{1-a}: power = Phi(0.05 sqrt(5000) - 1.644854) = Phi(1.890680).
    assert power_superiority(1.0, 0.05, 5000) == pytest.approx(stats.norm.cdf(0.05 * math.sqrt(5000) - 1.644854), abs=2e-3)


def simulate(sd, mean, n, test, runs=20_000, seed=0):
    """The share of ``runs`` simulated studies (n normal differences) where ``test`` (of mean, s) rejects."""
    d = np.random.default_rng(seed).normal(mean, sd, size=(runs, n))
    return float(np.mean(test(d.mean(axis=1), d.std(axis=1, ddof=1))))


def test_power_agrees_with_simulated_studies():
    n, sd, a = 12, 4.4, 0.05 / 4
    c = stats.t.ppf(1 - a, n - 1)
    superiority = simulate(sd, 3.0, n, lambda m, s: m / (s / math.sqrt(n)) > c)
    assert power_superiority(sd, 3.0, n, 0.05, 4) == pytest.approx(superiority, abs=0.01)  # binomial sd of the estimate: 0.0035
    equivalence = simulate(sd, 0.5, n, lambda m, s: (m + 4.0 > c * s / math.sqrt(n)) & (m - 4.0 < -c * s / math.sqrt(n)))
    assert power_tost(sd, 4.0, n, 0.05, 4, difference=0.5) == pytest.approx(equivalence, abs=0.01)


def test_tost_power_is_at_least_the_noncentral_t_bound_and_at_most_its_level_at_the_margin():
    sd, m, n, a = 4.4, 3.0, 32, 0.05 / 12
    c, se = stats.t.ppf(1 - a, n - 1), sd / math.sqrt(n)
    # P(A and B) >= P(A) + P(B) - 1, A: t_lower = (mean + m) / se_hat > c, B: t_upper = (mean - m) / se_hat < -c.
    bound = stats.nct.sf(c, n - 1, m / se) + stats.nct.cdf(-c, n - 1, -m / se) - 1
    exact = power_tost(sd, m, n, 0.05, 12)
    assert bound <= exact <= bound + 0.01
    # At the margin itself equivalence is false: the test rejects at most at its level.
    assert power_tost(sd, m, 400, 0.05, 12, difference=m) <= a
    assert power_tost(sd, m, 400, 0.05, 12, difference=m) == pytest.approx(a, rel=0.05)
    assert power_tost(sd, m, 32) > power_tost(sd, m, 32, hypotheses=12) > power_tost(sd, m, 24, hypotheses=12)


def test_smallest_n_is_the_first_to_reach_the_target():
    assert smallest_n(lambda n: n / 100, 0.5) == 50
    assert smallest_n(lambda n: 1.0, 0.8) == 2
    assert smallest_n(lambda n: 0.0, 0.8, limit=1000) is None
    n = smallest_n(lambda k: power_superiority(4.4, 3.0, k, 0.05, 12), 0.8)
    assert power_superiority(4.4, 3.0, n, 0.05, 12) >= 0.8 > power_superiority(4.4, 3.0, n - 1, 0.05, 12)


def test_the_command_prints_the_table_and_refuses_bad_values_in_one_line(capsys):
    assert main(["--sd", "4.4", "--effect", "3", "--margin", "3", "--hypotheses", "12", "--n", "24", "48"]) == 0
    out = capsys.readouterr().out
    assert f"| 24 | {power_superiority(4.4, 3, 24, 0.05, 12):.3f} | {power_tost(4.4, 3, 24, 0.05, 12):.3f} |" in out
    assert "| 48 |" in out and "| 32 |" not in out and "smallest n with power >= 0.8: superiority " in out
    for bad in (["--sd", "0"], ["--alpha", "1.5"], ["--n", "1"], ["--hypotheses", "0"], ["--effect", "inf"]):
        assert main(bad) == 2
        err = capsys.readouterr().err
        assert err.startswith("power: error: ") and err.count("\n") == 1
