"""A pre-registered study's hypotheses, tested: the part of its report section between the per-arm
table and the decision.

Per hypothesis the paired differences over the (instance, seed) units both arms have (arm - versus,
or versus - arm where the metric is better lower), the units left out and why, the pre-registered
test (one-sided paired t-test, or TOST for an equivalence) with Holm's correction over every
hypothesis, and beside it the instance-level analysis: the same test on the per-instance means of
the differences (k instances, k - 1 degrees of freedom), Holm over that family.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from ..study.design import Hypothesis
from .paired import EquivalenceResult, HypothesisResult, hypothesis_results, instance_means, paired_differences
from .plots import Plots
from .study_runs import Unit, in_points, left_out, margin_text, unit_order, value_text, values


@dataclass(frozen=True)
class Analysis:
    """The study's hypotheses tested, pooled over units (``pooled``) and over instance means
    (``instances``, no test from fewer than two instances), with what each used and left out."""

    pairs: dict[str, list[tuple[Unit, float]]]
    left_out: dict[str, dict[Unit, str]]
    means: dict[str, dict[str, float]]
    pooled: dict[str, HypothesisResult]
    instances: dict[str, HypothesisResult]


def differences(hypothesis: Hypothesis, runs: dict[str, dict[Unit, dict]]) -> list[tuple[Unit, float]]:
    """The hypothesis's paired differences, oriented so that positive is better for ``arm``."""
    a, b = (values(runs.get(arm, {}), hypothesis.metric) for arm in (hypothesis.arm, hypothesis.versus))
    return paired_differences(b, a) if hypothesis.direction == "lower" else paired_differences(a, b)


def analyse(hypotheses: tuple[Hypothesis, ...], runs: dict[str, dict[Unit, dict]], alpha: float) -> Analysis:
    pairs = {h.name: differences(h, runs) for h in hypotheses}
    margins, roles = {h.name: h.margin for h in hypotheses}, {h.name: h.role for h in hypotheses}
    means = {h: instance_means(p) for h, p in pairs.items()}
    pooled = hypothesis_results({h: [d for _, d in p] for h, p in pairs.items()}, margins, roles, alpha)
    by_instance = hypothesis_results({h: list(m.values()) if len(m) > 1 else [] for h, m in means.items()}, margins, roles, alpha)
    gaps = {h.name: left_out(runs, (h.arm, h.versus), h.metric) for h in hypotheses}
    return Analysis(pairs, gaps, means, pooled, by_instance)


def p_text(p: float | None) -> str:
    return "-" if p is None else f"{p:.4f}" if p >= 1e-4 else f"{p:.1e}"


def _interval(metric: str, mean: float, low: float | None, high: float | None) -> str:
    return value_text(metric, mean) + (f" [{value_text(metric, low)}, {value_text(metric, high)}]" if low is not None else "")


def equivalence_text(h: Hypothesis, r: HypothesisResult, alpha: float, family: int) -> str:
    """What a TOST shows, in words: equivalence holds, or why it is not shown."""
    t, metric = r.test, h.metric
    within = margin_text(metric, h.margin, plus_minus=True)
    if t is None or t.low_tost is None:
        return f"not tested ({t.n if t else 0} pairs)"
    interval = f"the {100 * t.level:g}% interval [{value_text(metric, t.low_tost)}, {value_text(metric, t.high_tost)}]"
    if r.rejects(alpha):
        return f"equivalent within {within} ({interval} lies inside)"
    outside = [value_text(metric, m) for m, beyond in ((-h.margin, t.low_tost <= -h.margin), (h.margin, t.high_tost >= h.margin)) if beyond]
    if outside:
        return f"not shown equivalent within {within}: {interval} does not exclude {' or '.join(outside)}"
    return (f"not shown equivalent within {within}: {interval} excludes ±{value_text(metric, h.margin, sign=False)}, but Holm's "
            f"correction over the {family} hypotheses leaves p = {p_text(r.p_holm)}")


def _table(text: str, columns: list[str], rows: list[str]) -> list[str]:
    return ["", text, "", "| " + " | ".join(columns) + " |", "|---" * len(columns) + "|", *rows]


