"""The sections of REPORT.md on RL: from several pre-training levels (figure 3), prioritized vs
standard KL (figure 4), the sensitivity to beta (figure 6), the critical-token probabilities during
RL (figure 7), and the KL comparison from several starting models (beyond the paper).

Each section reads its arms' runs (the seeds of one config: ``metrics.jsonl``, ``config.json``),
summarises them over seeds with 95% intervals on `paper.VERDICT_METRIC`, and computes its verdict
by the rules in `paper.VERDICT_RULES`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

from .document import Section, not_run
from .paper import PAPER_CLAIMS, VERDICT_METRIC
from .plots import ACCURACY_PANELS, Plots, plot_beta_sweep, plot_curves, plot_kl_by_model
from .study_dir import StudyDir, Runs, at, gains, series
from .statistics import VERDICT, Estimate, band, num, pct, seeds_at, t_interval, versus, weight_text


def _arm_runs(rep: StudyDir, experiment: str) -> dict[str, Runs]:
    return {arm: rep.metrics(jobs) for arm, jobs in rep.arms(experiment).items()}


def _seeds(rep: StudyDir, jobs: list[dict]) -> str:
    return f"{len(rep.finished(jobs))}/{len(jobs)}"


def _beta_range(rep: StudyDir, jobs: list[dict]) -> list[float] | None:
    """The lowest and highest beta the finished runs of a prioritized arm used (from their config.json:
    'auto' is resolved there); None for another KL or before any run finished."""
    if jobs[0]["config"]["kl"] != "prioritized":
        return None
    used = [b for b in (rep.run_config(j).get("beta") for j in rep.finished(jobs)) if b is not None]
    return [float(min(used)), float(max(used))] if used else None


def _betas(jobs: list[dict], used: list[float] | None) -> str:
    """The beta of an arm as the report shows it: the configured one, or for 'auto' the range
    ``used`` (its `_beta_range`)."""
    cfg = jobs[0]["config"]
    if cfg["kl"] != "prioritized":
        return "-"
    if cfg["beta"] != "auto":
        return cfg["beta"]
    return "auto" + (f" ({used[0]:.3g}..{used[1]:.3g})" if used else "")


def _standard_arm(arms: dict[str, list[dict]]) -> str | None:
    standard = [a for a, jobs in arms.items() if jobs[0]["config"]["kl"] == "standard"]
    return "standard" if "standard" in standard else (standard[0] if standard else None)


def _accuracies(runs: Runs, which: Literal["initial", "final"]) -> dict[str, Estimate | None]:
    """Sampled and greedy accuracy on the RL task, before RL (``initial``) or after it, over seeds."""
    return {"sampled": seeds_at(runs, VERDICT_METRIC, which), "greedy": seeds_at(runs, "eval/accuracy_greedy", which)}


def _start(runs: dict[str, Runs], standard: str | None) -> dict[str, Estimate | None]:
    """Where RL starts: sampled and greedy accuracy before RL. Every arm starts from the same model and,
    seed for seed, the same evaluation (its episodes and samples are seeded by the seed alone), so one
    arm's seeds give it: the standard arm's, else the first arm with runs. Pooling the arms would count
    each seed's evaluation once per arm and make the interval too narrow."""
    base = standard if standard and runs.get(standard) else next((a for a in runs if runs[a]), None)
    return _accuracies(runs[base] if base else [], "initial")


def _mean_kl_weight(runs: Runs) -> Estimate | None:
    """How much of its KL penalty an arm's tokens kept, on average: per run, the mean over its
    iterations of ``weight_mean`` (the mean prioritized weight w = c^beta over that iteration's
    tokens; 1 for the standard penalty), then the mean over seeds. None for an arm without a KL
    penalty: its runs log no weight."""
    per_run = [series(records, "weight_mean") for records in runs]  # {episodes: weight} of each seed
    return t_interval([sum(w.values()) / len(w) for w in per_run if w])


def _weight(e: Estimate | None) -> str:
    return weight_text(None if e is None else e.mean)


WEIGHT_NOTE = ("mean KL weight: the prioritized penalty's weight w = c^beta, mean over tokens, iterations and seeds "
               "(1 for the standard penalty, - without a penalty)")


