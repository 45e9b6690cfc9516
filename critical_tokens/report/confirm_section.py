"""The section of REPORT.md on the pre-registered confirmatory study (the ``confirm`` experiment).

Every arm runs from the same model instances at the same RL seeds, so the study is analysed paired:
per hypothesis the differences over the (instance, seed) units both arms have, the one-sided paired
t-test or, for an equivalence, TOST, with the Wilcoxon signed-rank test as a check, Holm's correction
over all the study's hypotheses, the instance-level analysis beside it (`hypotheses_section`), and
the decision rule fixed in the pre-registration (`paired.decide`, `decide_per_arm`, or
`decide_placement` with the placement share: `placement_section`). The endpoints are each run's
final evaluation on the large held-out sets: the ``final/...`` keys of its last record (`study_runs`).
"""

from __future__ import annotations

from pathlib import Path

from ..study.design import Hypothesis, Study
from . import hypotheses_section
from .document import Section, not_run
from .paired import decide, decide_per_arm, decision_summary
from .paper import PAPER_CLAIMS
from .placement_section import placement_lines, point_numbers, strength_curve_lines
from .plots import ACCURACY_PANELS, Plots, plot_curves
from .statistics import num, pct, proportion_interval, t_interval, weight_text
from .study_dir import StudyDir
from .study_runs import CONTINUOUS, SELECTION, finished, study_runs, unit_table, value_text, values

TITLE = "Pre-registered confirmation: prioritized KL against standard KL and strength-matched controls"
FINDING = "Prioritized KL beats standard KL and strength-matched controls (pre-registered)"
# The endpoints of the final evaluation (fractions in [0, 1]), and the config field that gives the
# prompts behind each accuracy (the Wilson interval's trials).
ENDPOINTS = {"sampled": ("final/accuracy_sampled", "final_eval_episodes"), "greedy": ("final/accuracy_greedy", "final_eval_episodes"),
             "comfort_greedy": ("final/comfort_accuracy_greedy", "final_eval_comfort_episodes"),
             "p_correct_critical": ("final/p_correct/critical_mean", None)}

def _kl(config: dict) -> str:
    if config["kl"] == "prioritized":
        return f"prioritized (beta {config['beta']})"
    return config["kl"] + (f" (alpha x E[c^{config['match_weight_beta']:g}])" if config.get("match_weight_beta") is not None else "")


def _coef_range(coefs: list[float]) -> list[float] | None:
    return [float(min(coefs)), float(max(coefs))] if coefs else None


REPOSITORY = Path(__file__).resolve().parents[2]


def _deviations(document: str | None) -> list[str]:
    """The deviations from the pre-registration ``document``, written by hand beside it as ``<name>-deviations.md``
    (its lines, without a title), or a line saying that none is recorded."""
    path = REPOSITORY / document.replace(".md", "-deviations.md") if document else None
    if path is None or not path.is_file():
        return ["None recorded" + (f" (`{path.relative_to(REPOSITORY)}` does not exist)." if path else ".")]
    return [line for line in path.read_text().splitlines() if not line.startswith("# ")]


