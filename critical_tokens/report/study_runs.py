"""The runs of a pre-registered study (the ``confirm`` experiment), by arm and (instance, seed) unit.

Every planned run is a unit of its arm, finished or not, so that an analysis can say which units it
used and which it left out, and why: a run not finished, a finished run whose final evaluation
cannot be read (its last metrics line cut short or missing), or one without the metric. The
endpoints are each run's final evaluation on the large held-out sets: the ``final/...`` keys of its
last record. This module also formats an endpoint's values: accuracies (fractions) in points,
anything else (a KL, a log-probability, a ratio) as it is, to three significant digits.
"""

from __future__ import annotations

from ..runs import read_metrics
from .study_dir import StudyDir, series

Unit = tuple[str, int]  # (model instance, RL seed): the unit the arms are paired on
SELECTION = ("precision", "recall", "share")  # of the tokens a method frees, against the critical ones (critical/selection.py)
# The continuous endpoints of the final evaluation, shown per arm where the runs have them (older
# studies do not): the realized penalty ratio (median over collects of kl_term / kl), the mean
# per-token KL(policy || reference) on the policy's greedy in-distribution completions (lower:
# closer to the reference), the mean per-token log-probability of the right in-distribution
# completion, and the same KL on N+1 prompts (how far the policy travelled).
CONTINUOUS = {"penalty_ratio": ("final/penalty_ratio", "realized penalty ratio"),
              "comfort_kl": ("final/comfort_kl", "in-distribution KL to the reference"),
              "comfort_logprob": ("final/comfort_logprob", "log p(right in-distribution answer) per token"),
              "n_plus_1_kl": ("final/n_plus_1_kl", "N+1 KL to the reference")}


def study_runs(rep: StudyDir) -> dict[str, dict[Unit, dict]]:
    """Per arm, per planned (instance, seed) unit: ``done`` (the run finished), ``final`` (its last
    record when that holds the final evaluation, else {}), the mean over iterations of its
    ``weight_mean`` and of its selection metrics (None without them) and the KL coefficient it applied."""
    arms: dict[str, dict[Unit, dict]] = {}
    for job in rep.experiment_jobs("confirm"):
        model, arm = job["arm"].split("/", 1)
        done = rep.done(job) is not None
        records = read_metrics(rep.results_dir(job)) if done else []
        last = records[-1] if records else {}
        coef = rep.run_config(job).get("kl_coef_used", job["config"]["kl_coef"])  # matched-weight: kl_coef x E[c^beta]
        arms.setdefault(arm, {})[(model, job["seed"])] = {
            "done": done, "final": last if any(k.startswith("final/") for k in last) else {}, "weight": _run_mean(records, "weight_mean"),
            "kl_coef": None if job["config"]["kl"] == "none" else coef,
            **{key: _run_mean(records, f"selection/{key}") for key in SELECTION}}
    return arms


def _run_mean(records: list[dict], key: str) -> float | None:
    """A run's mean over its iterations of ``key`` (None where it never logged one)."""
    values = series(records, key)
    return sum(values.values()) / len(values) if values else None


def finished(runs: dict[Unit, dict]) -> dict[Unit, dict]:
    return {unit: r for unit, r in runs.items() if r["done"]}


def values(runs: dict[Unit, dict], metric: str) -> dict[Unit, float]:
    """``metric`` of each finished run whose final evaluation has it."""
    return {unit: r["final"][metric] for unit, r in runs.items() if r["done"] and r["final"].get(metric) is not None}


def why_missing(run: dict | None, arm: str, metric: str) -> str | None:
    """Why a unit of ``arm`` has no value of ``metric`` (None when it has one)."""
    if run is None:
        return f"{arm}: no run planned"
    if not run["done"]:
        return f"{arm}: run not finished"
    if not run["final"]:
        return f"{arm}: final evaluation unreadable (its last metrics line is missing or cut short)"
    if run["final"].get(metric) is None:
        return f"{arm}: final evaluation has no `{metric}`"
    return None


def left_out(runs: dict[str, dict[Unit, dict]], arms: tuple[str, str], metric: str) -> dict[Unit, str]:
    """The planned units of either arm that a comparison of ``arms`` on ``metric`` cannot use, and why."""
    units = sorted(set(runs.get(arms[0], {})) | set(runs.get(arms[1], {})))
    reasons = {unit: [why_missing(runs.get(arm, {}).get(unit), arm, metric) for arm in arms] for unit in units}
    return {unit: "; ".join(r for r in why if r) for unit, why in reasons.items() if any(why)}


def in_points(metric: str) -> bool:
    """An accuracy (a fraction) is shown in points; any other endpoint as it is."""
    return "accuracy" in metric


def value_text(metric: str, x: float | None, sign: bool = True) -> str:
    """A value or a difference of ``metric``: "+12.5" (points) for an accuracy, "+0.0123" otherwise."""
    if x is None:
        return "-"
    return f"{100 * x:{'+' if sign else ''}.1f}" if in_points(metric) else f"{x:{'+' if sign else ''}.3g}"


def margin_text(metric: str, margin: float, plus_minus: bool = False) -> str:
    """A margin in the metric's units: "+2.0" / "±3.0 points" for an accuracy, "±0.05" otherwise."""
    if not plus_minus:
        return value_text(metric, margin)
    return f"±{value_text(metric, margin, sign=False)}" + (" points" if in_points(metric) else "")


def unit_order(units, instances: list[str]) -> list[Unit]:
    """Units by the study's instance order, then seed."""
    return sorted(units, key=lambda u: (instances.index(u[0]) if u[0] in instances else len(instances), u))


def unit_table(runs: dict[str, dict[Unit, dict]], arm_names: list[str], metric: str, instances: list[str]) -> list[str]:
    """``metric`` of each run, a row per (instance, seed) unit and a column per arm ("-": no value)."""
    per_arm = {arm: values(runs.get(arm, {}), metric) for arm in arm_names}
    units = unit_order({u for v in per_arm.values() for u in v}, instances)
    scale = " (%)" if in_points(metric) else ""
    return [f"`{metric}`{scale} of each run:", "", "| instance | seed | " + " | ".join(arm_names) + " |", "|---" * (len(arm_names) + 2) + "|",
            *[f"| {m} | {s} | " + " | ".join(value_text(metric, per_arm[a].get((m, s)), sign=False) for a in arm_names) + " |"
              for m, s in units]]
