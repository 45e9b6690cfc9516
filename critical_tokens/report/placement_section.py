"""Placement or strength: the parts of a study's report section that ask whether lifting the penalty
where the reference is uncertain adds anything beyond a uniform penalty of the same strength.

- `placement_lines`: for a study decided by the rule "placement" (`paired.decide_placement`), each
  group's verdict (a strength: its prioritized arm against its matched uniform arm) and its
  placement share (P - M) / (P - S) on the preset's metric, with a paired bootstrap interval;
- `strength_curve_lines`: for any study whose runs measure ``final/comfort_kl``, the figure of every
  arm's sampled N+1 accuracy against its in-distribution KL to the reference, the uniform arms
  joined as the strength curve (`plots.plot_strength_curve`).
"""

from __future__ import annotations

from ..study.design import Study
from .paired import PLACEMENT_VERDICTS, HypothesisResult, decide_placement, decision_summary, placement_share
from .plots import Plots, plot_strength_curve
from .statistics import proportion_interval, t_interval
from .study_runs import Unit, margin_text, values

ACCURACY, COMFORT_KL = "final/accuracy_sampled", "final/comfort_kl"
# The config fields that set a penalty's kind and strength; arms equal in every other field differ
# only in the penalty, so the uniform ones among them trace one strength curve.
STRENGTH_FIELDS = {"kl", "kl_coef", "match_weight_beta", "beta", "out", "seed", "pretrained", "resume", "device"}


def _share_text(share) -> str:
    if share.share is None:
        return f"- ({share.n} units)"
    interval = f" [{share.low:.2f}, {share.high:.2f}]" if share.low is not None else ""
    return f"{share.share:.2f}{interval} ({share.n} units)"


def placement_lines(study: Study, results: dict[str, HypothesisResult], runs: dict[str, dict[Unit, dict]]) -> tuple[list[str], str, dict]:
    """The verdict and placement share of each group: (lines, the decision in one line, numbers)."""
    placement, hypotheses, alpha = study.placement, study.hypotheses, study.alpha
    groups = {h.name: h.group for h in hypotheses}
    found = decide_placement(results, groups, alpha)
    verdicts = {g.name: found.get(g.name, PLACEMENT_VERDICTS[3]) for g in placement.groups}
    metric, baseline = placement.metric, placement.baseline
    base = values(runs.get(baseline, {}), metric)
    lines = [f"Verdict per group (the pre-registered rule, after Holm): \"{PLACEMENT_VERDICTS[0]}\" where a superiority hypothesis "
             f"rejects; \"{PLACEMENT_VERDICTS[1]}\" where every equivalence hypothesis holds and none rejects; \"{PLACEMENT_VERDICTS[2]}\" "
             f"otherwise. Placement share: (prioritized - matched) / (prioritized - {baseline}) on `{metric}`, the ratio of the mean "
             f"paired differences over the units all three arms have (0: strength explains all the gain, 1: the matched arm gains "
             f"nothing), 95% percentile bootstrap interval over units (10,000 resamples, seed 0).", "",
             "| group | prioritized | matched | verdict | superiority (Holm p) | equivalence (Holm p) | placement share [95%] |",
             "|---|---|---|---|---|---|---|"]
    numbers = {}
    for g in placement.groups:
        mine = [h for h in hypotheses if h.group == g.name]
        share = placement_share(values(runs.get(g.prioritized, {}), metric), values(runs.get(g.matched, {}), metric), base)
        verdict = verdicts[g.name]
        if verdict == PLACEMENT_VERDICTS[1]:  # the margins it was shown within
            verdict = "strength explains it, within " + ", ".join(
                f"{margin_text(h.metric, h.margin, True)} on `{h.metric}`" for h in mine if h.role == "equivalence")
        cells = {role: ", ".join(f"{h.name} {_p(results[h.name].p_holm)}" for h in mine if h.role == role) or "-"
                 for role in ("superiority", "equivalence")}
        lines.append(f"| {g.name} | {g.prioritized} | {g.matched} | {verdict} | {cells['superiority']} | {cells['equivalence']} | "
                     f"{_share_text(share)} |")
        numbers[g.name] = {"prioritized": g.prioritized, "matched": g.matched, "verdict": verdicts[g.name],
                              "share": {"metric": metric, "baseline": baseline, "n": share.n, "mean": share.share, "low": share.low,
                                        "high": share.high, "method": "percentile bootstrap over units", "resamples": share.resamples,
                                        "seed": share.seed}}
    return lines, decision_summary(verdicts, results, alpha), numbers


