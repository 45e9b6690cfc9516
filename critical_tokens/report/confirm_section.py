"""The section of REPORT.md on the pre-registered confirmatory study (the ``confirm`` experiment).

Every arm runs from the same model instances at the same RL seeds, so the study is analysed paired:
per hypothesis the differences over the (instance, seed) units both arms finished, the one-sided
paired t-test with the Wilcoxon signed-rank test as a check, Holm's correction over all the study's
hypotheses, and the decision rule fixed in the pre-registration (`paired.decide`). The endpoints are
each run's final evaluation on the large held-out sets: the ``final/...`` keys of its last record.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ..runs import read_metrics
from .document import Section, not_run
from .paired import HypothesisResult, decide, decide_per_arm, hypothesis_results, paired_differences
from .paper import PAPER_CLAIMS
from .plots import ACCURACY_PANELS, Plots, plot_curves
from .reproduction import Reproduction, series
from .statistics import num, pct, proportion_interval, t_interval, weight_text

TITLE = "Pre-registered confirmation: prioritized KL against standard KL and strength-matched controls"
FINDING = "Prioritized KL beats standard KL and strength-matched controls (pre-registered)"
# The endpoints of the final evaluation (fractions in [0, 1]), and the config field that gives the
# prompts behind each accuracy (the Wilson interval's trials).
ENDPOINTS = {"sampled": ("final/accuracy_sampled", "final_eval_episodes"), "greedy": ("final/accuracy_greedy", "final_eval_episodes"),
             "comfort_greedy": ("final/comfort_accuracy_greedy", "final_eval_comfort_episodes"),
             "p_correct_critical": ("final/p_correct/critical_mean", None)}

Unit = tuple[str, int]  # (model instance, RL seed): the unit the arms are paired on


def _runs(rep: Reproduction) -> dict[str, dict[Unit, dict]]:
    """Per arm, per (instance, seed) unit of a finished run: its final record (``final``), the mean
    over iterations of its ``weight_mean`` (None without one) and the KL coefficient it applied."""
    arms: dict[str, dict[Unit, dict]] = {}
    for job in rep.finished(rep.experiment_jobs("confirm")):
        model, arm = job["arm"].split("/", 1)
        records = read_metrics(rep.results_dir(job))
        coef = rep.run_config(job).get("kl_coef_used", job["config"]["kl_coef"])  # matched-weight: kl_coef x E[c^beta]
        arms.setdefault(arm, {})[(model, job["seed"])] = {
            "final": records[-1] if records else {}, "weight": _run_mean(records, "weight_mean"),
            "kl_coef": None if job["config"]["kl"] == "none" else coef,
            **{key: _run_mean(records, f"selection/{key}") for key in SELECTION}}
    return arms


SELECTION = ("precision", "recall", "share")  # of the tokens a method frees, against the critical ones (selection.py)


def _run_mean(records: list[dict], key: str) -> float | None:
    """A run's mean over its iterations of ``key`` (None where it never logged one)."""
    values = series(records, key)
    return sum(values.values()) / len(values) if values else None


def _values(runs: dict[Unit, dict], metric: str) -> dict[Unit, float]:
    return {unit: r["final"][metric] for unit, r in runs.items() if r["final"].get(metric) is not None}


def _points(x: float | None, sign: bool = True) -> str:
    return "-" if x is None else f"{100 * x:{'+' if sign else ''}.1f}"


def _p(p: float | None) -> str:
    return "-" if p is None else f"{p:.4f}" if p >= 1e-4 else f"{p:.1e}"


def _instance_mean(pairs: list[tuple[Unit, float]], model: str) -> dict:
    """The mean paired difference over one instance's seeds (None without a pair), and their number."""
    ds = [d for (m, _), d in pairs if m == model]
    return {"mean": float(np.mean(ds)) if ds else None, "n": len(ds)}


def _kl(config: dict) -> str:
    if config["kl"] == "prioritized":
        return f"prioritized (beta {config['beta']})"
    return config["kl"] + (f" (alpha x E[c^{config['match_weight_beta']:g}])" if config.get("match_weight_beta") is not None else "")


def _coef_range(coefs: list[float]) -> list[float] | None:
    return [float(min(coefs)), float(max(coefs))] if coefs else None


REPOSITORY = Path(__file__).resolve().parents[2]


