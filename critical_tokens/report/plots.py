"""The report's figures (matplotlib, PNG and SVG), drawn from the numbers the sections computed.

Each function draws one figure of REPORT.md into ``plots/`` and returns its path as the report links
it. The same numbers give the same bytes (no dates, fixed SVG ids), so a rebuilt report changes no file.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np

from .paper import PAPER_TABLE4, PAPER_TABLE5, VERDICT_METRIC
from .study_dir import Runs
from .statistics import Estimate, band, seeds_at

ACCURACY_PANELS = (("eval/accuracy_sampled", "RL task, sampled (test)"), ("eval/accuracy_greedy", "RL task, greedy"),
                   ("accuracy", "training rollouts"), ("eval/comfort_accuracy_greedy", "comfort zone (N digits), greedy"))


class Plots:
    """Writes each figure as ``plots/<name>.png`` and ``.svg``; reproducible bytes for the same numbers."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.names: list[str] = []

    def figure(self, panels: int, width: float = 4.2, height: float = 3.2, rows: int = 1):
        import matplotlib
        from matplotlib.figure import Figure

        matplotlib.rcParams["svg.hashsalt"] = "critical-tokens"  # stable SVG ids
        cols = math.ceil(panels / rows)
        fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
        axes = list(fig.subplots(rows, cols, squeeze=False).ravel())
        for ax in axes[panels:]:
            ax.set_visible(False)
        return fig, axes[:panels]

    def save(self, fig, name: str) -> str:
        self.directory.mkdir(parents=True, exist_ok=True)
        fig.savefig(self.directory / f"{name}.png", dpi=120, metadata={"Software": None})
        fig.savefig(self.directory / f"{name}.svg", metadata={"Date": None})
        self.names.append(name)
        return f"plots/{name}.png"


def _color(i: int) -> str:
    return f"C{i % 10}"


def _band(ax, i: int, runs: list[list[dict]], key: str, label: str) -> None:
    """The mean of ``key`` over runs as a line, and its 95% interval as a band when every point has one."""
    xs, estimates = band(runs, key)
    if not xs:
        return
    ax.plot(xs, [e.mean for e in estimates], color=_color(i), label=label)
    if all(e.low is not None for e in estimates):
        ax.fill_between(xs, [e.low for e in estimates], [e.high for e in estimates], color=_color(i), alpha=0.15, linewidth=0)


def plot_curves(plots: Plots, name: str, title: str, groups: dict[str, list[list[dict]]], panels: Sequence[tuple[str, str]],
                rows: int = 1, ylabel: str = "accuracy") -> str | None:
    """One panel per metric, one line per group: the mean over seeds and its 95% band."""
    if not any(groups.values()):
        return None
    fig, axes = plots.figure(len(panels), rows=rows)
    for ax, (key, panel_title) in zip(axes, panels):
        for i, (label, runs) in enumerate(groups.items()):
            xs, estimates = band(runs, key)
            if not xs:
                continue
            mean = np.array([e.mean for e in estimates])
            ax.plot(xs, mean, color=_color(i), label=f"{label} (n={estimates[0].n})", marker="o" if len(xs) < 12 else None, markersize=3)
            if all(e.low is not None for e in estimates):
                ax.fill_between(xs, [e.low for e in estimates], [e.high for e in estimates], color=_color(i), alpha=0.2, linewidth=0)
        ax.set_title(panel_title, fontsize=9)
        ax.set_xlabel("episodes")
        ax.set_ylabel("p(right token)" if key.startswith("p_correct/") else ylabel)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{title} (mean over seeds, 95% interval)", fontsize=10)
    return plots.save(fig, name)