def _extremes(runs: Runs) -> dict | None:
    """Where an arm's mean curve of `VERDICT_METRIC` is lowest and highest (the first such evaluation):
    its episode, the estimate there, and the in-distribution greedy accuracy at the same episode."""
    episodes, curve = band(runs, VERDICT_METRIC)
    if not episodes:
        return None
    comfort = dict(zip(*band(runs, "eval/comfort_accuracy_greedy")))
    means = [e.mean for e in curve]

    def point(i: int) -> dict:
        return {"episode": episodes[i], "sampled": curve[i], "comfort_greedy": comfort.get(episodes[i])}

    return {"lowest": point(means.index(min(means))), "highest": point(means.index(max(means)))}


def section_rl_levels(rep: StudyDir, plots: Plots) -> Section:
    title = "RL from different pre-training levels (figure 3)"
    state = rep.state("rl_levels")
    if state == "not run":
        return not_run(title, state, [("RL from several pre-training levels (figure 3)", "rl_levels")])
    arms = rep.arms("rl_levels")
    runs = _arm_runs(rep, "rl_levels")
    order = sorted((m for m in arms if runs[m]), key=rep.n_digits)
    task = arms[order[0]][0]["config"]["task"] if order else "plus2"
    settings = _rl_settings(arms[order[0]][0]["config"]) if order else f"RL on {task}"
    lines = [f"## {title}", "", f"State: {state}. {settings} from each model; `{VERDICT_METRIC}` and greedy accuracy on the RL task, "
             "mean over seeds [95% interval].", "",
             "| model | N | seeds | initial (sampled) | final (sampled) | gain (sampled) | initial (greedy) | final (greedy) |", "|---|---|---|---|---|---|---|---|"]
    models = {}
    for m in order:
        r = runs[m]
        models[m] = {"n_digits": rep.n_digits(m), "seeds": len(r), "of": len(arms[m]),
                     "initial": _accuracies(r, "initial"), "final": _accuracies(r, "final"),
                     "gain_sampled": t_interval(gains(r, VERDICT_METRIC))}
        n = models[m]
        lines.append(f"| {m} | {rep.n_digits(m)} | {_seeds(rep, arms[m])} | {pct(n['initial']['sampled'])} | {pct(n['final']['sampled'])} | "
                     f"{pct(n['gain_sampled'])} | {pct(n['initial']['greedy'])} | {pct(n['final']['greedy'])} |")
    starts, improves = [], []
    for lo, hi in zip(order, order[1:]):
        starts.append(versus(models[hi]["initial"]["sampled"], models[lo]["initial"]["sampled"]))
        improves.append(versus(models[lo]["gain_sampled"], models[hi]["gain_sampled"]))
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
    numbers = {"state": state, "verdict": verdict, "task": task, "models": models}
    return Section(lines, [("RL from several pre-training levels (figure 3)", PAPER_CLAIMS["rl_levels"], ours, verdict)], numbers)


def _algorithm(config: dict) -> str:
    """A run's RL algorithm (runs made before the option existed are A2C, the paper's)."""
    return config.get("algorithm", "a2c").upper()


def _rl_settings(config: dict) -> str:
    """The RL algorithm and its size, as a run's config states them."""
    return f"RL by {_algorithm(config)} at lr {config['lr']:g}, {config['episodes']} episodes on {config['task']}"


