"""Statistics over seeds: a mean and its 95% interval, comparisons between them, and how they print.

Accuracies and probabilities get a Wilson interval at the seeds' effective sample size (inside
[0, 1]); anything else (a gain, a KL, a weight) Student's t. The verdict rules in `paper` are
written in the words of `versus`: "clearly above", "above", "not above".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np

from .study_dir import ACCURACY_EPISODES, at, series

# Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom; beyond, 1.96 + 2.4/df is
# within 0.003 of the exact value.
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


@dataclass(frozen=True)
class Estimate:
    """A mean over seeds (or examples) and its 95% interval; no interval from a single value."""

    mean: float
    low: float | None
    high: float | None
    n: int


def t_quantile(df: int) -> float:
    return T_975[df - 1] if df <= len(T_975) else 1.96 + 2.4 / df


def t_interval(values: Sequence[float]) -> Estimate | None:
    """Mean ± t_{0.975, n-1} * s / sqrt(n) over independent runs (seeds)."""
    x = np.asarray([v for v in values if v is not None], dtype=float)
    if len(x) == 0:
        return None
    if len(x) == 1:
        return Estimate(float(x[0]), None, None, 1)
    half = t_quantile(len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
    return Estimate(float(x.mean()), float(x.mean() - half), float(x.mean() + half), len(x))


def wilson_interval(p: float, n: float, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion p observed on n trials (Wilson 1927):
    (p + z²/2n ± z sqrt(p(1 - p)/n + z²/4n²)) / (1 + z²/n). It lies inside [0, 1] and, unlike
    p ± z sqrt(p(1 - p)/n), does not shrink to a point at p = 0 or 1."""
    center, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, (center - half) / (1 + z * z / n)), min(1.0, (center + half) / (1 + z * z / n))


def proportion_interval(values: Sequence[float], trials: int | None = None) -> Estimate | None:
    """Mean over seeds of a proportion (an accuracy, a probability) and its 95% interval, inside [0, 1].

    The Wilson interval at the effective sample size n_eff = p(1 - p) / v, v = s² / n the variance of
    the mean over the n seeds, with Student's t_{0.975, n-1} for z: the design-effect correction of
    Korn & Graubard (1998) for proportions whose units are not independent trials. Away from 0 and 1
    it is close to the t-interval; near them it stays inside. With ``trials`` (the trials behind each
    seed's proportion) n_eff is at most the pooled trials, so that seeds that agree (all at 0, say)
    give the interval of n x trials draws, not a point.
    """
    x = np.asarray([v for v in values if v is not None], dtype=float)
    if len(x) == 0:
        return None
    if len(x) == 1:
        return Estimate(float(x[0]), None, None, 1)
    p, n = float(x.mean()), len(x)
    variance = x.var(ddof=1) / n
    n_eff = min(p * (1 - p) / variance if variance > 0 else math.inf, trials * n if trials else math.inf)
    if math.isinf(n_eff):  # every seed the same and no count of trials: nothing to widen it with
        return Estimate(p, p, p, n)
    low, high = wilson_interval(p, n_eff, t_quantile(n - 1))
    return Estimate(p, low, high, n)


def over_seeds(values: Sequence[float], key: str, runs: list[list[dict]] | None = None) -> Estimate | None:
    """The mean over seeds of ``key`` and its 95% interval: `proportion_interval` for an accuracy or
    a probability of the right token (with the episodes behind an accuracy, when ``runs`` knows
    them), `t_interval` for anything else (a gain, a KL, a weight)."""
    if key in ACCURACY_EPISODES or key.startswith("p_correct/"):
        return proportion_interval(values, getattr(runs, "trials", {}).get(key))
    return t_interval(values)


def seeds_at(runs: list[list[dict]], key: str, which: Literal["initial", "final"]) -> Estimate | None:
    """`over_seeds` of each run's first or last logged ``key``."""
    return over_seeds(at(runs, key, which), key, runs)


def band(runs: list[list[dict]], key: str) -> tuple[list[int], list[Estimate]]:
    """Episodes where every run logged ``key``, and the mean with its interval over runs at each."""
    per_run = [series(r, key) for r in runs]
    per_run = [s for s in per_run if s]
    if not per_run:
        return [], []
    xs = sorted(set.intersection(*(set(s) for s in per_run)))
    return xs, [over_seeds([s[x] for s in per_run], key, runs) for x in xs]


def versus(a: Estimate | None, b: Estimate | None) -> Literal["clearly above", "above", "not above"]:
    if a is None or b is None:
        return "not above"
    if a.low is not None and b.high is not None and a.low > b.high:
        return "clearly above"
    return "above" if a.mean > b.mean else "not above"


VERDICT = {"clearly above": "reproduced", "above": "partly", "not above": "not reproduced"}


def pct(e: Estimate | None, digits: int = 1) -> str:
    if e is None:
        return "-"
    ci = f" [{100 * e.low:.{digits}f}, {100 * e.high:.{digits}f}]" if e.low is not None else ""
    return f"{100 * e.mean:.{digits}f}%{ci}"


def num(e: Estimate | None, digits: int = 3, sign: bool = False) -> str:
    if e is None:
        return "-"
    f = f"{'+' if sign else ''}.{digits}f"
    ci = f" [{e.low:{f}}, {e.high:{f}}]" if e.low is not None else ""
    return f"{e.mean:{f}}{ci}"


def weight_text(mean: float | None) -> str:
    """A mean KL weight as the report and the README show it: three significant digits (the weights
    span 1 to 0.001), "-" for an arm without a penalty."""
    return "-" if mean is None else f"{mean:#.3g}"
