"""The paired analysis of the pre-registered study (report/paired.py), against numbers computed by hand."""

import math

import pytest
from scipy import stats

from critical_tokens.report.paired import HypothesisResult, PairedResult, decide, decide_per_arm, holm, hypothesis_results, paired_differences, paired_test


def t3_sf(t: float) -> float:
    """P(T_3 >= t) in closed form: the CDF of Student's t with 3 degrees of freedom is
    1/2 + (1/pi) (u / (1 + u²) + atan u) with u = t / sqrt(3)."""
    u = t / math.sqrt(3)
    return 0.5 - (u / (1 + u * u) + math.atan(u)) / math.pi


def test_paired_test_by_hand():
    r = paired_test([1, 2, 3, 4])
    # mean 10/4 = 2.5; sd² = (1.5² + 0.5² + 0.5² + 1.5²) / 3 = 5/3, sd = 1.29099; se = sd / 2 = 0.645497;
    # t = 2.5 / 0.645497 = sqrt(15) = 3.87298 on 3 df; u = t / sqrt(3) = sqrt(5), 1 + u² = 6:
    # p = 1/2 - (sqrt(5)/6 + atan(sqrt(5))) / pi = 1/2 - (0.372678 + 1.150262) / pi = 0.015233.
    assert (r.n, r.mean, r.margin) == (4, 2.5, 0.0)
    assert r.sd == pytest.approx(math.sqrt(5 / 3))
    assert r.t == pytest.approx(math.sqrt(15))
    assert r.p_t == pytest.approx(0.015233, abs=1e-6)
    assert r.p_t == pytest.approx(t3_sf(math.sqrt(15)), rel=1e-9)
    # 95% interval: 2.5 ± t_{0.975,3} x se = 2.5 ± 3.182446 x 0.645497 = 2.5 ± 2.054260.
    assert (r.low, r.high) == (pytest.approx(0.445740, abs=1e-6), pytest.approx(4.554260, abs=1e-6))
    # Wilcoxon: all four differences positive, W+ = 1 + 2 + 3 + 4 = 10, the largest of the 2^4
    # equally likely sign patterns under H0: p = 1/16.
    assert r.p_wilcoxon == pytest.approx(1 / 16)


def test_margin_shifts_the_tests_not_the_estimate():
    r = paired_test([1, 2, 3, 4], margin=1.0)
    # t = (2.5 - 1) / 0.645497 = sqrt(5.4) = 2.32379: p = 0.051364 (the closed form above).
    assert (r.mean, r.low) == (2.5, pytest.approx(0.445740, abs=1e-6))
    assert r.t == pytest.approx(math.sqrt(5.4))
    assert r.p_t == pytest.approx(0.051364, abs=1e-6)
    # d - 1 = [0, 1, 2, 3]: the zero is dropped (zero_method "wilcox"), [1, 2, 3] all positive: p = 1/2^3.
    assert r.p_wilcoxon == pytest.approx(1 / 8)
    # At the mean itself t = 0: p = 1/2.
    assert paired_test([1, 2, 3, 4], margin=2.5).p_t == pytest.approx(0.5)
    # Margin 5 mirrors margin 0 about the mean: t = -sqrt(15), p = 1 - 0.015233.
    assert paired_test([1, 2, 3, 4], margin=5.0).p_t == pytest.approx(1 - 0.015233, abs=1e-6)


def test_non_inferiority_margin_agrees_with_scipy():
    # In-distribution differences of 1-3 points against a margin of -2 points: H1 is d > -0.02.
    d = [-0.01, -0.03, 0.0, 0.02]
    r = paired_test(d, margin=-0.02)
    # d + 0.02 = [0.01, -0.01, 0.02, 0.04]: mean 0.015, sd 0.0208167, t = 0.015 / 0.0104083 = 1.44115.
    assert r.mean == pytest.approx(-0.005)
    assert r.t == pytest.approx(1.441153, abs=1e-6)
    assert r.p_t == pytest.approx(t3_sf(r.t))
    assert r.p_t == pytest.approx(stats.ttest_1samp(d, -0.02, alternative="greater").pvalue)


def test_equal_differences_and_single_ones():
    r = paired_test([0.5, 0.5, 0.5])
    assert (r.sd, r.t, r.p_t, r.low, r.high) == (0.0, None, 0.0, 0.5, 0.5)
    assert paired_test([0.5, 0.5, 0.5], margin=1.0).p_t == 1.0
    at_margin = paired_test([0.5, 0.5, 0.5], margin=0.5)
    assert (at_margin.p_t, at_margin.p_wilcoxon) == (1.0, 1.0)  # no evidence either way
    # 0.51 - 0.53 is -0.020000000000000018 in floats: still exactly at the margin.
    noisy = paired_test([0.51 - 0.53] * 3, margin=-0.02)
    assert (noisy.p_t, noisy.p_wilcoxon) == (1.0, 1.0)
    one = paired_test([0.3])
    assert (one.n, one.mean, one.low, one.high, one.p_t, one.p_wilcoxon) == (1, 0.3, None, None, None, None)
    with pytest.raises(ValueError):
        paired_test([])