def _arm_table(arm_names: list[str], arm_jobs: dict[str, list[dict]], runs: dict) -> tuple[list[str], dict]:
    """Per arm, pooled over instances and seeds: the endpoints with 95% intervals, the KL coefficient
    and weight, and the continuous endpoints where the runs have them."""
    continuous = [key for key, (metric, _) in CONTINUOUS.items() if any(values(runs.get(a, {}), metric) for a in arm_names)]
    lines = ["Per arm, pooled over instances and seeds: mean [95% interval]; KL coefficient used: lowest..highest over runs "
             "(from config.json); mean KL weight: mean over iterations of `weight_mean`, mean over runs"
             + "".join(f"; {CONTINUOUS[key][1]}: `{CONTINUOUS[key][0]}`" for key in continuous) + ".", "",
             "| arm | KL | runs | final (sampled) | final (greedy) | final in-distribution (greedy) | p(right) at critical tokens "
             "| KL coefficient used | mean KL weight |" + "".join(f" {CONTINUOUS[key][1]} |" for key in continuous),
             "|---|---|---|---|---|---|---|---|---|" + "---|" * len(continuous)]
    per_arm = {}
    for arm in arm_names:
        config, r = arm_jobs[arm][0]["config"], finished(runs.get(arm, {}))
        complete = sum(1 for x in r.values() if x["final"])  # finished with a readable final evaluation
        final = {name: proportion_interval(list(values(r, key).values()), config.get(field) if field else None)
                 for name, (key, field) in ENDPOINTS.items()}
        extra = {key: t_interval(list(values(r, CONTINUOUS[key][0]).values())) for key in CONTINUOUS}
        coefs = _coef_range([x["kl_coef"] for x in r.values() if x["kl_coef"] is not None])
        weight = t_interval([x["weight"] for x in r.values() if x["weight"] is not None])
        per_arm[arm] = {"kl": _kl(config), "runs": complete, "of": len(arm_jobs[arm]), "final": final, "kl_coef_used": coefs,
                        "mean_kl_weight": weight, "continuous": extra}
        coef_text = "-" if coefs is None else f"{coefs[0]:.4g}" + (f"..{coefs[1]:.4g}" if coefs[1] != coefs[0] else "")
        lines.append(f"| {arm} | {_kl(config)} | {complete}/{len(arm_jobs[arm])} | {pct(final['sampled'])} | {pct(final['greedy'])} | "
                     f"{pct(final['comfort_greedy'])} | {num(final['p_correct_critical'])} | {coef_text} | {weight_text(None if weight is None else weight.mean)} |"
                     + "".join(f" {_significant(extra[key])} |" for key in continuous))
    return lines, per_arm


def _significant(e) -> str:
    """A mean [95% interval] to three significant digits ("-": none)."""
    if e is None:
        return "-"
    return f"{e.mean:.3g}" + (f" [{e.low:.3g}, {e.high:.3g}]" if e.low is not None else "")


def _unreadable(runs: dict) -> list[str]:
    """The finished runs whose final evaluation cannot be read: not complete, whatever DONE.json says."""
    return [f"{arm} ({m}, seed {s})" for arm, r in runs.items() for (m, s), x in r.items() if x["done"] and not x["final"]]


