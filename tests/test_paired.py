"""The paired analysis of the pre-registered study (report/paired.py), against numbers computed by hand."""

import math

import pytest
from scipy import stats

from critical_tokens.report.paired import (EquivalenceResult, HypothesisResult, PairedResult, decide, decide_per_arm, decide_placement,
                                          decision_summary, holm, hypothesis_results, instance_means, paired_differences, paired_test,
                                          placement_share, tost)


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


def test_tost_by_hand():
    r = tost([0.5, -0.5, 1.0, 0.0], margin=2.0)
    # mean 1.0 / 4 = 0.25; deviations 0.25, -0.75, 0.75, -0.25: sd² = (0.0625 + 0.5625 + 0.5625 + 0.0625) / 3 = 5/12;
    # se = sd / 2 = sqrt(5/48) = 0.322749.
    # H0 d <= -2: t_lower = (0.25 + 2) / se = 2.25 sqrt(48/5) = 6.971370, p_lower = P(T_3 >= 6.971370);
    # H0 d >= +2: t_upper = (0.25 - 2) / se = -1.75 sqrt(48/5) = -5.422177, p_upper = P(T_3 <= -5.422177) = P(T_3 >= 5.422177).
    # The TOST p is the larger: t_upper is nearer 0, so p = p_upper.
    assert (r.n, r.mean, r.margin) == (4, 0.25, 2.0)
    assert r.sd == pytest.approx(math.sqrt(5 / 12))
    assert (r.t_lower, r.t_upper) == (pytest.approx(2.25 * math.sqrt(48 / 5)), pytest.approx(-1.75 * math.sqrt(48 / 5)))
    assert r.p_lower == pytest.approx(t3_sf(2.25 * math.sqrt(48 / 5)), rel=1e-9)
    assert r.p_upper == pytest.approx(t3_sf(1.75 * math.sqrt(48 / 5)), rel=1e-9)
    assert r.p_t == r.p_upper > r.p_lower
    # 90% interval: 0.25 ± t_{0.95,3} se = 0.25 ± 2.353363 x 0.322749 = 0.25 ± 0.759545, inside ±2.
    assert r.level == pytest.approx(0.90)
    assert (r.low_tost, r.high_tost) == (pytest.approx(0.25 - 0.759545, abs=1e-6), pytest.approx(0.25 + 0.759545, abs=1e-6))
    # Wilcoxon: d + 2 = [2.5, 1.5, 3, 2] all positive, p = 1/16; d - 2 = [-1.5, -2.5, -1, -2] all negative, p = 1/16.
    assert r.p_wilcoxon == pytest.approx(1 / 16)


def test_tost_fails_where_the_interval_reaches_the_margin():
    # The same differences at margin 1: t_upper = (0.25 - 1) / se = -0.75 sqrt(48/5) = -2.323790: p = P(T_3 >= 2.323790) = 0.051...
    r = tost([0.5, -0.5, 1.0, 0.0], margin=1.0)
    assert r.p_t == pytest.approx(t3_sf(0.75 * math.sqrt(48 / 5)), rel=1e-9) and r.p_t > 0.05
    assert r.high_tost > 1.0  # the 90% interval does not exclude +1
    # At alpha 0.1 the interval is 80%: 0.25 + t_{0.9,3} se = 0.25 + 1.637744 x 0.322749 = 0.778580 < 1, and p < 0.1.
    wide = tost([0.5, -0.5, 1.0, 0.0], margin=1.0, alpha=0.1)
    assert wide.level == pytest.approx(0.8) and wide.high_tost == pytest.approx(0.778580, abs=1e-6) and wide.p_t < 0.1


def test_tost_of_equal_and_single_differences():
    inside, edge = tost([0.5] * 3, margin=1.0), tost([1.0] * 3, margin=1.0)
    assert (inside.p_t, inside.t_lower, inside.low_tost, inside.high_tost) == (0.0, None, 0.5, 0.5)
    assert edge.p_t == 1.0  # at the margin is not inside it
    one = tost([0.3], margin=1.0)
    assert (one.n, one.p_t, one.low_tost) == (1, None, None)
    with pytest.raises(ValueError):
        tost([0.1, 0.2], margin=0.0)