def section_kl_comparison(rep: StudyDir, plots: Plots) -> Section:
    title = "Prioritized vs standard KL (figure 4)"
    state = rep.state("kl_comparison")
    finding = "Prioritized KL beats standard KL (figure 4)"
    if state == "not run":
        return not_run(title, state, [(finding, "kl_comparison")])
    arms = rep.arms("kl_comparison")
    runs = _arm_runs(rep, "kl_comparison")
    first = next(iter(arms.values()))[0]["config"]
    lines = [f"## {title}", "", f"State: {state}. {_rl_settings(first)} from `{Path(first['pretrained']).name}`, "
             f"KL coefficient {first['kl_coef']}, estimator {first['estimator']}; final accuracy on the RL task and probability of the "
             f"right token at the critical tokens (mean over the probe set), mean over seeds [95% interval]; {WEIGHT_NOTE}.", "",
             "| arm | KL | beta | seeds | final (sampled) | final (greedy) | final comfort zone (greedy) | p(right) at critical tokens: initial → final "
             "| mean KL weight |", "|---|---|---|---|---|---|---|---|---|"]
    per_arm = {}
    for arm, jobs in arms.items():
        r, used = runs[arm], _beta_range(rep, jobs)
        per_arm[arm] = {"kl": jobs[0]["config"]["kl"], "kl_coef": jobs[0]["config"]["kl_coef"], "beta": _betas(jobs, used), "beta_used": used,
                        "seeds": len(r), "of": len(jobs),
                        "final": {**_accuracies(r, "final"), "comfort_greedy": seeds_at(r, "eval/comfort_accuracy_greedy", "final")},
                        "p_correct_critical": {"initial": seeds_at(r, "p_correct/critical_mean", "initial"),
                                               "final": seeds_at(r, "p_correct/critical_mean", "final")},
                        "mean_kl_weight": _mean_kl_weight(r), "curve": _extremes(r), "verdict": None}
        a = per_arm[arm]
        coef = f" (alpha {a['kl_coef']:g})" if a["kl"] != "none" and a["kl_coef"] != first["kl_coef"] else ""
        lines.append(f"| {arm} | {a['kl']}{coef} | {a['beta']} | {_seeds(rep, jobs)} | {pct(a['final']['sampled'])} | "
                     f"{pct(a['final']['greedy'])} | {pct(a['final']['comfort_greedy'])} | "
                     f"{num(a['p_correct_critical']['initial'])} → {num(a['p_correct_critical']['final'])} | {_weight(a['mean_kl_weight'])} |")
    standard = _standard_arm(arms)
    verdicts, ours = [], []
    for arm, jobs in arms.items():
        if jobs[0]["config"]["kl"] != "prioritized" or standard is None or not runs[arm] or not runs[standard]:
            continue
        a, b = per_arm[arm]["final"]["sampled"], per_arm[standard]["final"]["sampled"]
        v = per_arm[arm]["verdict"] = VERDICT[versus(a, b)]
        verdicts.append(v)
        ours.append(f"{arm} {pct(a)} vs {standard} {pct(b)}: {v}")
    overall = "not run" if not verdicts else "reproduced" if "reproduced" in verdicts else "partly" if "partly" in verdicts else "not reproduced"
    lines += ["", f"Verdict: **{overall}**" + (f" ({'; '.join(ours)})." if ours else "."), ""]
    path = plot_curves(plots, "kl_comparison", f"RL by {_algorithm(first)} on {first['task']}: KL penalties", runs,
                       ACCURACY_PANELS + (("p_correct/critical_mean", "p(right token) at critical tokens"),), rows=2)
    lines += [f"![figure 4]({path})", ""] if path else []
    path = plot_curves(plots, "kl_comparison_weights", "KL term and prioritized weights", runs,
                       (("kl", "KL estimate per token"), ("weight_mean", "mean KL weight w = c^beta")), ylabel="")
    lines += [f"![KL and weights]({path})", ""] if path else []
    jobs = rep.experiment_jobs("kl_comparison")
    numbers = {"state": state, "verdict": overall, "task": first["task"], "episodes": first["episodes"], "standard_arm": standard,
               "runs": len(rep.finished(jobs)), "of": len(jobs), "compute_s": rep.compute_s("kl_comparison"),
               "start": _start(runs, standard), "arms": per_arm}
    return Section(lines, [(finding, PAPER_CLAIMS["kl_comparison"], "; ".join(ours) or "-", overall)], numbers)