def _deviations(spec: dict) -> list[str]:
    """The deviations from the pre-registration, written by hand beside it as ``<name>-deviations.md``
    (its lines, without a title), or a line saying that none is recorded."""
    document = spec.get("preregistration")
    path = REPOSITORY / document.replace(".md", "-deviations.md") if document else None
    if path is None or not path.is_file():
        return ["None recorded" + (f" (`{path.relative_to(REPOSITORY)}` does not exist)." if path else ".")]
    return [line for line in path.read_text().splitlines() if not line.startswith("# ")]


def plot_paired(plots: Plots, results: dict[str, HypothesisResult], pairs: dict[str, list[tuple[Unit, float]]],
                titles: dict[str, str], instances: list[str]) -> str:
    """One panel per hypothesis: its paired differences (points) as dots per instance, then the
    pooled mean with its 95% t interval; the margin dashed where it is not 0."""
    fig, axes = plots.figure(len(results), width=3.4, rows=max(1, math.ceil(len(results) / 4)))  # at most 4 panels a row
    for ax, (h, r) in zip(axes, results.items()):
        for i, m in enumerate(instances):
            ys = [100 * d for (model, _), d in pairs[h] if model == m]
            ax.plot(i + np.linspace(-0.15, 0.15, len(ys)) if len(ys) > 1 else [i] * len(ys), ys, "o", color=f"C{i % 10}", alpha=0.6, markersize=4)
        if r.test is not None:
            err = None if r.test.low is None else [[100 * (r.test.mean - r.test.low)], [100 * (r.test.high - r.test.mean)]]
            ax.errorbar([len(instances)], [100 * r.test.mean], yerr=err, fmt="s", color="black", capsize=4)
        ax.axhline(0, color="black", linewidth=0.8)
        if r.margin:
            ax.axhline(100 * r.margin, color="grey", linestyle="--", linewidth=0.8)
        ax.set_xticks(range(len(instances) + 1), instances + ["pooled"])
        ax.set_ylabel("difference (points)")
        ax.set_title(titles[h], fontsize=9)
        ax.grid(alpha=0.3)
    fig.suptitle("Paired differences per (instance, seed); pooled mean and 95% t interval", fontsize=10)
    return plots.save(fig, "confirm")


