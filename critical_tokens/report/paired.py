"""The paired analysis of a pre-registered study: paired differences, their tests, Holm's correction
and the decision rule (docs/preregistration/, the ``confirm`` experiment of a preset).

Every arm of the study runs from the same model instances at the same RL seeds, so a unit is an
(instance, seed) pair and a hypothesis compares two arms by the differences a - b over the units
both arms finished (b - a where lower is better). A hypothesis is tested one-sided (H1: mean
difference > margin; superiority at margin >= 0, non-inferiority below 0) by the paired t-test, or,
in the role "equivalence", by two one-sided tests (TOST, H1: |mean difference| < margin); the
Wilcoxon signed-rank test beside each as a check that needs no normality. The decision uses the
t-tests' p-values after Holm's correction over all the study's hypotheses, of every kind together.
The same tests on the per-instance means of the differences (`instance_means`) are the
instance-level analysis, the instance being the unit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Hashable, Literal, Mapping, Sequence, TypeVar

import numpy as np
from scipy import stats

from ..study.design import ALPHA, Role

K = TypeVar("K", bound=Hashable)

# Differences are of accuracies on a few hundred prompts (multiples of 1/100 or 1/200): rounding
# d - margin to 12 decimals makes a difference that equals the margin a zero, not a ±1e-17.
DECIMALS = 12


@dataclass(frozen=True)
class Differences:
    """What every paired test reports of its differences: their number ``n``, ``mean``, standard
    deviation ``sd`` (ddof 1) and two-sided 95% t interval ``low``, ``high``, in the units of the
    differences (None from one difference), and the test's ``margin``."""

    n: int
    mean: float
    sd: float | None
    low: float | None
    high: float | None
    margin: float


@dataclass(frozen=True)
class PairedResult(Differences):
    """The one-sided paired tests of H0: mean difference <= margin against H1: mean difference > margin.

    ``t``: (mean - margin) / (sd / sqrt(n)) with n - 1 degrees of freedom (None when sd = 0);
    ``p_t``, ``p_wilcoxon``: the one-sided p-values (None from fewer than two differences).
    """

    t: float | None
    p_t: float | None
    p_wilcoxon: float | None


@dataclass(frozen=True)
class EquivalenceResult(Differences):
    """The two one-sided paired tests (TOST) of H0: |mean difference| >= margin against H1: it is
    inside (-margin, +margin).

    ``low_tost``, ``high_tost``: the (1 - 2 alpha) interval (``level``: 90% at alpha 0.05), inside the
    margins exactly when both tests reject at alpha; ``t_lower`` = (mean + margin) / se tests
    H0 d <= -margin (p ``p_lower``), ``t_upper`` = (mean - margin) / se tests H0 d >= +margin
    (p ``p_upper``); ``p_t`` = max(p_lower, p_upper), the TOST p-value; ``p_wilcoxon``: the same max of
    two one-sided Wilcoxon tests. None where a single difference gives none, t's None when sd = 0.
    """

    level: float
    low_tost: float | None
    high_tost: float | None
    t_lower: float | None
    t_upper: float | None
    p_lower: float | None
    p_upper: float | None
    p_t: float | None
    p_wilcoxon: float | None


@dataclass(frozen=True)
class HypothesisResult:
    """One hypothesis of the study: its role, its test (None without a pair) and its p-value after
    Holm's correction over every hypothesis of the study (None without a test). An equivalence
    hypothesis's test is its TOST; it "rejects" when equivalence holds."""

    name: str
    role: Role
    margin: float
    test: PairedResult | EquivalenceResult | None
    p_holm: float | None

    def rejects(self, alpha: float = ALPHA) -> bool:
        """H0 rejected at ``alpha`` after Holm's correction; no test never rejects."""
        return self.p_holm is not None and self.p_holm < alpha


def paired_differences(a: Mapping[K, float], b: Mapping[K, float]) -> list[tuple[K, float]]:
    """(key, a[key] - b[key]) over the keys both have, sorted by key. A key is a unit of the design,
    an (instance, seed) pair: a unit one arm did not finish has no pair and is dropped."""
    return [(k, a[k] - b[k]) for k in sorted(set(a) & set(b))]


def _nonempty(differences: Sequence[float], test: str) -> np.ndarray:
    d = np.asarray(differences, dtype=float)
    if len(d) == 0:
        raise ValueError(f"{test} needs at least one difference")
    return d