def _one_sided_row(h: Hypothesis, a: Analysis, alpha: float) -> str:
    r, t, m = a.pooled[h.name], a.pooled[h.name].test, h.metric
    shown = "-" if t is None else _interval(m, t.mean, t.low, t.high)
    return (f"| {h.name} | {h.role} | {h.compared()} | `{m}` | {value_text(m, h.margin)} | {t.n if t else 0} | "
            f"{shown} | {p_text(t and t.p_t)} | {p_text(r.p_holm)} | {p_text(t and t.p_wilcoxon)} | {'yes' if r.rejects(alpha) else 'no'} |")


def _equivalence_row(h: Hypothesis, a: Analysis, alpha: float, family: int) -> str:
    r, t, m = a.pooled[h.name], a.pooled[h.name].test, h.metric
    ts = "-" if t is None or t.t_lower is None else f"{t.t_lower:+.2f}, {t.t_upper:+.2f}"
    return (f"| {h.name} | {h.compared()} | `{m}` | {margin_text(m, h.margin, True)} | {t.n if t else 0} | "
            f"{'-' if t is None else _interval(m, t.mean, t.low, t.high)} | {ts} | {p_text(t and t.p_t)} | {p_text(r.p_holm)} | "
            f"{p_text(t and t.p_wilcoxon)} | {equivalence_text(h, r, alpha, family)} |")


def _instance_row(h: Hypothesis, a: Analysis, alpha: float, instances: tuple[str, ...]) -> str:
    name, m = h.name, h.metric
    counts = {i: sum(1 for (x, _), _ in a.pairs[name] if x == i) for i in instances}
    cells = [f"{value_text(m, a.means[name].get(i))} (n={counts[i]})" for i in instances]
    pooled, r = a.pooled[name].test, a.instances[name]
    by = (f"fewer than 2 instances ({len(a.means[name])})" if r.test is None
          else f"{_interval(m, r.test.mean, r.test.low, r.test.high)} (k={r.test.n})")
    return (f"| {name} | " + " | ".join(cells) + f" | {value_text(m, pooled.mean) if pooled else '-'} (n={pooled.n if pooled else 0}) | "
            f"{by} | {p_text(r.test and r.test.p_t)} | {p_text(r.p_holm)} | {'-' if r.test is None else 'yes' if r.rejects(alpha) else 'no'} |")


def lines(hypotheses: tuple[Hypothesis, ...], a: Analysis, alpha: float, instances: tuple[str, ...]) -> list[str]:
    """The tables: one-sided tests, equivalence tests, by instance; then the units left out."""
    one_sided = [h for h in hypotheses if h.role != "equivalence"]
    equivalence = [h for h in hypotheses if h.role == "equivalence"]
    family, out = len(hypotheses), []
    if one_sided:
        out += _table(f"Each hypothesis tests mean(arm - versus) > margin (versus - arm where lower is better) over the (instance, seed) "
                      f"units both arms have; differences in points for accuracies; one-sided paired t-test, Holm's correction over the "
                      f"{family} hypotheses, Wilcoxon signed-rank test (zeros dropped) as a check; rejects: Holm p < {alpha:g}.",
                      ["hypothesis", "role", "arm - versus", "metric", "margin", "pairs", "mean difference [95%]", "t-test p", "Holm p",
                       "Wilcoxon p", "rejects"], [_one_sided_row(h, a, alpha) for h in one_sided])
    if equivalence:
        out += _table(f"Equivalence (TOST): two one-sided paired t-tests of H0 d <= -margin and H0 d >= +margin, p the larger; "
                      f"equivalence holds when its Holm p (over all {family} hypotheses) < {alpha:g}, as when the "
                      f"{100 * (1 - 2 * alpha):g}% interval lies inside ±margin (before Holm).",
                      ["hypothesis", "difference", "metric", "margin", "pairs", "mean [95%]", "t lower, upper", "TOST p", "Holm p",
                       "Wilcoxon p", "result"], [_equivalence_row(h, a, alpha, family) for h in equivalence])
    out += _table("By instance: the mean difference over each instance's seeds (n: its pairs), pooled; then the instance-level "
                  "analysis, the same test on the instance means (k instances, k - 1 degrees of freedom), Holm over the "
                  f"{family} hypotheses (a hypothesis holds or rejects at Holm p < {alpha:g}):",
                  ["hypothesis", *instances, "pooled", "by instance: mean [95%] (k)", "p", "Holm p", "rejects"],
                  [_instance_row(h, a, alpha, instances) for h in hypotheses])
    return out + ["", *left_out_lines(hypotheses, a, instances)]