def test_paired_differences_drops_unmatched_units():
    a = {("i22", 101): 0.5, ("i21", 100): 0.6, ("i21", 101): 0.4}
    b = {("i21", 101): 0.1, ("i21", 100): 0.2, ("i23", 100): 0.9}
    pairs = paired_differences(a, b)
    assert [k for k, _ in pairs] == [("i21", 100), ("i21", 101)]
    assert [d for _, d in pairs] == pytest.approx([0.4, 0.3])
    assert paired_differences(a, {}) == []


def test_holm_by_hand():
    # Sorted: a 0.01 x 3 = 0.03; c 0.03 x 2 = 0.06; b 0.04 x 1 = 0.04, raised to the running max 0.06.
    assert holm({"a": 0.01, "b": 0.04, "c": 0.03}) == pytest.approx({"a": 0.03, "b": 0.06, "c": 0.06})
    # None stays None and m = 2: a 0.01 x 2, c 0.03 x 1.
    assert holm({"a": 0.01, "b": None, "c": 0.03}) == {"a": pytest.approx(0.02), "b": None, "c": pytest.approx(0.03)}
    assert holm({"a": 0.6, "b": 0.7}) == {"a": 1.0, "b": 1.0}  # min(1, 2 x 0.6), then the running max
    assert list(holm({"z": 0.5, "a": 0.1})) == ["z", "a"]
    assert holm({}) == {}


def test_hypothesis_results_holm_over_the_tested_ones():
    results = hypothesis_results({"H1": [1, 2, 3, 4], "H2": []}, {"H1": 0.0, "H2": 0.0}, {"H1": "primary", "H2": "control"})
    assert results["H2"].test is None and results["H2"].p_holm is None
    assert isinstance(results["H1"].test, PairedResult)
    assert results["H1"].p_holm == pytest.approx(0.015233, abs=1e-6)  # m = 1: unadjusted
    both = hypothesis_results({"H1": [1, 2, 3, 4], "H2": [1, 2, 3, 4]}, {"H1": 0.0, "H2": 0.0}, {"H1": "primary", "H2": "control"})
    assert both["H1"].p_holm == pytest.approx(2 * 0.015233, abs=1e-5)


ROLES = {"H1": "primary", "H2a": "control", "H2b": "control", "H3": "safety"}


def results(**p_holm):
    return {h: HypothesisResult(h, ROLES[h], -0.02 if h == "H3" else 0.0, None, p) for h, p in p_holm.items()}


@pytest.mark.parametrize("p, decision", [
    ({"H1": 0.01, "H2a": 0.02, "H2b": 0.03, "H3": 0.04}, "confirmed"),
    ({"H1": 0.01, "H2a": 0.02, "H2b": 0.30, "H3": 0.04}, "beats standard, explained by strength"),
    ({"H1": 0.01, "H2a": 0.02, "H2b": None, "H3": 0.04}, "not run"),  # a control without two pairs yet: no decision
    ({"H1": 0.01, "H2a": 0.02, "H2b": 0.03, "H3": 0.20}, "beats standard and its controls, but loses the comfort zone"),
    ({"H1": 0.01, "H2a": 0.20, "H2b": 0.03, "H3": 0.20}, "beats standard, explained by strength"),  # controls before safety
    ({"H1": 0.05, "H2a": 0.01, "H2b": 0.01, "H3": 0.01}, "not confirmed"),  # rejects only below alpha
    ({"H1": 0.40, "H2a": 0.01, "H2b": 0.01, "H3": 0.01}, "not confirmed"),
    ({"H1": None, "H2a": 0.01, "H2b": 0.01, "H3": 0.01}, "not run"),
])
def test_decide_each_branch(p, decision):
    assert decide(results(**p), ROLES) == decision


def test_decide_alpha_and_missing_primary():
    r = results(H1=0.03, H2a=0.03, H2b=0.03, H3=0.03)
    assert decide(r, ROLES) == "confirmed"
    assert decide(r, ROLES, alpha=0.01) == "not confirmed"
    assert decide({}, ROLES) == "not run"


METHOD_ARMS = {"G-a": "a", "S-a": "a", "G-b": "b", "S-b": "b", "G-c": "c", "S-c": "c", "P-a": "prioritized"}
METHOD_ROLES = {"G-a": "primary", "S-a": "safety", "G-b": "primary", "S-b": "safety", "G-c": "primary", "S-c": "safety", "P-a": "comparison"}


def test_decide_per_arm_gives_each_arm_its_verdict_from_its_own_gain_and_safety():
    p = {"G-a": 0.01, "S-a": 0.02, "G-b": 0.01, "S-b": 0.40, "G-c": 0.30, "S-c": 0.01, "P-a": 0.90}
    r = {h: HypothesisResult(h, METHOD_ROLES[h], -0.02 if h.startswith("S") else 0.0, None, x) for h, x in p.items()}
    assert decide_per_arm(r, METHOD_ARMS) == {"a": "gains and keeps the comfort zone", "b": "gains, loses the comfort zone",
                                              "c": "no gain shown"}  # the comparison enters no verdict
    assert decide_per_arm(r, METHOD_ARMS, alpha=0.015)["a"] == "gains, loses the comfort zone"  # S-a at 0.02 no longer holds
    r["S-c"] = HypothesisResult("S-c", "safety", -0.02, None, None)
    assert decide_per_arm(r, METHOD_ARMS)["c"] == "not run"  # a hypothesis without two pairs: no verdict yet