def paired_test(differences: Sequence[float], margin: float = 0.0) -> PairedResult:
    """The paired t-test and the Wilcoxon signed-rank test of H1: mean difference > ``margin``.

    t-test (Student 1908): t = (mean - margin) / (sd / sqrt(n)), p = P(T_{n-1} >= t) by
    `scipy.stats.t.sf`; the 95% interval is mean ± t_{0.975, n-1} sd / sqrt(n). When every
    difference is the same (sd = 0) t is undefined and the data leave no doubt: p = 0 if the mean
    is above the margin, else 1.
    Wilcoxon (1945), on d - margin, alternative "greater" (`scipy.stats.wilcoxon`): differences equal
    to the margin are dropped before ranking (zero_method "wilcox", scipy's default); when all are,
    p = 1 (no evidence of either sign). A negative margin makes it a non-inferiority test.
    """
    d = _nonempty(differences, "paired_test")
    n, mean = len(d), float(d.mean())
    if n == 1:
        return PairedResult(1, mean, None, None, None, margin, None, None, None)
    x = np.round(d - margin, DECIMALS)
    sd = float(d.std(ddof=1))
    if np.ptp(x) == 0:  # every difference the same: no spread to scale t by
        sd = 0.0
        t, p_t = None, 0.0 if x[0] > 0 else 1.0
    else:
        t = float(x.mean() / (sd / math.sqrt(n)))
        p_t = float(stats.t.sf(t, n - 1))
    half = float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
    return PairedResult(n, mean, sd, mean - half, mean + half, margin, t, p_t, _wilcoxon(x, "greater"))


def _wilcoxon(x: np.ndarray, alternative: Literal["greater", "less"]) -> float:
    """The one-sided Wilcoxon signed-rank p-value of ``x`` (zeros dropped, scipy's default); 1 when all are zero."""
    return 1.0 if not x.any() else float(stats.wilcoxon(x, zero_method="wilcox", alternative=alternative).pvalue)


def tost(differences: Sequence[float], margin: float, alpha: float = ALPHA) -> EquivalenceResult:
    """Two one-sided paired t-tests of equivalence within ±``margin`` (Schuirmann 1987).

    se = sd / sqrt(n); t_lower = (mean + margin) / se, p_lower = P(T_{n-1} >= t_lower) (H0: d <= -margin);
    t_upper = (mean - margin) / se, p_upper = P(T_{n-1} <= t_upper) (H0: d >= +margin); the TOST
    p-value is max(p_lower, p_upper). Equivalently, equivalence at alpha holds when the (1 - 2 alpha)
    interval mean ± t_{1-alpha, n-1} se lies inside (-margin, +margin). When every difference is the
    same (sd = 0): p = 0 if it is strictly inside the margins, else 1. Wilcoxon beside it: the max of
    the tests of d + margin > 0 and d - margin < 0.
    """
    if not margin > 0:
        raise ValueError(f"an equivalence margin must be > 0, got {margin}")
    d = _nonempty(differences, "tost")
    n, mean = len(d), float(d.mean())
    if n == 1:
        return EquivalenceResult(1, mean, None, None, None, margin, 1 - 2 * alpha, *[None] * 8)
    above, below = np.round(d + margin, DECIMALS), np.round(d - margin, DECIMALS)  # > 0 and < 0 inside the margins
    sd = 0.0 if np.ptp(above) == 0 else float(d.std(ddof=1))  # every difference the same: no spread to scale t by
    se = sd / math.sqrt(n)
    if sd == 0:
        t_lower, t_upper = None, None
        p_lower, p_upper = (0.0 if above[0] > 0 else 1.0), (0.0 if below[0] < 0 else 1.0)
    else:
        t_lower, t_upper = float(above.mean() / se), float(below.mean() / se)
        p_lower, p_upper = float(stats.t.sf(t_lower, n - 1)), float(stats.t.cdf(t_upper, n - 1))
    half95, half_tost = float(stats.t.ppf(0.975, n - 1)) * se, float(stats.t.ppf(1 - alpha, n - 1)) * se
    p_w = max(_wilcoxon(above, "greater"), _wilcoxon(below, "less"))
    return EquivalenceResult(n, mean, sd, mean - half95, mean + half95, margin, 1 - 2 * alpha, mean - half_tost, mean + half_tost,
                             t_lower, t_upper, p_lower, p_upper, max(p_lower, p_upper), p_w)


def holm(pvalues: Mapping[K, float | None]) -> dict[K, float | None]:
    """Holm's step-down adjusted p-values (Holm 1979), in the order of ``pvalues``.

    With the m p-values that are not None sorted p_(1) <= ... <= p_(m), the adjusted p_(i) is
    max over j <= i of min(1, (m - j + 1) p_(j)); rejecting where it is below alpha keeps the
    family-wise error rate at alpha. None (a hypothesis without a test) stays None and does not
    count in m.
    """
    tested = sorted(((k, p) for k, p in pvalues.items() if p is not None), key=lambda kp: kp[1])  # stable: ties keep their order
    m, running, adjusted = len(tested), 0.0, {}
    for j, (k, p) in enumerate(tested, start=1):
        running = max(running, min(1.0, (m - j + 1) * p))
        adjusted[k] = running
    return {k: adjusted.get(k) for k in pvalues}


