"""The paired analysis of a pre-registered study: paired differences, their tests, Holm's correction
and the decision rule (docs/preregistration/, the ``confirm`` experiment of a preset).

Every arm of the study runs from the same model instances at the same RL seeds, so a unit is an
(instance, seed) pair and a hypothesis compares two arms by the differences a - b over the units
both arms finished. Each hypothesis is tested one-sided (H1: mean difference > margin) by the
paired t-test, with the Wilcoxon signed-rank test beside it as a check that needs no normality;
the decision uses the t-tests' p-values after Holm's correction over all the study's hypotheses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Hashable, Literal, Mapping, Sequence, TypeVar

import numpy as np
from scipy import stats

K = TypeVar("K", bound=Hashable)
Role = Literal["primary", "control", "safety", "comparison"]

# Differences are of accuracies on a few hundred prompts (multiples of 1/100 or 1/200): rounding
# d - margin to 12 decimals makes a difference that equals the margin a zero, not a ±1e-17.
DECIMALS = 12


@dataclass(frozen=True)
class PairedResult:
    """The one-sided paired tests of H0: mean difference <= margin against H1: mean difference > margin.

    ``mean``, ``sd``, ``low``, ``high``: the mean difference, its standard deviation (ddof 1) and its
    two-sided 95% t interval, in the units of the differences (None from one difference);
    ``t``: (mean - margin) / (sd / sqrt(n)) with n - 1 degrees of freedom (None when sd = 0);
    ``p_t``, ``p_wilcoxon``: the one-sided p-values (None from fewer than two differences).
    """

    n: int
    mean: float
    sd: float | None
    low: float | None
    high: float | None
    margin: float
    t: float | None
    p_t: float | None
    p_wilcoxon: float | None


@dataclass(frozen=True)
class HypothesisResult:
    """One hypothesis of the study: its role, its test (None without a pair) and its p-value after
    Holm's correction over every hypothesis of the study (None without a test)."""

    name: str
    role: Role
    margin: float
    test: PairedResult | None
    p_holm: float | None

    def rejects(self, alpha: float = 0.05) -> bool:
        """H0 rejected at ``alpha`` after Holm's correction; no test never rejects."""
        return self.p_holm is not None and self.p_holm < alpha


def paired_differences(a: Mapping[K, float], b: Mapping[K, float]) -> list[tuple[K, float]]:
    """(key, a[key] - b[key]) over the keys both have, sorted by key. A key is a unit of the design,
    an (instance, seed) pair: a unit one arm did not finish has no pair and is dropped."""
    return [(k, a[k] - b[k]) for k in sorted(set(a) & set(b))]


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
    d = np.asarray(differences, dtype=float)
    n = len(d)
    if n == 0:
        raise ValueError("paired_test needs at least one difference")
    mean = float(d.mean())
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
    p_w = 1.0 if not x.any() else float(stats.wilcoxon(x, zero_method="wilcox", alternative="greater").pvalue)
    return PairedResult(n, mean, sd, mean - half, mean + half, margin, t, p_t, p_w)


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
                       roles: Mapping[str, Role]) -> dict[str, HypothesisResult]:
    """Each hypothesis's `paired_test` on its ``differences`` at its margin, and its `holm` p-value
    over all of them (the t-tests' p-values: the pre-registered test)."""
    tests = {h: paired_test(d, margins[h]) if len(d) else None for h, d in differences.items()}
    adjusted = holm({h: t.p_t if t else None for h, t in tests.items()})
    return {h: HypothesisResult(h, roles[h], margins[h], tests[h], adjusted[h]) for h in differences}


DECISIONS = ("confirmed", "beats standard, explained by strength", "beats standard and its controls, but loses the comfort zone",
             "not confirmed", "not run")


def decide(results: Mapping[str, HypothesisResult], roles: Mapping[str, Role], alpha: float = 0.05) -> str:
    """The pre-registered decision rule.

    Roles: "primary" (H1: prioritized > standard), "control" (H2a, H2b: prioritized > each
    strength-matched control), "safety" (H3: prioritized's in-distribution accuracy at most 2
    points below standard's, tested as a non-inferiority test with margin -0.02). A hypothesis
    "rejects" when its Holm-adjusted t-test p-value < alpha (0.05). Decision:

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


def decide_per_arm(results: Mapping[str, HypothesisResult], arms: Mapping[str, str], alpha: float = 0.05) -> dict[str, str]:
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