def plot_levels(plots: Plots, ours: dict[str, list[list[float | None]]], n_digits: list[int], offsets: list[int]) -> str:
    """Figure 2 as heat maps: greedy accuracy (%) per model (rows, by N) and digits beyond N (columns),
    ours (``ours[kind]``, None where not evaluated) above the paper's tables 4 and 5."""
    fig, axes = plots.figure(4, width=3.6, height=2.6 + 0.25 * max(len(n_digits), 4), rows=2)
    for ax, kind, source in zip(axes, ("identical", "varying", "identical", "varying"), ("ours", "ours", "paper", "paper")):
        if source == "ours":
            grid = np.array([[np.nan if v is None else v for v in row] for row in ours[kind]])
            rows, cols = [f"N={n}" for n in n_digits], offsets
        else:
            paper = PAPER_TABLE4 if kind == "identical" else PAPER_TABLE5
            grid, rows, cols = np.array(list(paper.values())), [f"N={n}" for n in paper], range(4)
        ax.imshow(grid, cmap="viridis", vmin=0, vmax=100, aspect="auto")
        for (i, j), v in np.ndenumerate(grid):
            if not np.isnan(v):
                ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=8, color="white" if v < 60 else "black")
        ax.set_xticks(range(len(cols)), ["N" if o == 0 else f"N+{o}" for o in cols])
        ax.set_yticks(range(len(rows)), rows)
        ax.set_title(f"{source}: {kind} digits", fontsize=9)
    fig.suptitle("Greedy accuracy (%) by digits beyond the pre-training range", fontsize=10)
    return plots.save(fig, "levels")


def plot_table1(plots: Plots, deltas: dict[str, list[Estimate | None]], models: list[str]) -> str:
    """Table 1 as bars: per model (``models``, the tick labels), Δ for each kind of token (``deltas``)."""
    fig, axes = plots.figure(1, width=max(4.0, 1.6 * len(models)))
    ax = axes[0]
    for i, (label, values) in enumerate(deltas.items()):
        xs = np.arange(len(models)) + (i - 1) * 0.27
        means = [v.mean if v else np.nan for v in values]
        err = [[v.mean - v.low if v and v.low is not None else 0 for v in values], [v.high - v.mean if v and v.high is not None else 0 for v in values]]
        ax.bar(xs, means, width=0.27, color=_color(i), label=label, yerr=err, capsize=3)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(models)), models)
    ax.set_ylabel("Δ certainty (eq. 2)")
    ax.legend(fontsize=7)
    ax.set_title("Certainty gap Δ: critical vs other tokens\n(95% bootstrap intervals)", fontsize=9)  # two lines: fits 4 inches
    return plots.save(fig, "table1")


def plot_certainty(plots: Plots, model: str, scratchpads: list[dict]) -> str:
    """The certainty along a few scratchpads of ``model`` (as `critical` draws them, from its report.json)."""
    from ..critical.pictures import Scratchpad, render_png

    name = f"certainty_{model}"
    render_png([Scratchpad(**{**p, "certainty": tuple(p["certainty"]), "critical_offsets": tuple(p["critical_offsets"])}) for p in scratchpads],
               plots.directory / f"{name}.png", title=f"{model}: certainty along the scratchpad")
    return f"plots/{name}.png"