def left_out_lines(hypotheses: tuple[Hypothesis, ...], a: Analysis, instances: tuple[str, ...]) -> list[str]:
    """Per hypothesis, the pairs it used and each planned unit it left out, with the reason."""
    gaps = {h.name: a.left_out[h.name] for h in hypotheses if a.left_out[h.name]}
    if not gaps:
        return ["Units: every hypothesis used every planned (instance, seed) unit of its two arms."]
    out = ["Units left out (a unit is used only where both arms have the metric):", ""]
    for h in hypotheses:
        gap = gaps.get(h.name)
        if gap:
            units = "; ".join(f"({m}, {s}): {gap[(m, s)]}" for m, s in unit_order(gap, instances))
            out.append(f"- {h.name}: {len(a.pairs[h.name])} pairs used, {len(gap)} left out: {units}")
    return out


def numbers(h: Hypothesis, a: Analysis, alpha: float) -> dict:
    """A hypothesis's numbers for summary.json: its definition, the pooled test and the instance-level one."""
    r, by = a.pooled[h.name], a.instances[h.name]
    return {"arm": h.arm, "versus": h.versus, "metric": h.metric, "margin": h.margin, "role": h.role,
            "direction": h.direction, **({"group": h.group} if h.group is not None else {}),
            **(asdict(r.test) if r.test else {"n": 0}), "p_holm": r.p_holm, "rejects": r.rejects(alpha),
            "left_out": {f"{m}/seed{s}": why for (m, s), why in a.left_out[h.name].items()},
            "by_instance": {**(asdict(by.test) if by.test else {"n": len(a.means[h.name])}), "p_holm": by.p_holm, "rejects": by.rejects(alpha)}}


def plot_paired(plots: Plots, hypotheses: tuple[Hypothesis, ...], a: Analysis, instances: tuple[str, ...]) -> str:
    """One panel per hypothesis: its paired differences as dots per instance, then the pooled mean
    with its 95% t interval (an equivalence: its TOST interval, the margins dashed at ±margin); a
    margin other than 0 dashed. Accuracies in points."""
    fig, axes = plots.figure(len(hypotheses), width=3.4, rows=max(1, math.ceil(len(hypotheses) / 4)))  # at most 4 panels a row
    for ax, h in zip(axes, hypotheses):
        r, scale = a.pooled[h.name], 100 if in_points(h.metric) else 1
        for i, m in enumerate(instances):
            ys = [scale * d for (model, _), d in a.pairs[h.name] if model == m]
            ax.plot(i + np.linspace(-0.15, 0.15, len(ys)) if len(ys) > 1 else [i] * len(ys), ys, "o", color=f"C{i % 10}", alpha=0.6, markersize=4)
        t = r.test
        if t is not None:
            low, high = (t.low_tost, t.high_tost) if isinstance(t, EquivalenceResult) else (t.low, t.high)
            err = None if low is None else [[scale * (t.mean - low)], [scale * (high - t.mean)]]
            ax.errorbar([len(instances)], [scale * t.mean], yerr=err, fmt="s", color="black", capsize=4)
        ax.axhline(0, color="black", linewidth=0.8)
        for margin in ([h.margin, -h.margin] if h.role == "equivalence" else [h.margin] if h.margin else []):
            ax.axhline(scale * margin, color="grey", linestyle="--", linewidth=0.8)
        ax.set_xticks(range(len(instances) + 1), [*instances, "pooled"])
        ax.set_ylabel("difference (points)" if scale == 100 else "difference")
        interval = f" ({100 * t.level:g}% interval)" if isinstance(t, EquivalenceResult) else ""
        ax.set_title(f"{h.name} ({h.role}): {h.compared()}\n{h.metric.removeprefix('final/')}{interval}", fontsize=9)
        ax.grid(alpha=0.3)
    fig.suptitle("Paired differences per (instance, seed); pooled mean and 95% t interval", fontsize=10)
    return plots.save(fig, "confirm")