def section_confirm(rep: StudyDir, plots: Plots) -> Section:
    spec = rep.preset["experiments"].get("confirm")
    state = rep.state("confirm")
    title = (spec or {}).get("title", TITLE)
    finding = FINDING if title == TITLE else f"{title} (pre-registered)"
    if spec is None or state == "not run":
        return not_run(title, "not in the preset" if spec is None else state, [(finding, "kl_comparison")])
    study = Study.from_spec(spec)
    arm_jobs: dict[str, list[dict]] = {}
    for key, jobs in rep.arms("confirm").items():
        arm_jobs.setdefault(key.split("/", 1)[1], []).extend(jobs)
    arm_names = [a.name for a in study.arms if a.name in arm_jobs]
    runs = study_runs(rep)
    jobs = rep.experiment_jobs("confirm")
    unreadable = _unreadable(runs)
    complete = len(rep.finished(jobs))  # done, and with a readable final evaluation (StudyDir.unreadable)
    if unreadable:  # a finished run without its final evaluation is not a complete run
        state = (f"incomplete: {complete} of {len(jobs)} runs have a readable final evaluation ({', '.join(unreadable)} "
                 f"finished without one)")
    commit = rep.meta.get("preregistration_commit") or "not recorded"
    lines = [f"## {title}", "",
             f"State: {state}. Pre-registration: `{study.preregistration or 'none'}` (first committed in `{commit}`); "
             f"code: git commit `{rep.meta.get('git_commit') or 'not recorded'}`. Instances {', '.join(study.instances)}, the same RL seeds in "
             f"every arm; endpoints from each run's final evaluation on the held-out sets.", ""]
    table, per_arm = _arm_table(arm_names, arm_jobs, runs)
    lines += table + _selection_lines(rep, plots, arm_names, arm_jobs, runs, per_arm)

    # The hypotheses: paired differences, tests (pooled and by instance), Holm over all of them, the decision.
    analysis = hypotheses_section.analyse(study.hypotheses, runs, study.alpha)
    lines += hypotheses_section.lines(study.hypotheses, analysis, study.alpha, study.instances)
    results = analysis.instances if study.analysis == "instances" else analysis.pooled
    decided, decision, verdicts, groups = _decision(study, results, runs)
    lines += decided

    # Every endpoint a hypothesis (or the placement share) reads, per unit, so that a reader can check the pairs.
    for metric in study.metrics():
        lines += [*unit_table(runs, arm_names, metric, study.instances), ""]
    lines += [f"![confirm]({hypotheses_section.plot_paired(plots, study.hypotheses, analysis, study.instances)})", ""]
    curve, points = strength_curve_lines(plots, arm_names, {a: arm_jobs[a][0]["config"] for a in arm_names}, runs)
    lines += curve
    curves = plot_curves(plots, "confirm_curves", "The study's arms during RL (intermediate evaluations, mean over instances and seeds)",
                         {arm: rep.metrics(arm_jobs[arm]) for arm in arm_names}, ACCURACY_PANELS)
    lines += ["The curves: each arm's intermediate evaluations (32 N+1 / 8 in-distribution prompts each, so noisier than the final "
              "evaluation above), mean over instances and seeds with 95% intervals.", "", f"![confirm curves]({curves})", ""] if curves else []
    lines += ["### Deviations from the pre-registration", "", *_deviations(study.preregistration), ""]

    ours = _placement_headline(groups) if groups else _headline(study.hypotheses, results, results is analysis.pooled, decision)
    numbers = {"state": state, "decision": decision, "rule": study.rule, "verdicts": verdicts, "alpha": study.alpha, "analysis": study.analysis,
               "runs": complete, "of": len(jobs), "compute_s": rep.compute_s("confirm"), "git_commit": rep.meta.get("git_commit"),
               "preregistration": {"path": study.preregistration, "commit": rep.meta.get("preregistration_commit")},
               "arms": per_arm, "hypotheses": {h.name: hypotheses_section.numbers(h, analysis, study.alpha) for h in study.hypotheses},
               "per_instance": _per_instance(study, analysis), **({"groups": groups} if groups else {}),
               **({"strength_curve": point_numbers(points)} if points else {})}
    return Section(lines, [(finding, PAPER_CLAIMS["kl_comparison"], ours, decision)], numbers)


def _selection_lines(rep: StudyDir, plots: Plots, arm_names: list[str], arm_jobs: dict[str, list[dict]], runs: dict, per_arm: dict) -> list[str]:
    """The tokens each method frees, against the template's critical tokens (arms that log them); adds
    each arm's numbers to ``per_arm``."""
    selecting = [arm for arm in arm_names if any(x["share"] is not None for x in runs.get(arm, {}).values())]
    if not selecting:
        return []
    lines = ["", "The tokens each arm frees or favours, against the template's critical tokens of the same rollouts (tokens up to "
             "a rollout's first wrong character): precision (the share of the freed tokens that are critical), recall (the share "
             "of the critical tokens freed) and share (of all those tokens freed); per run the mean over its collects, then "
             "the mean over runs [95% interval].", "", "| arm | precision | recall | share freed |", "|---|---|---|---|"]
    for arm in selecting:
        cells = {key: t_interval([x[key] for x in finished(runs[arm]).values() if x[key] is not None]) for key in SELECTION}
        per_arm[arm]["selection"] = cells
        lines.append(f"| {arm} | " + " | ".join(num(cells[key]) for key in SELECTION) + " |")
    over_training = plot_curves(plots, "confirm_selection", "The tokens each arm frees, against the critical tokens, during RL",
                                {arm: rep.metrics(arm_jobs[arm]) for arm in selecting},
                                [(f"selection/{key}", key) for key in SELECTION], ylabel="fraction")
    return lines + (["", f"![selection during RL]({over_training})"] if over_training else [])