def section_beta_sweep(rep: StudyDir, plots: Plots) -> Section:
    title = "Sensitivity to beta (figure 6)"
    state = rep.state("beta_sweep")
    finding = "Prioritized KL is robust over beta (figure 6)"
    if state == "not run":
        return not_run(title, state, [(finding, "beta_sweep")])
    arms = rep.arms("beta_sweep")
    runs = _arm_runs(rep, "beta_sweep")

    def beta_of(arm: str) -> float:
        cfg = arms[arm][0]["config"]
        return 0.0 if cfg["kl"] == "standard" else math.inf if cfg["beta"] == "auto" else float(cfg["beta"])

    order = sorted(arms, key=beta_of)
    finals = {arm: seeds_at(runs[arm], VERDICT_METRIC, "final") for arm in order}
    lines = [f"## {title}", "", f"State: {state}. {_rl_settings(arms[order[0]][0]['config'])}. beta = 0 is the standard KL penalty; `auto` calibrates beta on the reference model "
             f"(the value each seed used is in its config.json). Final `{VERDICT_METRIC}`, mean over seeds [95% interval]; {WEIGHT_NOTE}.", "",
             "| beta | seeds | final (sampled) | final (greedy) | final comfort zone (greedy) | mean KL weight | against beta = 0 |",
             "|---|---|---|---|---|---|---|"]
    base = next((a for a in order if beta_of(a) == 0), None)
    fixed = [a for a in order if 0 < beta_of(a) < math.inf and runs[a]]
    per_arm = {}
    for arm in order:
        against = "-" if base is None or arm == base else versus(finals[arm], finals[base])
        label = "0 (standard)" if beta_of(arm) == 0 else _betas(arms[arm], _beta_range(rep, arms[arm]))
        greedy = seeds_at(runs[arm], "eval/accuracy_greedy", "final")
        comfort = seeds_at(runs[arm], "eval/comfort_accuracy_greedy", "final")
        weight = _mean_kl_weight(runs[arm])
        lines.append(f"| {label} | {_seeds(rep, arms[arm])} | {pct(finals[arm])} | {pct(greedy)} | {pct(comfort)} | {_weight(weight)} | {against} |")
        per_arm[arm] = {"beta": label, "seeds": len(runs[arm]), "of": len(arms[arm]),
                        "final": {"sampled": finals[arm], "greedy": greedy, "comfort_greedy": comfort}, "mean_kl_weight": weight,
                        "against_standard": against}
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
    shown = [a for a in order if finals[a] is not None]
    betas = ["0" if beta_of(a) == 0 else arms[a][0]["config"]["beta"] for a in shown]
    lines += [f"![figure 6]({plot_beta_sweep(plots, betas, [finals[a] for a in shown], [runs[a] for a in shown])})", ""]
    numbers = {"state": state, "verdict": verdict, "arms": per_arm}
    return Section(lines, [(finding, PAPER_CLAIMS["beta_sweep"], ours, verdict)], numbers)


def section_tracked_tokens(rep: StudyDir, plots: Plots) -> Section:
    from ..addition import TRACKED_TOKENS, tracked_token_key

    title = "Critical-token probabilities during RL (figures 4 right and 7)"
    finding = "Prioritized KL keeps the critical tokens right (figure 7)"
    state = rep.state("kl_comparison")
    if "tracked_tokens" not in rep.preset["experiments"] or state == "not run":
        return not_run(title, "not in the preset" if state != "not run" else state, [(finding, "tracked_tokens")])
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
    numbers = {"state": state, "verdict": "not run", "prioritized_arm": prioritized, "standard_arm": standard, "tokens": len(keys)}
    if standard is None or prioritized is None or not runs[standard] or not keys:
        verdict, ours = "not run", "needs a standard and a prioritized arm with tracked tokens"
    else:
        comparisons = [versus(seeds_at(runs[prioritized], k, "final"), seeds_at(runs[standard], k, "final")) for k, _ in keys]
        above, clear = sum(c != "not above" for c in comparisons), comparisons.count("clearly above")
        verdict = "reproduced" if above == len(keys) and clear >= len(keys) / 2 else "partly" if above > len(keys) / 2 else "not reproduced"
        ours = f"{prioritized} above {standard} at {above} of {len(keys)} tracked tokens ({clear} clearly)"
        numbers.update(verdict=verdict, above=above, clearly_above=clear)
    lines += ["", f"Verdict: **{verdict}** ({ours}).", ""]
    if keys:
        path = plot_curves(plots, "tracked_tokens", "p(right token) at the tracked critical tokens", runs, keys, rows=2 if len(keys) > 3 else 1)
        lines += [f"![figure 7]({path})", ""] if path else []
    return Section(lines, [(finding, PAPER_CLAIMS["tracked_tokens"], ours, verdict)], numbers)