def _p(p: float | None) -> str:
    return "-" if p is None else f"{p:.2g}"


def strength_points(arm_names: list[str], configs: dict[str, dict], runs: dict[str, dict[Unit, dict]]) -> list[dict]:
    """Each arm with ``final/comfort_kl``: its kind ("uniform": a plain uniform penalty, no KL at
    coefficient 0; "prioritized"; "other": another method, or a config that differs beyond the
    penalty), its label, its mean KL coefficient used, and its mean comfort KL (x) and sampled N+1
    accuracy (y) with 95% intervals (t; Wilson at the effective sample size for the accuracy)."""
    def rest(config: dict) -> dict:
        return {k: v for k, v in config.items() if k not in STRENGTH_FIELDS}

    reference = next((configs[a] for a in arm_names if configs[a]["kl"] == "prioritized"), configs[arm_names[0]] if arm_names else {})
    points = []
    for arm in arm_names:
        config, r = configs[arm], runs.get(arm, {})
        x = t_interval(list(values(r, COMFORT_KL).values()))
        y = proportion_interval(list(values(r, ACCURACY).values()), config.get("final_eval_episodes"))
        if x is None or y is None:
            continue
        coefs = [u["kl_coef"] for u in r.values() if u["done"] and u["kl_coef"] is not None]
        coef = sum(coefs) / len(coefs) if coefs else 0.0
        plain = config.get("method", "kl") == "kl" and rest(config) == rest(reference)
        kind = "other" if not plain else "prioritized" if config["kl"] == "prioritized" else "uniform"
        strength = {"prioritized": f" (beta {config['beta']})", "uniform": f" (alpha {coef:.3g})" if config["kl"] != "none" else " (no KL)"}
        label = arm + strength.get(kind, "")
        points.append({"arm": arm, "kind": kind, "label": label, "kl_coef": coef, "x": x, "y": y})
    return points


def strength_curve_lines(plots: Plots, arm_names: list[str], configs: dict[str, dict], runs: dict[str, dict[Unit, dict]]) -> tuple[list[str], list[dict]]:
    """The strength-curve figure and its caption, or a note where the runs lack ``final/comfort_kl``."""
    points = strength_points(arm_names, configs, runs)
    if not points:
        return [f"The strength curve (sampled N+1 accuracy against `{COMFORT_KL}`) is not drawn: no run of this study has `{COMFORT_KL}`.", ""], []
    path = plot_strength_curve(plots, points)
    caption = ("Every arm's mean sampled N+1 accuracy against its mean in-distribution KL to the reference (per token, on "
               "held-out in-distribution prompts, the policy's greedy completions; lower: closer to the reference), 95% intervals "
               "on both axes; the uniform penalties (the standard one, the matched ones, no KL) joined from the strongest to none: "
               "the strength curve. A prioritized arm above the curve gains more N+1 accuracy for the same distance from the "
               "reference than a uniform penalty.")
    return [caption, "", f"![strength curve]({path})", ""], points


def point_numbers(points: list[dict]) -> dict:
    """The figure's points for summary.json."""
    return {p["arm"]: {"kind": p["kind"], "kl_coef": p["kl_coef"], "comfort_kl": p["x"], "accuracy_sampled": p["y"]} for p in points}