def test_holm_runs_over_superiority_and_equivalence_together():
    d = [0.5, -0.5, 1.0, 0.0]
    r = hypothesis_results({"S": [1, 2, 3, 4], "E": d}, {"S": 0.0, "E": 2.0}, {"S": "superiority", "E": "equivalence"})
    assert isinstance(r["E"].test, EquivalenceResult) and isinstance(r["S"].test, PairedResult)
    p_s, p_e = 0.015233, t3_sf(1.75 * math.sqrt(48 / 5))  # the two tests by hand above; p_e < p_s
    assert r["E"].p_holm == pytest.approx(2 * p_e, rel=1e-6)
    assert r["S"].p_holm == pytest.approx(max(2 * p_e, p_s), abs=1e-6)
    assert r["E"].rejects() and r["S"].rejects()


def test_instance_means_are_each_instances_mean_over_its_seeds():
    pairs = [(("i2", 100), 0.3), (("i1", 100), 0.1), (("i1", 101), 0.2), (("i2", 101), 0.5)]
    assert instance_means(pairs) == {"i2": pytest.approx(0.4), "i1": pytest.approx(0.15)}


PLACEMENT_ROLES = {"S-acc": "superiority", "E-acc": "equivalence", "S-kl": "superiority", "E-kl": "equivalence", "C": "comparison"}


@pytest.mark.parametrize("p, verdict", [
    ({"S-acc": 0.01, "E-acc": 0.50, "S-kl": 0.60, "E-kl": 0.70}, "placement adds"),
    ({"S-acc": 0.60, "E-acc": 0.50, "S-kl": 0.01, "E-kl": 0.01}, "placement adds"),  # on the comfort endpoint; superiority first
    ({"S-acc": 0.60, "E-acc": 0.01, "S-kl": 0.60, "E-kl": 0.02}, "strength explains it, within the margins"),
    ({"S-acc": 0.60, "E-acc": 0.01, "S-kl": 0.60, "E-kl": 0.20}, "undecided"),  # one equivalence not shown
    ({"S-acc": 0.60, "E-acc": 0.01, "S-kl": None, "E-kl": 0.01}, "not run"),
])
def test_decide_placement_each_branch(p, verdict):
    r = {h: HypothesisResult(h, PLACEMENT_ROLES[h], 0.0, None, x) for h, x in {**p, "C": 0.001}.items()}
    groups = {h: "beta 8" for h in r} | {"C": "beta 4"}  # a group with only a comparison decides nothing either way
    assert decide_placement(r, groups) == {"beta 8": verdict, "beta 4": "undecided"}


def test_decision_summary_lists_each_verdicts_names_and_the_comparisons():
    r = {h: HypothesisResult(h, PLACEMENT_ROLES[h], 0.0, None, 0.01) for h in ("S-acc", "C")}
    verdicts = {"beta 4": "placement adds", "beta 8": "undecided", "beta 16": "placement adds"}
    assert decision_summary(verdicts, r, 0.05) == "placement adds: beta 4, beta 16; undecided: beta 8; comparisons rejected: C of C"
    assert decision_summary({}, {}, 0.05) == "not run"


def test_placement_share_by_hand():
    # Units a..d: P - S = 4, 2, 6, 4 (mean 4); P - M = 1, 1, 2, 0 (mean 1): share 1 / 4 = 0.25.
    standard = {"a": 10, "b": 10, "c": 10, "d": 10, "e": 9}
    prioritized = {"a": 14, "b": 12, "c": 16, "d": 14}
    matched = {"a": 13, "b": 11, "c": 14, "d": 14, "f": 3}  # e and f: not in all three arms
    s = placement_share(prioritized, matched, standard)
    assert (s.n, s.share, s.resamples, s.seed) == (4, 0.25, 10_000, 0)
    # A resample's ratio sum(P - M) / sum(P - S) is a mean of the units' own ratios (a 1/4, b 1/2, c 1/3, d 0)
    # weighted by P - S > 0, so it lies in [0, 1/2]: all d gives 0, all b gives 1/2.
    assert 0.0 <= s.low < 0.25 < s.high <= 0.5
    assert placement_share(prioritized, matched, standard) == s  # the fixed seed: the same interval
    assert placement_share(prioritized, matched, standard, seed=1) != s
    # Strength explains it exactly where P - M = 0 at every unit; a share of 1 where M gains nothing over S.
    assert placement_share(prioritized, prioritized, standard).share == 0.0
    assert placement_share(prioritized, standard, standard).share == 1.0
    assert placement_share({"a": 1}, {"a": 1}, {"a": 1}).share is None  # P - S = 0: no share
    assert placement_share({"a": 2}, {"a": 1}, {"a": 0}).low is None  # one unit: no interval