def _decision(study: Study, results: dict, runs: dict) -> tuple[list[str], str, dict, dict]:
    """The study's rule applied to ``results``: (its lines, the decision in one line, the verdicts per
    arm or group, the placement groups' numbers)."""
    alpha, hypotheses = study.alpha, study.hypotheses
    verdicts, groups, after = {}, {}, []
    if study.rule == "per-arm":
        verdicts = decide_per_arm(results, {h.name: h.arm for h in hypotheses}, alpha)
        decision = decision_summary(verdicts, results, alpha)
        after = ["Verdict per arm (its gain hypothesis and its comfort-zone hypothesis, after Holm):", "",
                 "| arm | verdict |", "|---|---|", *[f"| {arm} | {verdict} |" for arm, verdict in verdicts.items()], ""]
    elif study.rule == "placement":
        placement, decision, groups = placement_lines(study, results, runs)
        verdicts = {g: x["verdict"] for g, x in groups.items()}
        after = [*placement, ""]
    else:
        decision = decide(results, {h.name: h.role for h in hypotheses}, alpha)
    rejected = [h for h, r in results.items() if r.rejects(alpha)]
    kept = [h for h in results if h not in rejected]
    holds = " (an equivalence: holds)" if any(h.role == "equivalence" for h in hypotheses) else ""
    why = f"rejected{holds} at {alpha:g} after Holm: {', '.join(rejected) or 'none'}; not rejected: {', '.join(kept) or 'none'}"
    analysed = "" if study.analysis == "pooled" else ", on the instance-level analysis as pre-registered"
    return ["", f"Decision (the pre-registered rule{analysed}): **{decision}** ({why}).", "", *after], decision, verdicts, groups


def _per_instance(study: Study, analysis: hypotheses_section.Analysis) -> dict:
    """Per hypothesis, per instance: the mean paired difference over its seeds and their number."""
    return {h.name: {m: {"mean": analysis.means[h.name].get(m), "n": sum(1 for (x, _), _ in analysis.pairs[h.name] if x == m)}
                     for m in study.instances} for h in study.hypotheses}


def _headline(hypotheses: tuple[Hypothesis, ...], results: dict, pooled: bool, decision: str) -> str:
    """The summary table's "ours" for a study: its primary hypothesis's difference and Holm p, and the decision."""
    h = next((h for h in hypotheses if h.role == "primary"), hypotheses[0])
    t, metric = results[h.name].test, h.metric
    if t is None:
        return f"{h.name} ({h.compared()}): no paired runs; decision: {decision}"
    interval = f" [{value_text(metric, t.low)}, {value_text(metric, t.high)}]" if t.low is not None else ""
    return (f"{h.name} ({h.compared()}): {value_text(metric, t.mean)}{' points' if 'accuracy' in metric else ''}{interval} "
            f"over {t.n} {'pairs' if pooled else 'instances'}, Holm p {hypotheses_section.p_text(results[h.name].p_holm)}; decision: {decision}")


def share_text(s: dict) -> str:
    """A placement share as "mean [low, high]" (its interval), "-" when there is none."""
    return "-" if s["mean"] is None else f"{s['mean']:.2f}" + (f" [{s['low']:.2f}, {s['high']:.2f}]" if s["low"] is not None else "")


def _placement_headline(groups: dict) -> str:
    """The summary table's "ours" for the placement rule: each group's verdict and placement share."""
    return "; ".join(f"{g}: {x['verdict']} (placement share {share_text(x['share'])})" for g, x in groups.items())
