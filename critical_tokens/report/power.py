"""How many paired units a study needs: the power of its one-sided paired t-test and of its TOST.

Each hypothesis is tested at alpha / h, Holm's first (strictest) step over h hypotheses: the worst
case, so the power a pre-registration quotes holds whatever the other hypotheses give. A unit is an
(instance, seed) pair; ``sd`` is the standard deviation of the paired differences (cpu-confirm's
H2b: 4.4 points of sampled N+1 accuracy).

    python -m critical_tokens.report.power --sd 4.4 --effect 3 --margin 3 --hypotheses 12 --n 24 32 36 40 48
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from typing import Callable

from scipy import integrate, stats

from ..config import add_arguments, arg, check_range, check_types, from_namespace
from ..runs import UserError


def power_superiority(sd: float, effect: float, n: int, alpha: float = 0.05, hypotheses: int = 1) -> float:
    """Power of the one-sided paired t-test of H0: mean difference <= 0 when it is ``effect``.

    With a = alpha / hypotheses, t = mean / (s / sqrt(n)) follows the noncentral t with n - 1 degrees
    of freedom and noncentrality effect sqrt(n) / sd, so power = P(T > t_{1-a, n-1}) (`scipy.stats.nct`).
    """
    a = alpha / hypotheses
    return float(stats.nct.sf(stats.t.ppf(1 - a, n - 1), n - 1, effect * math.sqrt(n) / sd))


def power_tost(sd: float, margin: float, n: int, alpha: float = 0.05, hypotheses: int = 1, difference: float = 0.0) -> float:
    """Power of TOST (equivalence within ±``margin``) when the true mean difference is ``difference``.

    With a = alpha / hypotheses and c = t_{1-a, n-1}, both one-sided tests reject when
    -margin + c s / sqrt(n) < mean < margin - c s / sqrt(n). The mean ~ N(difference, sd² / n) and
    (n - 1) s² / sd² ~ chi²_{n-1} are independent, so the power is the integral over v = (n - 1) s² / sd²
    of [Phi((margin - c s/sqrt(n) - difference) / (sd/sqrt(n))) - Phi((-margin + c s/sqrt(n) - difference) / (sd/sqrt(n)))]
    where positive (Owen 1965: the exact power, not the noncentral-t bound P(T_lower > c) + P(T_upper < -c) - 1,
    which ignores that the two statistics share s).
    """
    c, df, se = stats.t.ppf(1 - alpha / hypotheses, n - 1), n - 1, sd / math.sqrt(n)
    v_max = df * (margin / (c * se)) ** 2  # beyond it s is so large that no mean passes both tests

    def passing(v: float) -> float:
        half = margin - c * se * math.sqrt(v / df)  # the mean must lie within difference ± ... of 0: |mean| < half
        return (stats.norm.cdf((half - difference) / se) - stats.norm.cdf((-half - difference) / se)) * stats.chi2.pdf(v, df)

    return float(integrate.quad(passing, 0, v_max, limit=200)[0])


def smallest_n(power: Callable[[int], float], target: float, limit: int = 100_000) -> int | None:
    """The smallest n >= 2 with power(n) >= ``target`` (None below ``limit``); power grows with n."""
    low, high = 2, 2
    while power(high) < target:  # doubling, then bisection
        low, high = high + 1, 2 * high
        if high > limit:
            return None
    while low < high:
        mid = (low + high) // 2
        low, high = (mid + 1, high) if power(mid) < target else (low, mid)
    return high


@dataclass(frozen=True)
class PowerConfig:
    sd: float = arg(4.4, "standard deviation of the paired differences, in the metric's units (cpu-confirm's H2b: 4.4 points)")
    effect: float = arg(3.0, "the true mean difference the superiority test should detect")
    margin: float = arg(3.0, "the equivalence margin: TOST shows |mean difference| < margin")
    difference: float = arg(0.0, "the true mean difference under which TOST's power is computed")
    alpha: float = arg(0.05, "family-wise level")
    hypotheses: int = arg(12, "hypotheses under Holm's correction: each tested at alpha / hypotheses (its worst case)")
    target: float = arg(0.8, "the power whose smallest n is printed")
    n: tuple[int, ...] = arg((24, 32, 36, 40, 48), "the numbers of paired units to tabulate")


def validate(config: PowerConfig) -> None:
    check_types(config)
    check_range(config, ("sd", "effect", "margin"), 0, low_open=True)
    check_range(config, ("alpha", "target"), 0, 1, low_open=True, high_open=True)
    check_range(config, ("hypotheses",), 1)
    if any(n < 2 for n in config.n):
        raise UserError(f"--n: each number of units must be >= 2, got {min(config.n)}")


def table(config: PowerConfig) -> list[str]:
    """The power at each n and the smallest n reaching the target, as printed."""
    c = config
    superiority = lambda n: power_superiority(c.sd, c.effect, n, c.alpha, c.hypotheses)  # noqa: E731
    equivalence = lambda n: power_tost(c.sd, c.margin, n, c.alpha, c.hypotheses, c.difference)  # noqa: E731
    lines = [f"Paired differences with sd {c.sd:g}; alpha {c.alpha:g} over {c.hypotheses} hypotheses, each at "
             f"{c.alpha:g} / {c.hypotheses} = {c.alpha / c.hypotheses:.4g} (Holm's worst case).",
             f"superiority: one-sided paired t-test of mean > 0 when it is {c.effect:g} (noncentral t);",
             f"equivalence: TOST within ±{c.margin:g} when the true difference is {c.difference:g} (exact, Owen 1965).", "",
             "| n | superiority | equivalence (TOST) |", "|---|---|---|"]
    lines += [f"| {n} | {superiority(n):.3f} | {equivalence(n):.3f} |" for n in c.n]
    found = {name: smallest_n(power, c.target) for name, power in (("superiority", superiority), ("equivalence", equivalence))}
    lines += ["", f"smallest n with power >= {c.target:g}: " + ", ".join(f"{k} {v if v is not None else '> 100000'}" for k, v in found.items())]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m critical_tokens.report.power", description=__doc__.split("\n\n")[0])
    add_arguments(parser, PowerConfig)
    try:
        config = from_namespace(PowerConfig, parser.parse_args(argv))
        validate(config)
    except UserError as e:
        print(f"power: error: {e}", file=sys.stderr)
        return 2
    print("\n".join(table(config)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