def section_confirm(rep: Reproduction, plots: Plots) -> Section:
    spec = rep.preset["experiments"].get("confirm")
    state = rep.state("confirm")
    title = (spec or {}).get("title", TITLE)
    finding = FINDING if title == TITLE else f"{title} (pre-registered)"
    if spec is None or state == "not run":
        return not_run(title, "not in the preset" if spec is None else state, [(finding, "kl_comparison")])
    alpha = spec.get("alpha", 0.05)
    instances, hypotheses = list(spec["models"]), spec["hypotheses"]
    arm_jobs: dict[str, list[dict]] = {}
    for key, jobs in rep.arms("confirm").items():
        arm_jobs.setdefault(key.split("/", 1)[1], []).extend(jobs)
    arm_names = [a["name"] for a in spec["arms"] if a["name"] in arm_jobs]
    runs = _runs(rep)
    commit = rep.meta.get("preregistration_commit") or "not recorded"
    lines = [f"## {title}", "",
             f"State: {state}. Pre-registration: `{spec.get('preregistration', 'none')}` (first committed in `{commit}`); "
             f"code: git commit `{rep.meta.get('git_commit') or 'not recorded'}`. Instances {', '.join(instances)}, the same RL seeds in "
             f"every arm; endpoints from each run's final evaluation on the held-out sets.", ""]

    # Per arm, pooled over instances and seeds (descriptive: the tests below are paired).
    lines += ["Per arm, pooled over instances and seeds: mean [95% interval]; KL coefficient used: lowest..highest over runs "
              "(from config.json); mean KL weight: mean over iterations of `weight_mean`, mean over runs.", "",
              "| arm | KL | runs | final (sampled) | final (greedy) | final in-distribution (greedy) | p(right) at critical tokens "
              "| KL coefficient used | mean KL weight |", "|---|---|---|---|---|---|---|---|---|"]
    per_arm = {}
    for arm in arm_names:
        config, r = arm_jobs[arm][0]["config"], runs.get(arm, {})
        final = {name: proportion_interval(list(_values(r, key).values()), config.get(field) if field else None)
                 for name, (key, field) in ENDPOINTS.items()}
        coefs = _coef_range([x["kl_coef"] for x in r.values() if x["kl_coef"] is not None])
        weight = t_interval([x["weight"] for x in r.values() if x["weight"] is not None])
        per_arm[arm] = {"kl": _kl(config), "runs": len(r), "of": len(arm_jobs[arm]), "final": final, "kl_coef_used": coefs, "mean_kl_weight": weight}
        coef_text = "-" if coefs is None else f"{coefs[0]:.4g}" + (f"..{coefs[1]:.4g}" if coefs[1] != coefs[0] else "")
        lines.append(f"| {arm} | {_kl(config)} | {len(r)}/{len(arm_jobs[arm])} | {pct(final['sampled'])} | {pct(final['greedy'])} | "
                     f"{pct(final['comfort_greedy'])} | {num(final['p_correct_critical'])} | {coef_text} | {weight_text(None if weight is None else weight.mean)} |")

    # The tokens each method frees, against the template's critical tokens (arms that log them).
    selecting = [arm for arm in arm_names if any(x["share"] is not None for x in runs.get(arm, {}).values())]
    if selecting:
        lines += ["", "The tokens each arm frees or favours, against the template's critical tokens of the same rollouts (tokens up to "
                  "a rollout's first wrong character): precision (the share of the freed tokens that are critical), recall (the share "
                  "of the critical tokens freed) and share (of all those tokens freed); per run the mean over its collects, then "
                  "the mean over runs [95% interval].", "", "| arm | precision | recall | share freed |", "|---|---|---|---|"]
        for arm in selecting:
            cells = {key: t_interval([x[key] for x in runs[arm].values() if x[key] is not None]) for key in SELECTION}
            per_arm[arm]["selection"] = cells
            lines.append(f"| {arm} | " + " | ".join(num(cells[key]) for key in SELECTION) + " |")
        over_training = plot_curves(plots, "confirm_selection", "The tokens each arm frees, against the critical tokens, during RL",
                                    {arm: rep.metrics(arm_jobs[arm]) for arm in selecting},
                                    [(f"selection/{key}", key) for key in SELECTION], ylabel="fraction")
        lines += ["", f"![selection during RL]({over_training})"] if over_training else []

    # The hypotheses: paired differences, tests, Holm over all of them, the decision.
    pairs = {h["name"]: paired_differences(_values(runs.get(h["arm"], {}), h["metric"]), _values(runs.get(h["versus"], {}), h["metric"]))
             for h in hypotheses}
    roles = {h["name"]: h["role"] for h in hypotheses}
    results = hypothesis_results({h: [d for _, d in p] for h, p in pairs.items()}, {h["name"]: h["margin"] for h in hypotheses}, roles)
    per_arm_rule = spec.get("decision", "confirm") == "per-arm"
    verdicts = decide_per_arm(results, {h["name"]: h["arm"] for h in hypotheses}, alpha) if per_arm_rule else {}
    decision = _summary(verdicts, results, alpha) if per_arm_rule else decide(results, roles, alpha)
    lines += ["", f"Each hypothesis tests mean(arm - versus) > margin over the (instance, seed) units both arms finished; "
              f"differences in points; one-sided paired t-test, Holm's correction over the {len(hypotheses)} hypotheses, "
              f"Wilcoxon signed-rank test (zeros dropped) as a check; rejects: Holm p < {alpha:g}.", "",
              "| hypothesis | role | arm - versus | metric | margin | pairs | mean difference [95%] | t-test p | Holm p | Wilcoxon p | rejects |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    per_hypothesis, per_instance = {}, {}
    for h in hypotheses:
        r, t = results[h["name"]], results[h["name"]].test
        per_hypothesis[h["name"]] = {"arm": h["arm"], "versus": h["versus"], "metric": h["metric"], "margin": h["margin"], "role": h["role"],
                                     **(asdict(t) if t else {"n": 0}), "p_holm": r.p_holm, "rejects": r.rejects(alpha)}
        shown = "-" if t is None else _points(t.mean) + (f" [{_points(t.low)}, {_points(t.high)}]" if t.low is not None else "")
        lines.append(f"| {h['name']} | {h['role']} | {h['arm']} - {h['versus']} | `{h['metric']}` | {_points(h['margin'])} | {t.n if t else 0} | "
                     f"{shown} | {_p(t and t.p_t)} | {_p(r.p_holm)} | {_p(t and t.p_wilcoxon)} | {'yes' if r.rejects(alpha) else 'no'} |")
        per_instance[h["name"]] = {m: _instance_mean(pairs[h["name"]], m) for m in instances}
    rejected = [h for h, r in results.items() if r.rejects(alpha)]
    kept = [h for h in results if h not in rejected]
    why = f"rejected at {alpha:g} after Holm: {', '.join(rejected) or 'none'}; not rejected: {', '.join(kept) or 'none'}"
    lines += ["", f"Decision (the pre-registered rule): **{decision}** ({why}).", ""]
    if per_arm_rule:
        lines += ["Verdict per arm (its gain hypothesis and its comfort-zone hypothesis, after Holm):", "",
                  "| arm | verdict |", "|---|---|", *[f"| {arm} | {verdict} |" for arm, verdict in verdicts.items()], ""]
    lines += [
              "Mean difference (points) per instance (n: paired seeds):", "",
              "| hypothesis | " + " | ".join(instances) + " | pooled |", "|---" * (len(instances) + 2) + "|"]
    for h in hypotheses:
        cells = [f"{_points(c['mean'])} (n={c['n']})" for c in per_instance[h["name"]].values()]
        t = results[h["name"]].test
        lines.append(f"| {h['name']} | " + " | ".join(cells) + f" | {_points(t.mean) if t else '-'} (n={t.n if t else 0}) |")

    # The primary metric per unit, so that a reader can check the pairs.
    primary = next(h for h in hypotheses if h["role"] == "primary")
    values = {arm: _values(runs.get(arm, {}), primary["metric"]) for arm in arm_names}
    units = sorted({u for v in values.values() for u in v}, key=lambda u: (instances.index(u[0]) if u[0] in instances else len(instances), u))
    lines += ["", f"`{primary['metric']}` (%) of each run:", "", "| instance | seed | " + " | ".join(arm_names) + " |",
              "|---" * (len(arm_names) + 2) + "|"]
    lines += [f"| {m} | {s} | " + " | ".join(_points(values[a].get((m, s)), sign=False) for a in arm_names) + " |" for m, s in units]
    titles = {h["name"]: f"{h['name']} ({h['role']}): {h['arm']} - {h['versus']}\n{h['metric'].removeprefix('final/')}" for h in hypotheses}
    lines += ["", f"![confirm]({plot_paired(plots, results, pairs, titles, instances)})", ""]
    curves = plot_curves(plots, "confirm_curves", "The study's arms during RL (intermediate evaluations, mean over instances and seeds)",
                         {arm: rep.metrics(arm_jobs[arm]) for arm in arm_names}, ACCURACY_PANELS)
    lines += ["The curves: each arm's intermediate evaluations (32 N+1 / 8 in-distribution prompts each, so noisier than the final "
              "evaluation above), mean over instances and seeds with 95% intervals.", "", f"![confirm curves]({curves})", ""] if curves else []
    lines += ["### Deviations from the pre-registration", "", *_deviations(spec), ""]

    t = results[primary["name"]].test
    ours = (f"{primary['name']} ({primary['arm']} - {primary['versus']}): "
            + (f"{_points(t.mean)} points" + (f" [{_points(t.low)}, {_points(t.high)}]" if t.low is not None else "") + f" over {t.n} pairs, "
               f"Holm p {_p(results[primary['name']].p_holm)}" if t else "no paired runs") + f"; decision: {decision}")
    jobs = rep.experiment_jobs("confirm")
    numbers = {"state": state, "decision": decision, "rule": spec.get("decision", "confirm"), "verdicts": verdicts, "alpha": alpha, "runs": len(rep.finished(jobs)), "of": len(jobs),
               "compute_s": rep.compute_s("confirm"), "git_commit": rep.meta.get("git_commit"),
               "preregistration": {"path": spec.get("preregistration"), "commit": rep.meta.get("preregistration_commit")},
               "arms": per_arm, "hypotheses": per_hypothesis, "per_instance": per_instance}
    return Section(lines, [(finding, PAPER_CLAIMS["kl_comparison"], ours, decision)], numbers)


def _summary(verdicts: dict[str, str], results: dict[str, HypothesisResult], alpha: float) -> str:
    """The per-arm rule's decision in one line: the arms of each verdict, then the comparisons that reject."""
    groups = {v: [arm for arm, x in verdicts.items() if x == v] for v in dict.fromkeys(verdicts.values())}
    parts = [f"{verdict}: {', '.join(arms)}" for verdict, arms in groups.items()]
    comparisons = [h for h, r in results.items() if r.role == "comparison"]
    if comparisons:
        shown = [h for h in comparisons if results[h].rejects(alpha)]
        parts.append(f"comparisons rejected: {', '.join(shown) or 'none'} of {', '.join(comparisons)}")
    return "; ".join(parts) or "not run"