def section_kl_by_model(rep: StudyDir, plots: Plots) -> Section:
    title = "The KL comparison from several starting models (beyond the paper)"
    finding = "Prioritized KL's gain vs the starting N+1 competence"
    state = rep.state("kl_by_model")
    if state == "not run":
        return not_run(title, state, [(finding, "kl_by_model")])
    by_model: dict[str, dict[str, list[dict]]] = {}
    for arm, jobs in rep.arms("kl_by_model").items():
        model, name = arm.split("/", 1)
        by_model.setdefault(model, {})[name] = jobs
    runs = {m: {a: rep.metrics(jobs) for a, jobs in arms.items()} for m, arms in by_model.items()}
    starts = {m: _start(runs[m], _standard_arm(arms)) for m, arms in by_model.items()}
    start = {m: s["greedy"] for m, s in starts.items()}  # where RL starts, greedy: the order of the models
    order = sorted(by_model, key=lambda m: (start[m] or Estimate(-1, None, None, 0)).mean)
    arm_names = list(next(iter(by_model.values())))
    first = next(iter(by_model[order[0]].values()))[0]["config"]
    lines = [f"## {title}", "", f"State: {state}. The arms of figure 4 from each model ({_rl_settings(first)}, KL coefficient "
             f"{first['kl_coef']}, estimator {first['estimator']}), ordered by the model's greedy accuracy on the RL task before RL. "
             f"N+1 dose: the fraction of (N+1)-digit additions in the model's pre-training data (a deviation from the paper). "
             f"Final `{VERDICT_METRIC}`, mean over seeds [95% interval].", "",
             "| model | N+1 dose | seeds | initial (greedy) | initial (sampled) | " + " | ".join(f"{a} final (sampled)" for a in arm_names) + " | verdict |",
             "|---" * (6 + len(arm_names)) + "|"]
    verdicts, ours, models = {}, [], {}
    for m in order:
        arms = by_model[m]
        finals = {a: seeds_at(runs[m][a], VERDICT_METRIC, "final") for a in arms}
        standard = _standard_arm(arms)
        per_arm = {a: VERDICT[versus(finals[a], finals[standard])] for a, jobs in arms.items()
                   if jobs[0]["config"]["kl"] == "prioritized" and standard and runs[m][a] and runs[m][standard]}
        verdicts[m] = next((v for v in ("reproduced", "partly", "not reproduced") if v in per_arm.values()), None)
        dose = rep.models[m]["config"].get("n_plus_one_fraction", 0.0)
        seeds, of = min(len(rep.finished(j)) for j in arms.values()), max(len(j) for j in arms.values())
        initial = starts[m]["sampled"]
        lines.append(f"| {m} | {100 * dose:g}% | {seeds}/{of} | {pct(start[m])} | {pct(initial)} | "
                     + " | ".join(pct(finals.get(a)) for a in arm_names) + f" | {'; '.join(f'{a}: {v}' for a, v in per_arm.items()) or '-'} |")
        if standard and verdicts[m]:
            ours.append(f"{m} (starts at {pct(start[m])} greedy): "
                        + ", ".join(f"{a} {pct(finals[a])}" for a in arms if a == standard or arms[a][0]["config"]["kl"] == "prioritized"))
        models[m] = {"n_plus_one_fraction": dose, "seeds": seeds, "of": of, "start": {"greedy": start[m], "sampled": initial},
                     "final_sampled": finals, "verdicts": per_arm}
    found = [v for v in verdicts.values() if v]
    overall = ("not run" if len(found) < 2 else "reproduced" if all(v == "reproduced" for v in found)
               else "partly" if any(v != "not reproduced" for v in found) else "not reproduced")
    if len(found) < 2:  # a dependence on the starting model needs two of them
        ours = [f"needs two models with finished runs; so far {'; '.join(ours) or 'none'}"]
    lines += ["", f"Verdict: **{overall}** ({'; '.join(ours)}).", ""]
    lines += [f"![KL by starting model]({plot_kl_by_model(plots, {m: runs[m] for m in order}, start, arm_names)})", ""]
    numbers = {"state": state, "verdict": overall, "models": models}
    return Section(lines, [(finding, PAPER_CLAIMS["kl_by_model"], "; ".join(ours) or "-", overall)], numbers)