def hypothesis_results(differences: Mapping[str, Sequence[float]], margins: Mapping[str, float],
                       roles: Mapping[str, Role], alpha: float = ALPHA) -> dict[str, HypothesisResult]:
    """Each hypothesis's test on its ``differences`` at its margin (`tost` for the role
    "equivalence", `paired_test` for every other), and its `holm` p-value over all of them (the
    t-tests' p-values: the pre-registered test)."""
    def test(h: str, d: Sequence[float]) -> PairedResult | EquivalenceResult:
        return tost(d, margins[h], alpha) if roles[h] == "equivalence" else paired_test(d, margins[h])

    tests = {h: test(h, d) if len(d) else None for h, d in differences.items()}
    adjusted = holm({h: t.p_t if t else None for h, t in tests.items()})
    return {h: HypothesisResult(h, roles[h], margins[h], tests[h], adjusted[h]) for h in differences}


DECISIONS = ("confirmed", "beats standard, explained by strength", "beats standard and its controls, but loses the comfort zone",
             "not confirmed", "not run")


def decide(results: Mapping[str, HypothesisResult], roles: Mapping[str, Role], alpha: float = ALPHA) -> str:
    """The pre-registered decision rule.

    Roles: "primary" (H1: prioritized > standard), "control" (H2a, H2b: prioritized > each
    strength-matched control), "safety" (H3: prioritized's in-distribution accuracy at most 2
    points below standard's, tested as a non-inferiority test with margin -0.02). A hypothesis
    "rejects" when its Holm-adjusted t-test p-value < alpha (`ALPHA` unless the study sets it). Decision:

    - "confirmed" when the primary and every control reject and every safety rejects (holds);
    - "beats standard, explained by strength" when the primary rejects but some control does not;
    - "beats standard and its controls, but loses the comfort zone" when primary and controls
      reject but a safety does not;
    - "not confirmed" when the primary does not reject;
    - "not run" when any hypothesis has no data.

    "No data": no p-value (fewer than two paired units). The rule needs every hypothesis: a study
    stopped before a control had two pairs decides nothing yet.
    """
    of = {role: [h for h, r in roles.items() if r == role] for role in ("primary", "control", "safety")}
    if not of["primary"] or any(h not in results or results[h].p_holm is None for h in roles):
        return "not run"
    rejects = {h: h in results and results[h].rejects(alpha) for h in roles}
    if not all(rejects[h] for h in of["primary"]):
        return "not confirmed"
    if not all(rejects[h] for h in of["control"]):
        return "beats standard, explained by strength"
    if not all(rejects[h] for h in of["safety"]):
        return "beats standard and its controls, but loses the comfort zone"
    return "confirmed"


VERDICTS = ("gains and keeps the comfort zone", "gains, loses the comfort zone", "no gain shown", "not run")


def decide_per_arm(results: Mapping[str, HypothesisResult], arms: Mapping[str, str], alpha: float = ALPHA) -> dict[str, str]:
    """The pre-registered per-arm rule of a study that compares several methods with one baseline.

    ``arms`` maps each hypothesis to the arm it judges. For each arm with a "primary" hypothesis
    (its gain over the baseline) and its "safety" hypotheses (its comfort zone no worse than the
    baseline's by more than the margin), after Holm over every hypothesis of the study:

    - "gains and keeps the comfort zone": the primary rejects and every safety rejects (holds);
    - "gains, loses the comfort zone": the primary rejects and some safety does not;
    - "no gain shown": the primary does not reject;
    - "not run": one of its hypotheses has no data (fewer than two pairs).

    "comparison" and "control" hypotheses do not enter an arm's verdict (they are read one by one).
    Returns {arm: verdict} in the order of the primary hypotheses.
    """
    verdicts = {}
    for h, r in results.items():
        if r.role != "primary":
            continue
        arm = arms[h]
        safety = [results[k] for k in results if arms[k] == arm and results[k].role == "safety"]
        if r.p_holm is None or any(x.p_holm is None for x in safety):
            verdicts[arm] = "not run"
        elif not r.rejects(alpha):
            verdicts[arm] = "no gain shown"
        else:
            verdicts[arm] = VERDICTS[0] if all(x.rejects(alpha) for x in safety) else VERDICTS[1]
    return verdicts


def instance_means(pairs: Sequence[tuple[tuple[str, int], float]]) -> dict[str, float]:
    """The mean paired difference of each instance over its seeds, in the order instances first
    appear: the units of the instance-level analysis (k instances, k - 1 degrees of freedom), which
    treats the instance, not the (instance, seed) pair, as the unit drawn at random."""
    by_instance: dict[str, list[float]] = {}
    for (instance, _), d in pairs:
        by_instance.setdefault(instance, []).append(d)
    return {m: float(np.mean(ds)) for m, ds in by_instance.items()}


