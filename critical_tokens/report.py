"""The reproduction's report: REPORT.md and plots/, rebuilt from a reproduction's files alone.

`critical-tokens report RUN_DIR` reads ``reproduce.json`` (the plan and every hyper-parameter),
``timing.json`` (wall time, hardware), and each job's files (``DONE.json``, ``metrics.jsonl``,
``config.json``, ``table.json``, ``report.json``), never a live object. For each finding of the paper
it puts the paper's number or claim beside ours, with seeds and 95% confidence intervals, and a
verdict computed by the rules in `VERDICT_RULES`.

Also here: exporting a run's ``metrics.jsonl`` to TensorBoard event files and to Weights & Biases.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import numpy as np

from .config import arg
from .runs import UserError, atomic_dir, atomic_write_text, check_output, read_json, read_metrics

DONE = "DONE.json"

# --- 1. The paper's numbers and claims (SPEC sections 2, 6 and 7) ---------------------------------------

# Tables 4 and 5 (GPT-2 85M, greedy decoding, 1,000 examples per cell): N -> accuracy in % for
# N, N+1, N+2, N+3 digits, and the half-widths of the 95% intervals.
PAPER_TABLE4 = {7: (98.9, 48.8, 0.0, 0.0), 9: (96.4, 78.9, 0.5, 0.0), 11: (91.2, 75.1, 30.7, 0.2), 13: (93.0, 88.9, 67.7, 20.4)}
PAPER_TABLE4_CI = {7: (0.7, 3.0, 0.0, 0.0), 9: (0.6, 2.4, 0.5, 0.0), 11: (1.3, 2.7, 2.4, 0.3), 13: (1.6, 2.1, 3.1, 2.4)}
PAPER_TABLE5 = {7: (100.0, 69.0, 0.0, 0.0), 9: (97.0, 89.4, 6.9, 0.0), 11: (94.4, 87.0, 53.7, 7.3), 13: (95.6, 92.5, 84.7, 51.8)}
PAPER_TABLE5_CI = {7: (0.0, 2.4, 0.0, 0.0), 9: (0.6, 1.8, 1.3, 0.0), 11: (1.4, 2.1, 3.2, 1.6), 13: (1.4, 1.9, 2.4, 3.2)}
# Table 1, three pre-training levels (the text extraction lost which N): Δ on critical tokens
# (mean, ±) and the minimum over non-critical tokens (mean, ±).
PAPER_TABLE1 = ((-0.33, 0.01, 0.0012, 0.0001), (-0.21, 0.18, 0.0002, 0.0001), (-0.13, 0.04, 0.0004, 0.0001))

PAPER_CLAIMS = {
    "levels_drop": "Accuracy falls beyond the N digits of pre-training: N = 7 gets 98.9% on 7 digits, 48.8% on 8 and 0% on 9 (identical digits, table 4).",
    "levels_more": "Models pre-trained on more digits generalise further: on N+2 digits 0.0%, 0.5%, 30.7%, 67.7% for N = 7, 9, 11, 13 (table 4; figure 2).",
    "table1": "The pre-trained model is much less certain on critical tokens than on the rest of the output: Δ = -0.33, -0.21, -0.13 on critical tokens against +0.0012, +0.0002, +0.0004 for the least certain non-critical tokens (table 1).",
    "rl_levels": "RL on N+2 digits from models pre-trained on N = 9, 11, 13: the models pre-trained on more digits start higher but plateau, the less pre-trained ones improve more (figure 3).",
    "kl_comparison": "From the N = 7 model, RL on N+1 digits (10 seeds): the prioritized KL penalty (beta = 150) significantly outperforms the standard KL penalty (figure 4).",
    "beta_sweep": "Prioritized KL beats the standard KL penalty (beta = 0) for beta from 10 to 500, best at 150, declining from 500 and collapsing at 1000 (figure 6).",
    "tracked_tokens": "With prioritized KL the probability of the right token at the critical tokens rises and stays high; with standard KL it keeps falling back towards its pre-trained level (figures 4 right and 7).",
    "kl_by_model": "Not studied in the paper (one starting model, N = 7, 48.8% / 69.0% greedy at N+1). Beyond it: the comparison of figure 4 from models that start RL with different N+1 competence.",
}

VERDICT_METRIC = "eval/accuracy_sampled"
# The paper's test episodes sample from the policy (the reference sets deterministic_eval=False), so
# the RL verdicts use the sampled accuracy on the RL task; the greedy one is shown beside it.

VERDICT_RULES = f"""\
Every verdict is computed from the numbers above by these rules (95% intervals: for RL results over
seeds, the Wilson interval at the seeds' effective sample size for accuracies and probabilities
(inside [0, 1], with Student's t for z and at most the episodes behind them) and Student's t for
gains; the percentile bootstrap over examples for the evaluation tables and table 1).
"A clearly above B" means A's interval lies entirely above B's; "A above B" compares the means.
"Final" is a run's last evaluation, "initial" its evaluation before any update (episode 0); RL
results use `{VERDICT_METRIC}` (sampled at the policy temperature, as the paper's test episodes).

- **Accuracy drops beyond N** (tables 4-5): reproduced if, for every model, identical-digit accuracy
  at N+1 is clearly below N; partly if below for every model; not reproduced otherwise.
- **More pre-training digits generalise further** (figure 2): the consecutive models (by N) are
  compared at N+1 and N+2, identical and varying. Reproduced if no comparison has the model with
  more digits clearly below and at least half have it clearly above; partly if none clearly below
  and at least one above; not reproduced otherwise. Needs two models.
- **Table 1** (Δ by the paper's certainty, eq. 2): per model, reproduced if Δ on critical tokens is
  clearly below 0 and below the mean of each output's lowest non-critical Δ (the critical tokens
  are the least certain ones); partly if only clearly below 0. Overall: reproduced if every model
  is, partly if any model is at least partly.
- **Figure 3**: (a) "start higher": initial accuracy above for the model with more digits, (b)
  "improve less": the gain (final - initial, per seed) below for the model with more digits, over
  consecutive models. Reproduced if (a) and (b) hold in the means for every pair and each is clear
  for at least one pair; partly if (a) or (b) holds in the means for every pair.
- **Figure 4**: per prioritized arm against the standard arm: reproduced if its final accuracy is
  clearly above, partly if above, not reproduced otherwise.
- **Figure 6**: the fixed beta > 0 against beta = 0 (standard KL): reproduced if most are above and
  at least one clearly above; partly if at least one is above; not reproduced otherwise. "auto" is
  reported beside it.
- **KL by starting model** (beyond the paper): the figure-4 rule, per model; overall reproduced if
  it holds clearly for every model, partly if it holds in the means for at least one.
- **Figure 7**: the first prioritized arm against the standard arm, final probability of the right
  token at each tracked critical token: reproduced if above at every token and clearly above at
  half of them; partly if above at most of them; not reproduced otherwise.
- "not run": the experiment is not in the preset or none of its runs has finished.
"""


@dataclass(frozen=True)
class ReportConfig:
    run: str = arg(None, "reproduction directory (the --out of critical-tokens reproduce)", positional=True, metavar="RUN_DIR")
    to: str | None = arg(None, "write REPORT.md and plots/ to this directory instead of RUN_DIR (e.g. docs/results/cpu)")


# --- 2. Statistics over seeds --------------------------------------------------------------------------------

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


# The accuracies an RL run logs, and the field of its config that gives the episodes behind each.
ACCURACY_EPISODES = {"eval/accuracy_sampled": "eval_episodes", "eval/accuracy_greedy": "eval_episodes",
                     "eval/comfort_accuracy_greedy": "eval_comfort_episodes", "accuracy": "batch_size"}


class Runs(list):
    """The metrics of an arm's finished runs (one list of records per seed), with the episodes
    behind each accuracy they log (``trials``, from the arm's config)."""

    def __init__(self, metrics: list[list[dict]], config: dict):
        super().__init__(metrics)
        self.trials = {key: config[field] for key, field in ACCURACY_EPISODES.items() if isinstance(config.get(field), int)}


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


# --- 3. Reading a reproduction --------------------------------------------------------------------------------


class Reproduction:
    """A reproduction directory as files: the plan, the jobs' results, the timing."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not (self.root / "reproduce.json").exists():
            raise UserError(f"{self.root} is not a reproduction (no reproduce.json); make one with critical-tokens reproduce --out {self.root}")
        self.meta = read_json(self.root / "reproduce.json")
        self.timing = read_json(self.root / "timing.json") if (self.root / "timing.json").exists() else None
        shape = {"command": str, "preset_name": str, "preset_source": str, "parallel_jobs": int, "threads_per_job": int,
                 "preset": dict, "jobs": list, "models": dict}
        if not isinstance(self.meta, dict) or any(not isinstance(self.meta.get(k), t) for k, t in shape.items()) \
                or not isinstance(self.timing, (dict, type(None))):
            raise UserError(f"{self.root}: reproduce.json or timing.json is damaged (not what critical-tokens reproduce writes); "
                            f"run the reproduction again to rewrite them")
        self.preset = self.meta["preset"]
        self.jobs = self.meta["jobs"]
        self.models = self.meta["models"]

    def results_dir(self, job: dict) -> Path:
        return self.root / job.get("same_as_dir", job["dir"])

    def done(self, job: dict) -> dict | None:
        path = self.results_dir(job) / DONE
        return read_json(path) if path.exists() else None

    def experiment_jobs(self, experiment: str) -> list[dict]:
        return [j for j in self.jobs if j["experiment"] == experiment]

    def arms(self, experiment: str) -> dict[str, list[dict]]:
        arms: dict[str, list[dict]] = {}
        for job in self.experiment_jobs(experiment):
            arms.setdefault(job["arm"], []).append(job)
        return arms

    def finished(self, jobs: list[dict]) -> list[dict]:
        return [j for j in jobs if self.done(j)]

    def metrics(self, jobs: list[dict]) -> Runs:
        """The metrics.jsonl of each finished run of ``jobs`` (one arm: the seeds of one config)."""
        return Runs([read_metrics(self.results_dir(j)) for j in self.finished(jobs)], jobs[0]["config"] if jobs else {})

    def run_config(self, job: dict) -> dict:
        path = self.results_dir(job) / "config.json"
        return read_json(path) if path.exists() else {}

    def state(self, experiment: str) -> str:
        jobs = self.experiment_jobs(experiment)
        n = len(self.finished(jobs))
        if not jobs or n == 0:
            return "not run"
        return "complete" if n == len(jobs) else f"partial: {n} of {len(jobs)} runs finished"

    def n_digits(self, model: str) -> int:
        return int(self.models[model]["config"]["n_digits"])


def series(records: list[dict], key: str) -> dict[int, float]:
    return {int(r["episodes"]): r[key] for r in records if r.get(key) is not None and "episodes" in r}


def band(runs: list[list[dict]], key: str) -> tuple[list[int], list[Estimate]]:
    """Episodes where every run logged ``key``, and the mean with its interval over runs at each."""
    per_run = [series(r, key) for r in runs]
    per_run = [s for s in per_run if s]
    if not per_run:
        return [], []
    xs = sorted(set.intersection(*(set(s) for s in per_run)))
    return xs, [over_seeds([s[x] for s in per_run], key, runs) for x in xs]


def at(runs: list[list[dict]], key: str, which: Literal["initial", "final"]) -> list[float]:
    """Per run, the first or the last logged value of ``key``."""
    values = []
    for records in runs:
        logged = [r[key] for r in records if r.get(key) is not None]
        if logged:
            values.append(logged[0] if which == "initial" else logged[-1])
    return values


def gains(runs: list[list[dict]], key: str) -> list[float]:
    return [f - i for f, i in zip(at(runs, key, "final"), at(runs, key, "initial"))]


# --- 4. Plots (matplotlib, PNG and SVG, from the numbers above) -----------------------------------------------


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


ACCURACY_PANELS = (("eval/accuracy_sampled", "RL task, sampled (test)"), ("eval/accuracy_greedy", "RL task, greedy"),
                   ("accuracy", "training rollouts"), ("eval/comfort_accuracy_greedy", "comfort zone (N digits), greedy"))


# --- 5. The sections of the report -------------------------------------------------------------------------


@dataclass
class Section:
    lines: list[str]
    summary: list[tuple[str, str, str, str]]  # (finding, paper, ours, verdict)


def _not_run(title: str, state: str, findings: Sequence[tuple[str, str]]) -> Section:
    return Section([f"## {title}", "", f"Not run ({state}).", ""], [(f, PAPER_CLAIMS[k], "-", "not run") for f, k in findings])


def section_levels(rep: Reproduction, plots: Plots) -> Section:
    title = "Pre-training levels (figure 2, tables 4-5)"
    state = rep.state("levels")
    findings = [("Accuracy drops beyond N (tables 4-5)", "levels_drop"), ("More digits generalise further (figure 2)", "levels_more")]
    if state == "not run":
        return _not_run(title, state, findings)
    tables = {}
    for job in rep.finished(rep.experiment_jobs("levels")):
        tables[job["arm"]] = read_json(rep.results_dir(job) / "table.json")
    order = sorted(tables, key=lambda m: tables[m]["n_digits"])

    def cell(m: str, kind: str, offset: int) -> dict | None:
        n0 = tables[m]["n_digits"]
        return next((c for c in tables[m]["cells"] if c["kind"] == kind and c["n"] == n0 + offset), None)

    offsets = sorted({c["n"] - tables[m]["n_digits"] for m in order for c in tables[m]["cells"]})
    header = " | ".join(f"{kind} {'N' if o == 0 else f'N+{o}'}" for kind in ("identical", "varying") for o in offsets)

    def fmt(c: dict | None) -> str:
        return "-" if c is None else f"{100 * c['accuracy']:.1f} ± {100 * (c['ci_high'] - c['ci_low']) / 2:.1f}"

    lines = [f"## {title}", "", f"State: {state}. Greedy decoding, {_examples(tables)} examples per cell, accuracy in % ± half the "
             "95% bootstrap interval; N+k is the number of digits.", "",
             "**Ours**", "", f"| model | N | init | {header} |", "|---" * (3 + 2 * len(offsets)) + "|"]
    for m in order:
        row = " | ".join(fmt(cell(m, kind, o)) for kind in ("identical", "varying") for o in offsets)
        lines.append(f"| {m} | {tables[m]['n_digits']} | {rep.models[m]['init']} | {row} |")
    lines += ["", "**The paper** (GPT-2 85M; tables 4 and 5)", "",
              "| N | " + " | ".join(f"{kind} {'N' if o == 0 else f'N+{o}'}" for kind in ("identical", "varying") for o in range(4)) + " |",
              "|---" * 9 + "|"]
    for n in PAPER_TABLE4:
        row = [f"{v:.1f} ± {c:.1f}" for v, c in zip(PAPER_TABLE4[n], PAPER_TABLE4_CI[n])]
        row += [f"{v:.1f} ± {c:.1f}" for v, c in zip(PAPER_TABLE5[n], PAPER_TABLE5_CI[n])]
        lines.append(f"| {n} | " + " | ".join(row) + " |")

    # Verdict 1: N+1 below N, for every model (identical digits).
    drops = []
    for m in order:
        a, b = cell(m, "identical", 0), cell(m, "identical", 1)
        if a and b:
            drops.append("clearly above" if a["ci_low"] > b["ci_high"] else "above" if a["accuracy"] > b["accuracy"] else "not above")
    drop_verdict = "not run" if not drops else "reproduced" if all(d == "clearly above" for d in drops) else \
        "partly" if all(d != "not above" for d in drops) else "not reproduced"
    ours_drop = "; ".join(f"N = {tables[m]['n_digits']}: {fmt(cell(m, 'identical', 0))} → {fmt(cell(m, 'identical', 1))}" for m in order)

    # Verdict 2: more digits, better at N+1 and N+2.
    comparisons = []
    for lo, hi in zip(order, order[1:]):
        for kind in ("identical", "varying"):
            for o in (1, 2):
                a, b = cell(hi, kind, o), cell(lo, kind, o)
                if a and b:
                    comparisons.append("clearly above" if a["ci_low"] > b["ci_high"] else "clearly below" if a["ci_high"] < b["ci_low"]
                                       else "above" if a["accuracy"] > b["accuracy"] else "not above")
    if len(order) < 2 or not comparisons:
        more_verdict, ours_more = "not run", "needs two models"
    else:
        clear, below = comparisons.count("clearly above"), comparisons.count("clearly below")
        more_verdict = "reproduced" if below == 0 and clear >= len(comparisons) / 2 else \
            "partly" if below == 0 and clear + comparisons.count("above") > 0 else "not reproduced"
        ours_more = (f"{clear} of {len(comparisons)} comparisons clearly better with more digits, {below} clearly worse; N+2 identical: "
                     + ", ".join(f"{fmt(cell(m, 'identical', 2))} (N = {tables[m]['n_digits']})" for m in order))
    lines += ["", f"- Accuracy drops beyond N: **{drop_verdict}** ({ours_drop}).",
              f"- More pre-training digits generalise further: **{more_verdict}** ({ours_more}).", ""]

    fig, axes = plots.figure(4, width=3.6, height=2.6 + 0.25 * max(len(order), 4), rows=2)
    for ax, kind, source in zip(axes, ("identical", "varying", "identical", "varying"), ("ours", "ours", "paper", "paper")):
        if source == "ours":
            grid = np.array([[np.nan if cell(m, kind, o) is None else 100 * cell(m, kind, o)["accuracy"] for o in offsets] for m in order])
            rows, cols = [f"N={tables[m]['n_digits']}" for m in order], offsets
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
    lines += [f"![accuracy heat maps]({plots.save(fig, 'levels')})", ""]
    summary = [(findings[0][0], PAPER_CLAIMS["levels_drop"], ours_drop, drop_verdict),
               (findings[1][0], PAPER_CLAIMS["levels_more"], ours_more, more_verdict)]
    return Section(lines, summary)


def _examples(tables: dict) -> str:
    counts = sorted({c["examples"] for t in tables.values() for c in t["cells"]})
    return "/".join(map(str, counts))


def _row(table: dict, name: str) -> Estimate | None:
    r = table.get(name)
    if not r or r["mean"] is None:
        return None
    return Estimate(r["mean"], r["ci_low"], r["ci_high"], r["outputs"])


def section_table1(rep: Reproduction, plots: Plots) -> Section:
    title = "Certainty gap of critical tokens (table 1)"
    state = rep.state("table1")
    if state == "not run":
        return _not_run(title, state, [("Critical tokens are uncertain (table 1)", "table1")])
    reports = {j["arm"]: read_json(rep.results_dir(j) / "report.json") for j in rep.finished(rep.experiment_jobs("table1"))}
    order = sorted(reports, key=lambda m: reports[m]["n_digits"])
    lines = [f"## {title}", "", f"State: {state}. Δ = certainty on a token - mean certainty on the other tokens of the output "
             "(eq. 2, max-prob certainty at the certainty temperature), teacher-forced on correct N+1-digit completions; "
             "mean over outputs [95% bootstrap interval].", "",
             "**The paper**: " + "; ".join(f"Δ critical {c:+.2f} ± {ci:.2f}, non-critical (min.) {m:+.4f} ± {mci:.4f}" for c, ci, m, mci in PAPER_TABLE1), "",
             "**Ours**", "", "| model | N | digits | Δ critical | Δ non-critical | Δ lowest non-critical | p(right token) at critical | failures starting at a critical token | verdict |",
             "|---|---|---|---|---|---|---|---|---|"]
    verdicts, ours = [], []
    for m in order:
        r = reports[m]
        t = r["table1"]["max_prob"]
        crit, other, lowest = _row(t, "critical"), _row(t, "non-critical"), _row(t, "non-critical (lowest)")
        p = _row(r["table1"]["p_correct"], "critical")
        f = r["failures"]
        start = "-" if f.get("at_critical_fraction") is None else f"{f['at_critical']}/{f['failures']} ({100 * f['at_critical_fraction']:.0f}%)"
        verdict = "not reproduced"
        if crit is not None and crit.high is not None and crit.high < 0:
            verdict = "reproduced" if lowest is not None and crit.mean < lowest.mean else "partly"
        verdicts.append(verdict)
        ours.append(f"{m} (N = {r['n_digits']}): {num(crit, 3, True)}")
        lines.append(f"| {m} | {r['n_digits']} | {r['digits']} | {num(crit, 3, True)} | {num(other, 4, True)} | {num(lowest, 3, True)} | "
                     f"{num(p, 3)} | {start} | {verdict} |")
    overall = "reproduced" if all(v == "reproduced" for v in verdicts) else "partly" if any(v != "not reproduced" for v in verdicts) else "not reproduced"
    lines += ["", f"Verdict: **{overall}**. The full analysis of each model (per critical-token name, where failures start, "
              "discovery without the template) is in `table1/<model>/report.md`.", ""]

    fig, axes = plots.figure(1, width=max(4.0, 1.6 * len(order)))
    ax = axes[0]
    names = (("critical", "critical"), ("non-critical", "non-critical"), ("non-critical (lowest)", "lowest non-critical"))
    for i, (key, label) in enumerate(names):
        values = [_row(reports[m]["table1"]["max_prob"], key) for m in order]
        xs = np.arange(len(order)) + (i - 1) * 0.27
        means = [v.mean if v else np.nan for v in values]
        err = [[v.mean - v.low if v and v.low is not None else 0 for v in values], [v.high - v.mean if v and v.high is not None else 0 for v in values]]
        ax.bar(xs, means, width=0.27, color=_color(i), label=label, yerr=err, capsize=3)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(order)), [f"{m} (N={reports[m]['n_digits']})" for m in order])
    ax.set_ylabel("Δ certainty (eq. 2)")
    ax.legend(fontsize=7)
    ax.set_title("Certainty gap Δ: critical vs other tokens\n(95% bootstrap intervals)", fontsize=9)  # two lines: fits 4 inches
    lines += [f"![table 1]({plots.save(fig, 'table1')})", ""]
    for m in order:
        pads = reports[m].get("scratchpads") or []
        if pads:
            from .critical import Scratchpad, render_png

            name = f"certainty_{m}"
            render_png([Scratchpad(**{**p, "certainty": tuple(p["certainty"]), "critical_offsets": tuple(p["critical_offsets"])}) for p in pads],
                       plots.directory / f"{name}.png", title=f"{m}: certainty along the scratchpad")
            lines += [f"![certainty along the scratchpad, {m}](plots/{name}.png)", ""]
    return Section(lines, [("Critical tokens are uncertain (table 1)", PAPER_CLAIMS["table1"], "; ".join(ours), overall)])


def _arm_runs(rep: Reproduction, experiment: str) -> dict[str, list[list[dict]]]:
    return {arm: rep.metrics(jobs) for arm, jobs in rep.arms(experiment).items()}


def _seeds(rep: Reproduction, jobs: list[dict]) -> str:
    return f"{len(rep.finished(jobs))}/{len(jobs)}"


def section_rl_levels(rep: Reproduction, plots: Plots) -> Section:
    title = "RL from different pre-training levels (figure 3)"
    state = rep.state("rl_levels")
    if state == "not run":
        return _not_run(title, state, [("RL from several pre-training levels (figure 3)", "rl_levels")])
    arms = rep.arms("rl_levels")
    runs = _arm_runs(rep, "rl_levels")
    order = sorted((m for m in arms if runs[m]), key=rep.n_digits)
    task = arms[order[0]][0]["config"]["task"] if order else "plus2"
    lines = [f"## {title}", "", f"State: {state}. RL on {task} from each model; `{VERDICT_METRIC}` and greedy accuracy on the RL task, "
             "mean over seeds [95% interval].", "",
             "| model | N | seeds | initial (sampled) | final (sampled) | gain (sampled) | initial (greedy) | final (greedy) |", "|---|---|---|---|---|---|---|---|"]
    for m in order:
        r = runs[m]
        lines.append(f"| {m} | {rep.n_digits(m)} | {_seeds(rep, arms[m])} | {pct(seeds_at(r, VERDICT_METRIC, 'initial'))} | "
                     f"{pct(seeds_at(r, VERDICT_METRIC, 'final'))} | {pct(t_interval(gains(r, VERDICT_METRIC)))} | "
                     f"{pct(seeds_at(r, 'eval/accuracy_greedy', 'initial'))} | {pct(seeds_at(r, 'eval/accuracy_greedy', 'final'))} |")
    starts, improves = [], []
    for lo, hi in zip(order, order[1:]):
        starts.append(versus(seeds_at(runs[hi], VERDICT_METRIC, "initial"), seeds_at(runs[lo], VERDICT_METRIC, "initial")))
        improves.append(versus(t_interval(gains(runs[lo], VERDICT_METRIC)), t_interval(gains(runs[hi], VERDICT_METRIC))))
    if len(order) < 2:
        verdict, ours = "not run", "needs two models"
    else:
        holds = [all(c != "not above" for c in part) for part in (starts, improves)]
        clear = [any(c == "clearly above" for c in part) for part in (starts, improves)]
        verdict = "reproduced" if all(holds) and all(clear) else "partly" if any(holds) else "not reproduced"
        ours = (f"starts higher with more digits: {', '.join(starts)}; improves less with more digits: {', '.join(improves)} "
                f"(consecutive pairs of {', '.join(order)})")
    lines += ["", f"Verdict: **{verdict}** ({ours}).", ""]
    path = plot_curves(plots, "rl_levels", f"RL on {task} from each pre-training level",
                       {f"{m} (N={rep.n_digits(m)})": runs[m] for m in order}, ACCURACY_PANELS[:3])
    lines += [f"![figure 3]({path})", ""] if path else []
    return Section(lines, [("RL from several pre-training levels (figure 3)", PAPER_CLAIMS["rl_levels"], ours, verdict)])


def _betas(rep: Reproduction, jobs: list[dict]) -> str:
    """The beta each run used (from its config.json: 'auto' is resolved there)."""
    cfg = jobs[0]["config"]
    if cfg["kl"] != "prioritized":
        return "-"
    used = [rep.run_config(j).get("beta") for j in rep.finished(jobs)]
    used = [b for b in used if b is not None]
    if cfg["beta"] != "auto":
        return cfg["beta"]
    return "auto" + (f" ({min(used):.3g}..{max(used):.3g})" if used else "")


def _standard_arm(arms: dict[str, list[dict]]) -> str | None:
    standard = [a for a, jobs in arms.items() if jobs[0]["config"]["kl"] == "standard"]
    return "standard" if "standard" in standard else (standard[0] if standard else None)


def section_kl_comparison(rep: Reproduction, plots: Plots) -> Section:
    title = "Prioritized vs standard KL (figure 4)"
    state = rep.state("kl_comparison")
    finding = "Prioritized KL beats standard KL (figure 4)"
    if state == "not run":
        return _not_run(title, state, [(finding, "kl_comparison")])
    arms = rep.arms("kl_comparison")
    runs = _arm_runs(rep, "kl_comparison")
    first = next(iter(arms.values()))[0]["config"]
    lines = [f"## {title}", "", f"State: {state}. RL on {first['task']} from `{Path(first['pretrained']).name}`, "
             f"KL coefficient {first['kl_coef']}, estimator {first['estimator']}; final accuracy on the RL task and probability of the "
             "right token at the critical tokens (mean over the probe set), mean over seeds [95% interval].", "",
             "| arm | KL | beta | seeds | final (sampled) | final (greedy) | final comfort zone (greedy) | p(right) at critical tokens: initial → final |",
             "|---|---|---|---|---|---|---|---|"]
    for arm, jobs in arms.items():
        r = runs[arm]
        lines.append(f"| {arm} | {jobs[0]['config']['kl']} | {_betas(rep, jobs)} | {_seeds(rep, jobs)} | {pct(seeds_at(r, VERDICT_METRIC, 'final'))} | "
                     f"{pct(seeds_at(r, 'eval/accuracy_greedy', 'final'))} | {pct(seeds_at(r, 'eval/comfort_accuracy_greedy', 'final'))} | "
                     f"{num(seeds_at(r, 'p_correct/critical_mean', 'initial'))} → {num(seeds_at(r, 'p_correct/critical_mean', 'final'))} |")
    standard = _standard_arm(arms)
    verdicts, ours = [], []
    for arm, jobs in arms.items():
        if jobs[0]["config"]["kl"] != "prioritized" or standard is None or not runs[arm] or not runs[standard]:
            continue
        a, b = seeds_at(runs[arm], VERDICT_METRIC, "final"), seeds_at(runs[standard], VERDICT_METRIC, "final")
        v = VERDICT[versus(a, b)]
        verdicts.append(v)
        ours.append(f"{arm} {pct(a)} vs {standard} {pct(b)}: {v}")
    overall = "not run" if not verdicts else "reproduced" if "reproduced" in verdicts else "partly" if "partly" in verdicts else "not reproduced"
    lines += ["", f"Verdict: **{overall}**" + (f" ({'; '.join(ours)})." if ours else "."), ""]
    path = plot_curves(plots, "kl_comparison", f"RL on {first['task']}: KL penalties", runs,
                       ACCURACY_PANELS + (("p_correct/critical_mean", "p(right token) at critical tokens"),), rows=2)
    lines += [f"![figure 4]({path})", ""] if path else []
    path = plot_curves(plots, "kl_comparison_weights", "KL term and prioritized weights", runs,
                       (("kl", "KL estimate per token"), ("weight_mean", "mean KL weight w = c^beta")), ylabel="")
    lines += [f"![KL and weights]({path})", ""] if path else []
    return Section(lines, [(finding, PAPER_CLAIMS["kl_comparison"], "; ".join(ours) or "-", overall)])


def section_beta_sweep(rep: Reproduction, plots: Plots) -> Section:
    title = "Sensitivity to beta (figure 6)"
    state = rep.state("beta_sweep")
    finding = "Prioritized KL is robust over beta (figure 6)"
    if state == "not run":
        return _not_run(title, state, [(finding, "beta_sweep")])
    arms = rep.arms("beta_sweep")
    runs = _arm_runs(rep, "beta_sweep")

    def beta_of(arm: str) -> float:
        cfg = arms[arm][0]["config"]
        return 0.0 if cfg["kl"] == "standard" else math.inf if cfg["beta"] == "auto" else float(cfg["beta"])

    order = sorted(arms, key=beta_of)
    finals = {arm: seeds_at(runs[arm], VERDICT_METRIC, "final") for arm in order}
    lines = [f"## {title}", "", f"State: {state}. beta = 0 is the standard KL penalty; `auto` calibrates beta on the reference model "
             f"(the value each seed used is in its config.json). Final `{VERDICT_METRIC}`, mean over seeds [95% interval].", "",
             "| beta | seeds | final (sampled) | final (greedy) | against beta = 0 |", "|---|---|---|---|---|"]
    base = next((a for a in order if beta_of(a) == 0), None)
    fixed = [a for a in order if 0 < beta_of(a) < math.inf and runs[a]]
    for arm in order:
        against = "-" if base is None or arm == base else versus(finals[arm], finals[base])
        label = "0 (standard)" if beta_of(arm) == 0 else _betas(rep, arms[arm])
        lines.append(f"| {label} | {_seeds(rep, arms[arm])} | {pct(finals[arm])} | {pct(seeds_at(runs[arm], 'eval/accuracy_greedy', 'final'))} | {against} |")
    if base is None or not runs[base] or not fixed:
        verdict, ours = "not run", "needs beta = 0 and at least one fixed beta > 0"
    else:
        comparisons = [versus(finals[a], finals[base]) for a in fixed]
        above = sum(c != "not above" for c in comparisons)
        verdict = "reproduced" if above > len(fixed) / 2 and "clearly above" in comparisons else "partly" if above else "not reproduced"
        best = max(fixed, key=lambda a: finals[a].mean if finals[a] else -1)
        ours = (f"{above} of {len(fixed)} fixed beta above beta = 0 ({comparisons.count('clearly above')} clearly); best fixed beta "
                f"{arms[best][0]['config']['beta']} at {pct(finals[best])} vs {pct(finals[base])} for beta = 0")
        auto = [a for a in order if beta_of(a) == math.inf and runs[a]]
        if auto:
            ours += f"; auto: {pct(finals[auto[0]])}"
    lines += ["", f"Verdict: **{verdict}** ({ours}).", ""]

    fig, axes = plots.figure(2)
    ax = axes[0]
    shown = [a for a in order if finals[a] is not None]
    for i, arm in enumerate(shown):
        e = finals[arm]
        err = None if e.low is None else [[e.mean - e.low], [e.high - e.mean]]
        ax.errorbar([i], [e.mean], yerr=err, fmt="o", color=_color(i), capsize=4)
    ax.set_xticks(range(len(shown)), ["0 (std)" if beta_of(a) == 0 else arms[a][0]["config"]["beta"] for a in shown])
    ax.set_xlabel("beta")
    ax.set_ylabel("final accuracy (sampled)")
    ax.set_title("final accuracy by beta", fontsize=9)
    ax.grid(alpha=0.3)
    ax = axes[1]
    for i, arm in enumerate(shown):
        xs, estimates = band(runs[arm], VERDICT_METRIC)
        if xs:
            ax.plot(xs, [e.mean for e in estimates], color=_color(i), label=f"beta {arms[arm][0]['config']['beta'] if beta_of(arm) else '0'}")
            if all(e.low is not None for e in estimates):
                ax.fill_between(xs, [e.low for e in estimates], [e.high for e in estimates], color=_color(i), alpha=0.15, linewidth=0)
    ax.set_xlabel("episodes")
    ax.set_title("RL task, sampled", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.suptitle("Sensitivity to beta (mean over seeds, 95% interval)", fontsize=10)
    lines += [f"![figure 6]({plots.save(fig, 'beta_sweep')})", ""]
    return Section(lines, [(finding, PAPER_CLAIMS["beta_sweep"], ours, verdict)])


def section_tracked_tokens(rep: Reproduction, plots: Plots) -> Section:
    from .addition import TRACKED_TOKENS, tracked_token_key

    title = "Critical-token probabilities during RL (figures 4 right and 7)"
    finding = "Prioritized KL keeps the critical tokens right (figure 7)"
    state = rep.state("kl_comparison")
    if "tracked_tokens" not in rep.preset["experiments"] or state == "not run":
        return _not_run(title, "not in the preset" if state != "not run" else state, [(finding, "tracked_tokens")])
    arms = rep.arms("kl_comparison")
    runs = _arm_runs(rep, "kl_comparison")
    keys = [("p_correct/" + tracked_token_key(s, o, n), f"step {s}, operand {o}: {n}") for s, o, n in TRACKED_TOKENS]
    keys = [(k, t) for k, t in keys if any(at(r, k, "final") for r in runs.values())]
    standard = _standard_arm(arms)
    prioritized = next((a for a, jobs in arms.items() if jobs[0]["config"]["kl"] == "prioritized" and runs[a]), None)
    lines = [f"## {title}", "", f"From the kl_comparison runs: the policy's probability (at its temperature) of the right token at the tracked critical "
             "tokens, teacher-forced on a fixed probe set of N+1-digit additions; initial → final, mean over seeds [95% interval].", "",
             "| token | " + " | ".join(arms) + " |", "|---" * (len(arms) + 1) + "|"]
    for key, label in keys:
        lines.append(f"| {label} | " + " | ".join(f"{num(seeds_at(runs[a], key, 'initial'))} → {num(seeds_at(runs[a], key, 'final'))}"
                                                  for a in arms) + " |")
    if standard is None or prioritized is None or not runs[standard] or not keys:
        verdict, ours = "not run", "needs a standard and a prioritized arm with tracked tokens"
    else:
        comparisons = [versus(seeds_at(runs[prioritized], k, "final"), seeds_at(runs[standard], k, "final")) for k, _ in keys]
        above, clear = sum(c != "not above" for c in comparisons), comparisons.count("clearly above")
        verdict = "reproduced" if above == len(keys) and clear >= len(keys) / 2 else "partly" if above > len(keys) / 2 else "not reproduced"
        ours = f"{prioritized} above {standard} at {above} of {len(keys)} tracked tokens ({clear} clearly)"
    lines += ["", f"Verdict: **{verdict}** ({ours}).", ""]
    if keys:
        path = plot_curves(plots, "tracked_tokens", "p(right token) at the tracked critical tokens", runs, keys, rows=2 if len(keys) > 3 else 1)
        lines += [f"![figure 7]({path})", ""] if path else []
    return Section(lines, [(finding, PAPER_CLAIMS["tracked_tokens"], ours, verdict)])


def section_kl_by_model(rep: Reproduction, plots: Plots) -> Section:
    title = "The KL comparison from several starting models (beyond the paper)"
    finding = "Prioritized KL's gain vs the starting N+1 competence"
    state = rep.state("kl_by_model")
    if state == "not run":
        return _not_run(title, state, [(finding, "kl_by_model")])
    by_model: dict[str, dict[str, list[dict]]] = {}
    for arm, jobs in rep.arms("kl_by_model").items():
        model, name = arm.split("/", 1)
        by_model.setdefault(model, {})[name] = jobs
    runs = {m: {a: rep.metrics(jobs) for a, jobs in arms.items()} for m, arms in by_model.items()}

    def initial(m: str, key: str) -> Estimate | None:  # every arm starts from the same model: pool its seeds
        return over_seeds([v for r in runs[m].values() for v in at(r, key, "initial")], key, next(iter(runs[m].values())))

    start = {m: initial(m, "eval/accuracy_greedy") for m in by_model}  # where RL starts, greedy
    order = sorted(by_model, key=lambda m: (start[m] or Estimate(-1, None, None, 0)).mean)
    arm_names = list(next(iter(by_model.values())))
    first = next(iter(by_model[order[0]].values()))[0]["config"]
    lines = [f"## {title}", "", f"State: {state}. The arms of figure 4 from each model (RL on {first['task']}, KL coefficient "
             f"{first['kl_coef']}, estimator {first['estimator']}), ordered by the model's greedy accuracy on the RL task before RL. "
             f"N+1 dose: the fraction of (N+1)-digit additions in the model's pre-training data (a deviation from the paper). "
             f"Final `{VERDICT_METRIC}`, mean over seeds [95% interval].", "",
             "| model | N+1 dose | seeds | initial (greedy) | initial (sampled) | " + " | ".join(f"{a} final (sampled)" for a in arm_names) + " | verdict |",
             "|---" * (6 + len(arm_names)) + "|"]
    verdicts, ours = {}, []
    for m in order:
        arms = by_model[m]
        finals = {a: seeds_at(runs[m][a], VERDICT_METRIC, "final") for a in arms}
        standard = _standard_arm(arms)
        per_arm = {a: VERDICT[versus(finals[a], finals[standard])] for a, jobs in arms.items()
                   if jobs[0]["config"]["kl"] == "prioritized" and standard and runs[m][a] and runs[m][standard]}
        verdicts[m] = next((v for v in ("reproduced", "partly", "not reproduced") if v in per_arm.values()), None)
        dose = rep.models[m]["config"].get("n_plus_one_fraction", 0.0)
        lines.append(f"| {m} | {100 * dose:g}% | {min(len(rep.finished(j)) for j in arms.values())}/{max(len(j) for j in arms.values())} | "
                     f"{pct(start[m])} | {pct(initial(m, VERDICT_METRIC))} | "
                     + " | ".join(pct(finals.get(a)) for a in arm_names) + f" | {'; '.join(f'{a}: {v}' for a, v in per_arm.items()) or '-'} |")
        if standard and verdicts[m]:
            ours.append(f"{m} (starts at {pct(start[m])} greedy): "
                        + ", ".join(f"{a} {pct(finals[a])}" for a in arms if a == standard or arms[a][0]["config"]["kl"] == "prioritized"))
    found = [v for v in verdicts.values() if v]
    overall = ("not run" if len(found) < 2 else "reproduced" if all(v == "reproduced" for v in found)
               else "partly" if any(v != "not reproduced" for v in found) else "not reproduced")
    if len(found) < 2:  # a dependence on the starting model needs two of them
        ours = [f"needs two models with finished runs; so far {'; '.join(ours) or 'none'}"]
    lines += ["", f"Verdict: **{overall}** ({'; '.join(ours)}).", ""]

    fig, axes = plots.figure(len(order) + 1, rows=1 if len(order) < 3 else 2)
    for ax, m in zip(axes, order):
        for i, a in enumerate(arm_names):
            xs, estimates = band(runs[m].get(a, []), VERDICT_METRIC)
            if not xs:
                continue
            ax.plot(xs, [e.mean for e in estimates], color=_color(i), label=a)
            if all(e.low is not None for e in estimates):
                ax.fill_between(xs, [e.low for e in estimates], [e.high for e in estimates], color=_color(i), alpha=0.15, linewidth=0)
        ax.set_title(f"{m}: RL task, sampled", fontsize=9)
        ax.set_xlabel("episodes")
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3)
    for ax in axes[:-1]:
        if ax.lines:
            ax.legend(fontsize=7)
            break
    ax = axes[-1]
    starts = [start[m] for m in order]
    for i, a in enumerate(arm_names):
        points = [(s.mean, seeds_at(runs[m].get(a, []), VERDICT_METRIC, "final")) for m, s in zip(order, starts) if s]
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
    lines += [f"![KL by starting model]({plots.save(fig, 'kl_by_model')})", ""]
    return Section(lines, [(finding, PAPER_CLAIMS["kl_by_model"], "; ".join(ours) or "-", overall)])


SECTIONS = (section_levels, section_table1, section_rl_levels, section_kl_comparison, section_beta_sweep, section_tracked_tokens,
            section_kl_by_model)


# --- 6. Header, hyper-parameters, runs -------------------------------------------------------------------------


def _header(rep: Reproduction) -> list[str]:
    meta, timing = rep.meta, rep.timing or {}
    hw = timing.get("hardware", {})
    machine = (f"{hw.get('cpu', '?')}, {hw.get('cores', '?')} cores" + (f", {hw['gpus']} x {hw['gpu']}" if hw.get("gpu") else ", no GPU")
               + f"; {hw.get('platform', '?')}; Python {hw.get('python', '?')}, torch {hw.get('torch', '?')}") if hw else "not recorded"
    wall = timing.get("wall_s")
    invocations = timing.get("invocations", [])
    lines = [f"# Reproduction of \"Ignore the KL Penalty!\": preset `{meta['preset_name']}`", "",
             "Generated by `critical-tokens report` from the files of this reproduction; every number below comes from them.", "",
             f"- Command: `{meta['command']}`",
             f"- Preset: `{meta['preset_name']}` ({Path(meta['preset_source']).name}): {rep.preset.get('description', '')}"]
    if rep.preset.get("notes"):
        lines.append(f"- Preset notes: {rep.preset['notes']}")
    lines += [f"- Hardware: {machine}",
              f"- Wall time: {_duration(wall) if wall is not None else 'not recorded'}"
              + (f" over {len(invocations)} invocations (resumed)" if len(invocations) > 1 else "")
              + f"; {meta['parallel_jobs']} runs in parallel, {meta['threads_per_job']} torch thread(s) per run",
              f"- Initialisation of the pre-trained models: " + ", ".join(f"{m}: {d['init']}" + (f" (shipped checkpoint `{d['shipped']}`)" if d.get("shipped") else "")
                                                                         for m, d in rep.models.items()), ""]
    return lines


def _duration(seconds: float) -> str:
    minutes, s = divmod(int(round(seconds)), 60)
    return f"{minutes // 60}h{minutes % 60:02d}m{s:02d}s" if minutes >= 60 else f"{minutes}m{s:02d}s"


def _hyperparameters(rep: Reproduction) -> list[str]:
    preset = rep.preset
    lines = ["## Hyper-parameters", "", f"Everything the preset `{rep.meta['preset_name']}` fixes; the fully resolved config of every run is in "
             "`reproduce.json` and in each run's `config.json`.", "", "**Pre-trained models** (`PretrainConfig`)", ""]
    models = list(rep.models)
    fields = list(next(iter(rep.models.values()))["config"])
    lines += ["| field | " + " | ".join(models) + " |", "|---" * (len(models) + 1) + "|"]
    lines += [f"| {f} | " + " | ".join(f"{rep.models[m]['config'][f]}" for m in models) + " |" for f in fields]
    lines.append("| shipped checkpoint | " + " | ".join(f"{rep.models[m].get('shipped') or '-'}" for m in models) + " |")
    lines.append("| directory | " + " | ".join(f"`{rep.models[m]['dir']}`" for m in models) + " |")
    for section, config_name, job_kind in (("evaluate", "EvaluateConfig", "evaluate"), ("critical", "CriticalConfig", "critical"), ("rl", "RLConfig", "rl")):
        job = next((j for j in rep.jobs if j["kind"] == job_kind), None)
        if job is None:
            continue
        resolved = {k: v for k, v in job["config"].items() if k not in ("run", "out", "pretrained", "seed", "device", "resume")}
        if section == "rl":  # the shared base: RLConfig's defaults under the preset's "rl" section
            from dataclasses import asdict

            from .preset_fields import section_fields
            from .rl import RLConfig

            resolved = {k: v for k, v in asdict(RLConfig(**section_fields(preset, "rl", {}))).items() if k in resolved}
        lines += ["", f"**{section}** (`{config_name}`{', shared by every RL run; experiments override some below' if section == 'rl' else ''})", "",
                  "| field | value | set by the preset |", "|---|---|---|"]
        lines += [f"| {k} | {v} | {'yes' if k in preset.get(section, {}) else 'default'} |" for k, v in resolved.items()]
    lines += ["", "**Experiments**", "", "| experiment | specification |", "|---|---|"]
    for name, spec in preset["experiments"].items():
        lines.append(f"| {name} | `{json.dumps(spec)}` |")
    return lines + [""]


def _runs_table(rep: Reproduction) -> list[str]:
    lines = ["## Runs", "", "| run | state | wall time | directory |", "|---|---|---|---|"]
    for job in rep.jobs:
        done = rep.done(job)
        state = "done" if done else "not finished"
        where = f"`{job['dir']}`" if not job.get("same_as") else f"shares `{job['same_as_dir']}`"
        wall = _duration(done["wall_s"]) + (" (resumed)" if done.get("resumed") else "") if done and not job.get("same_as") else "-"
        lines.append(f"| {job['name']} | {state} | {wall} | {where} |")
    per_experiment = {}
    for job in rep.jobs:
        done = rep.done(job)
        if done and not job.get("same_as"):
            per_experiment[job["experiment"]] = per_experiment.get(job["experiment"], 0.0) + done["wall_s"]
    lines += ["", "Compute time per experiment (sum of its runs' wall times): "
              + ", ".join(f"{e} {_duration(s)}" for e, s in per_experiment.items()) + ".", ""]
    return lines


def build_markdown(rep: Reproduction, plots: Plots) -> str:
    sections = [section(rep, plots) for section in SECTIONS]
    lines = _header(rep)
    lines += ["## Summary", "", "| finding | the paper | ours | verdict |", "|---|---|---|---|"]
    for s in sections:
        lines += [f"| {f} | {p} | {o} | **{v}** |" for f, p, o, v in s.summary]
    lines += ["", "Verdicts are computed by the rules at the end of this report. A verdict is about this preset's scale, "
              "not about the paper.", ""]
    for s in sections:
        lines += s.lines
    lines += ["## Verdict rules", "", VERDICT_RULES]
    lines += _hyperparameters(rep)
    lines += _runs_table(rep)
    return "\n".join(lines).rstrip() + "\n"


# --- 7. The command ---------------------------------------------------------------------------------------


def report(config: ReportConfig) -> Path:
    """Rebuilds REPORT.md and plots/ from a reproduction's files."""
    if config.run is None:
        raise UserError("give the reproduction directory: critical-tokens report RUN_DIR")
    rep = Reproduction(config.run)
    target = Path(config.to) if config.to else rep.root
    check_output(str(target), "--to", directory=True)
    target.mkdir(parents=True, exist_ok=True)
    with atomic_dir(target / "plots") as tmp:
        markdown = build_markdown(rep, Plots(tmp))
    atomic_write_text(target / "REPORT.md", markdown)
    print(f"wrote {target / 'REPORT.md'} and {target / 'plots'}/")
    return target / "REPORT.md"


# --- 8. Experiment tracking from the files: TensorBoard always, Weights & Biases on request ----------------------


def _scalars(record: dict) -> dict[str, float]:
    return {k: float(v) for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "episodes", "iteration")}


def write_tensorboard(run_dir: str | Path) -> Path:
    """RUN/tb/: TensorBoard event files of RUN/metrics.jsonl (x axis: episodes for RL, steps for
    pre-training); rewritten whole, so it always matches the metrics file."""
    from torch.utils.tensorboard import SummaryWriter

    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    with atomic_dir(run_dir / "tb") as tmp:
        writer = SummaryWriter(log_dir=str(tmp))
        for r in records:
            step = int(r.get("episodes", r.get("step", 0)))
            for key, value in _scalars(r).items():
                writer.add_scalar(key, value, step)
        writer.close()
    return run_dir / "tb"


def log_wandb(run_dir: str | Path, name: str, group: str, config: dict) -> None:
    """Logs a finished run's metrics.jsonl to Weights & Biases: offline (``wandb sync`` uploads it
    later) unless WANDB_API_KEY is set."""
    import wandb

    run_dir = Path(run_dir)
    mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
    run = wandb.init(project=os.environ.get("WANDB_PROJECT", "critical-tokens"), name=name, group=group, config=config,
                     dir=str(run_dir), mode=mode, reinit=True)
    for r in read_metrics(run_dir):
        run.log(_scalars(r), step=int(r.get("episodes", r.get("step", 0))))
    run.finish()