def plot_beta_sweep(plots: Plots, betas: list[str], finals: list[Estimate], runs: list[Runs]) -> str:
    """Figure 6: the final accuracy at each beta ("0": the standard KL penalty), and its curve."""
    fig, axes = plots.figure(2)
    ax = axes[0]
    for i, e in enumerate(finals):
        err = None if e.low is None else [[e.mean - e.low], [e.high - e.mean]]
        ax.errorbar([i], [e.mean], yerr=err, fmt="o", color=_color(i), capsize=4)
    ax.set_xticks(range(len(betas)), ["0 (std)" if b == "0" else b for b in betas])
    ax.set_xlabel("beta")
    ax.set_ylabel("final accuracy (sampled)")
    ax.set_title("final accuracy by beta", fontsize=9)
    ax.grid(alpha=0.3)
    ax = axes[1]
    for i, (beta, r) in enumerate(zip(betas, runs)):
        _band(ax, i, r, VERDICT_METRIC, f"beta {beta}")
    ax.set_xlabel("episodes")
    ax.set_title("RL task, sampled", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.suptitle("Sensitivity to beta (mean over seeds, 95% interval)", fontsize=10)
    return plots.save(fig, "beta_sweep")


def plot_kl_by_model(plots: Plots, runs: dict[str, dict[str, Runs]], start: dict[str, Estimate | None], arm_names: list[str]) -> str:
    """The KL comparison from several starting models: one panel of curves per model (in the order
    of ``runs``), then each arm's final accuracy against the model's greedy accuracy before RL."""
    fig, axes = plots.figure(len(runs) + 1, rows=1 if len(runs) < 3 else 2)
    for ax, m in zip(axes, runs):
        for i, a in enumerate(arm_names):
            _band(ax, i, runs[m].get(a, []), VERDICT_METRIC, a)
        ax.set_title(f"{m}: RL task, sampled", fontsize=9)
        ax.set_xlabel("episodes")
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3)
    for ax in axes[:-1]:
        if ax.lines:
            ax.legend(fontsize=7)
            break
    ax = axes[-1]
    for i, a in enumerate(arm_names):
        points = [(start[m].mean, seeds_at(runs[m].get(a, []), VERDICT_METRIC, "final")) for m in runs if start[m]]
        points = [(x, e) for x, e in points if e is not None]
        if points:
            ax.errorbar([x for x, _ in points], [e.mean for _, e in points], color=_color(i), marker="o", capsize=3, label=a,
                        yerr=None if any(e.low is None for _, e in points) else
                        [[e.mean - e.low for _, e in points], [e.high - e.mean for _, e in points]])
    ax.set_xlabel("greedy accuracy on the RL task before RL")
    ax.set_ylabel("final accuracy (sampled)")
    ax.set_title("final accuracy by starting model", fontsize=9)
    ax.grid(alpha=0.3)
    if ax.containers:
        ax.legend(fontsize=7)
    fig.suptitle("KL penalties from several starting models (mean over seeds, 95% interval)", fontsize=10)
    return plots.save(fig, "kl_by_model")


def plot_strength_curve(plots: Plots, points: list[dict]) -> str:
    """Each arm's mean sampled N+1 accuracy (y) against its mean in-distribution KL to the reference
    (x), with 95% intervals on both axes. ``points``: {"kind", "label", "kl_coef", "x", "y"} (x, y:
    `Estimate`). The "uniform" arms (no KL counts as coefficient 0) are joined in order of their KL
    coefficient, strongest first: the strength curve; "prioritized" arms are diamonds, "other" arms
    squares, each labelled."""
    fig, axes = plots.figure(1, width=5.6, height=4.2)
    ax = axes[0]

    def draw(p: dict, style: dict) -> None:
        x, y = p["x"], p["y"]
        xerr = None if x.low is None else [[x.mean - x.low], [x.high - x.mean]]
        yerr = None if y.low is None else [[100 * (y.mean - y.low)], [100 * (y.high - y.mean)]]
        ax.errorbar([x.mean], [100 * y.mean], xerr=xerr, yerr=yerr, capsize=3, **style)
        ax.annotate(p["label"], (x.mean, 100 * y.mean), textcoords="offset points", xytext=(5, 4), fontsize=7)

    curve = sorted((p for p in points if p["kind"] == "uniform"), key=lambda p: -p["kl_coef"])
    if curve:
        ax.plot([p["x"].mean for p in curve], [100 * p["y"].mean for p in curve], "-", color="grey", linewidth=1.2, label="strength curve (uniform)")
    for p in curve:
        draw(p, {"fmt": "o", "color": "grey"})
    for i, p in enumerate(p for p in points if p["kind"] == "prioritized"):
        draw(p, {"fmt": "D", "color": _color(i), "label": p["label"]})
    for p in (p for p in points if p["kind"] == "other"):
        draw(p, {"fmt": "s", "color": "black", "mfc": "none"})
    ax.set_xlabel("in-distribution KL(policy || reference) per token (final/comfort_kl)")
    ax.set_ylabel("sampled N+1 accuracy (%)")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    ax.set_title("N+1 accuracy against distance from the reference\n(mean over runs, 95% intervals)", fontsize=9)
    return plots.save(fig, "confirm_strength")