PLACEMENT_VERDICTS = ("placement adds", "strength explains it, within the margins", "undecided", "not run")


def decide_placement(results: Mapping[str, HypothesisResult], groups: Mapping[str, str], alpha: float = ALPHA) -> dict[str, str]:
    """The pre-registered rule of a study of placement against strength, one verdict per group
    (a strength, e.g. "beta 4", with its prioritized arm and the uniform arm matched to it).

    ``groups`` maps each hypothesis to its group. Per group, after Holm over every hypothesis of the
    study, from its "superiority" hypotheses (prioritized better than matched by the margin) and
    its "equivalence" hypotheses (TOST: |prioritized - matched| < margin):

    - "placement adds": some superiority hypothesis rejects;
    - "strength explains it, within the margins": every equivalence hypothesis holds (there is at
      least one) and no superiority rejects;
    - "undecided": neither;
    - "not run": one of them has no data (fewer than two pairs).

    "comparison" hypotheses enter no verdict. Returns {group: verdict} in the order groups first appear.
    """
    verdicts = {}
    for group in dict.fromkeys(groups.values()):
        mine = [r for h, r in results.items() if groups.get(h) == group and r.role in ("superiority", "equivalence")]
        superiority, equivalence = [r for r in mine if r.role == "superiority"], [r for r in mine if r.role == "equivalence"]
        if any(r.p_holm is None for r in mine):
            verdicts[group] = PLACEMENT_VERDICTS[3]
        elif any(r.rejects(alpha) for r in superiority):
            verdicts[group] = PLACEMENT_VERDICTS[0]
        elif equivalence and all(r.rejects(alpha) for r in equivalence):
            verdicts[group] = PLACEMENT_VERDICTS[1]
        else:
            verdicts[group] = PLACEMENT_VERDICTS[2]
    return verdicts


@dataclass(frozen=True)
class Share:
    """The placement share over ``n`` units: ``share`` (None when the denominator is 0) and its
    percentile bootstrap interval ``low``, ``high`` (None from fewer than two units, or where a
    resample divides 0 by 0), from ``resamples`` resamples drawn with ``seed``."""

    n: int
    share: float | None
    low: float | None
    high: float | None
    resamples: int
    seed: int


def placement_share(prioritized: Mapping[K, float], matched: Mapping[K, float], baseline: Mapping[K, float],
                    resamples: int = 10_000, seed: int = 0) -> Share:
    """The share of the prioritized arm's gain over the baseline that the matched uniform arm does
    not reach: share = mean(P - M) / mean(P - S) over the units all three arms have (0: strength
    explains all of it, 1: the matched arm gains nothing). Its 95% interval: the percentile
    bootstrap over units (Efron & Tibshirani 1993), a unit's three values resampled together
    (`scipy.stats.bootstrap`, paired), ``resamples`` resamples from ``numpy.random.default_rng(seed)``.
    The ratio of the means, not the mean of per-unit ratios, which a unit with P = S would make infinite.
    """
    units = sorted(set(prioritized) & set(matched) & set(baseline))
    gained = np.array([prioritized[u] - matched[u] for u in units])  # (n,) P - M
    total = np.array([prioritized[u] - baseline[u] for u in units])  # (n,) P - S
    n = len(units)
    if n == 0 or total.mean() == 0:
        return Share(n, None, None, None, resamples, seed)
    share = float(gained.mean() / total.mean())
    if n < 2:
        return Share(n, share, None, None, resamples, seed)

    def ratio(a, b, axis=-1):
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.mean(a, axis=axis) / np.mean(b, axis=axis)

    low, high = stats.bootstrap((gained, total), ratio, paired=True, vectorized=True, n_resamples=resamples, method="percentile",
                                rng=np.random.default_rng(seed)).confidence_interval
    bounded = math.isfinite(low) and math.isfinite(high)  # not where a resample's P - S means 0
    return Share(n, share, float(low) if bounded else None, float(high) if bounded else None, resamples, seed)


def decision_summary(verdicts: Mapping[str, str], results: Mapping[str, HypothesisResult], alpha: float) -> str:
    """A rule's verdicts (per arm or per group) in one line: the names of each verdict, then the
    comparisons that reject."""
    by_verdict = {v: [name for name, x in verdicts.items() if x == v] for v in dict.fromkeys(verdicts.values())}
    parts = [f"{verdict}: {', '.join(names)}" for verdict, names in by_verdict.items()]
    comparisons = [h for h, r in results.items() if r.role == "comparison"]
    if comparisons:
        shown = [h for h in comparisons if results[h].rejects(alpha)]
        parts.append(f"comparisons rejected: {', '.join(shown) or 'none'} of {', '.join(comparisons)}")
    return "; ".join(parts) or "not run"
