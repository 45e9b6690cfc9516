"""The sections of REPORT.md on the pre-trained models: accuracy beyond N (figure 2, tables 4-5) and
the certainty gap of critical tokens (table 1).

Each section reads the jobs' files (``table.json`` of `evaluate`, ``report.json`` of `critical`),
puts our numbers beside the paper's, and computes its verdicts by the rules in `paper.VERDICT_RULES`.
"""

from __future__ import annotations

from ..runs import read_json, read_metrics
from .document import Section, not_run
from .paper import PAPER_CLAIMS, PAPER_TABLE1, PAPER_TABLE4, PAPER_TABLE4_CI, PAPER_TABLE5, PAPER_TABLE5_CI
from .plots import Plots, plot_certainty, plot_levels, plot_table1
from .study_dir import StudyDir
from .statistics import Estimate, num


def _digits(offset: int) -> str:
    return "N" if offset == 0 else f"N+{offset}"


def section_levels(rep: StudyDir, plots: Plots) -> Section:
    title = "Pre-training levels (figure 2, tables 4-5)"
    state = rep.state("levels")
    findings = [("Accuracy drops beyond N (tables 4-5)", "levels_drop"), ("More digits generalise further (figure 2)", "levels_more")]
    if state == "not run":
        return not_run(title, state, findings)
    tables = {}
    for job in rep.finished(rep.experiment_jobs("levels")):
        tables[job["arm"]] = read_json(rep.results_dir(job) / "table.json")
    order = sorted(tables, key=lambda m: tables[m]["n_digits"])

    def cell(m: str, kind: str, offset: int) -> dict | None:
        n0 = tables[m]["n_digits"]
        return next((c for c in tables[m]["cells"] if c["kind"] == kind and c["n"] == n0 + offset), None)

    offsets = sorted({c["n"] - tables[m]["n_digits"] for m in order for c in tables[m]["cells"]})
    header = " | ".join(f"{kind} {_digits(o)}" for kind in ("identical", "varying") for o in offsets)

    def fmt(c: dict | None) -> str:
        return "-" if c is None else f"{100 * c['accuracy']:.1f} ± {100 * (c['ci_high'] - c['ci_low']) / 2:.1f}"

    lines = [f"## {title}", "", f"State: {state}. Greedy decoding, {_examples(tables)} examples per cell, accuracy in % ± half the "
             "95% bootstrap interval; N+k is the number of digits.", "",
             "**Ours**", "", f"| model | N | init | {header} |", "|---" * (3 + 2 * len(offsets)) + "|"]
    for m in order:
        row = " | ".join(fmt(cell(m, kind, o)) for kind in ("identical", "varying") for o in offsets)
        lines.append(f"| {m} | {tables[m]['n_digits']} | {rep.models[m]['init']} | {row} |")
    progress_lines, progress = pretraining_progress(rep, order)
    if progress_lines:
        lines += ["", "How far the pre-training in this reproduction went:", "", *progress_lines]
    lines += ["", "**The paper** (GPT-2 85M; tables 4 and 5)", "",
              "| N | " + " | ".join(f"{kind} {_digits(o)}" for kind in ("identical", "varying") for o in range(4)) + " |",
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

    ours = {kind: [[None if cell(m, kind, o) is None else 100 * cell(m, kind, o)["accuracy"] for o in offsets] for m in order]
            for kind in ("identical", "varying")}
    lines += [f"![accuracy heat maps]({plot_levels(plots, ours, [tables[m]['n_digits'] for m in order], offsets)})", ""]
    summary = [(findings[0][0], PAPER_CLAIMS["levels_drop"], ours_drop, drop_verdict),
               (findings[1][0], PAPER_CLAIMS["levels_more"], ours_more, more_verdict)]

    def accuracy(c: dict | None) -> Estimate | None:
        return None if c is None else Estimate(c["accuracy"], c["ci_low"], c["ci_high"], c["examples"])

    numbers = {"state": state, "verdict": {"drop": drop_verdict, "more_digits": more_verdict}, "pretraining": progress,
               "models": {m: {"n_digits": tables[m]["n_digits"],
                              **{kind: {_digits(o): accuracy(cell(m, kind, o)) for o in offsets} for kind in ("identical", "varying")}}
                          for m in order}}
    return Section(lines, summary, numbers)


def pretraining_progress(rep: StudyDir, models: list[str]) -> tuple[list[str], dict]:
    """How far each model pre-trained by this reproduction got (a shipped checkpoint has no lines):
    steps of its schedule, stopped by --max-minutes or not, last loss and accuracy, tokens/s."""
    lines, numbers = [], {}
    for m in models:
        directory = rep.root / rep.models[m]["dir"]
        if not (directory / "metrics.jsonl").exists() or not (directory / "config.json").exists():
            continue
        metrics, config = read_metrics(directory), read_json(directory / "config.json")
        if not metrics:
            continue
        last = metrics[-1]
        accuracy = next((r["accuracy_identical_n"] for r in reversed(metrics) if "accuracy_identical_n" in r), None)
        numbers[m] = {"steps": last["step"], "total_steps": config["total_steps"], "stopped_early": bool(last.get("stopped_early")),
                      "loss": last["loss"], "accuracy_identical_n": accuracy, "tokens_per_s": last.get("tokens_per_s"),
                      "minutes": last.get("elapsed_s", 0) / 60, "first_step_s": metrics[0].get("elapsed_s"), "device": config.get("device")}
        n = numbers[m]
        how = (f"stopped by --max-minutes {config['config']['max_minutes']:g} at step {n['steps']:,} of {n['total_steps']:,} "
               "(its learning rate had not decayed)") if n["stopped_early"] else f"all {n['total_steps']:,} steps"
        warm_up = "" if n["first_step_s"] is None else f" (the first step took {n['first_step_s']:.1f} s, compilation included)"
        lines.append(f"- {m}: pre-trained here on {n['device']}, {how}, in {n['minutes']:.1f} min{warm_up} at {n['tokens_per_s']:,.0f} tokens/s; "
                     f"last loss {n['loss']:.4f}" + ("" if accuracy is None else f", in-distribution accuracy at the last check "
                                                      f"{100 * accuracy:.1f}% ({config['config']['eval_examples']} examples)") + ".")
    return lines, numbers


def _examples(tables: dict) -> str:
    counts = sorted({c["examples"] for t in tables.values() for c in t["cells"]})
    return "/".join(map(str, counts))


def _row(table: dict, name: str) -> Estimate | None:
    r = table.get(name)
    if not r or r["mean"] is None:
        return None
    return Estimate(r["mean"], r["ci_low"], r["ci_high"], r["outputs"])


def section_table1(rep: StudyDir, plots: Plots) -> Section:
    title = "Certainty gap of critical tokens (table 1)"
    state = rep.state("table1")
    if state == "not run":
        return not_run(title, state, [("Critical tokens are uncertain (table 1)", "table1")])
    reports = {j["arm"]: read_json(rep.results_dir(j) / "report.json") for j in rep.finished(rep.experiment_jobs("table1"))}
    order = sorted(reports, key=lambda m: reports[m]["n_digits"])
    lines = [f"## {title}", "", f"State: {state}. Δ = certainty on a token - mean certainty on the other tokens of the output "
             "(eq. 2, max-prob certainty at the certainty temperature), teacher-forced on correct N+1-digit completions; "
             "mean over outputs [95% bootstrap interval].", "",
             "**The paper**: " + "; ".join(f"Δ critical {c:+.2f} ± {ci:.2f}, non-critical (min.) {m:+.4f} ± {mci:.4f}" for c, ci, m, mci in PAPER_TABLE1), "",
             "**Ours**", "", "| model | N | digits | Δ critical | Δ non-critical | Δ lowest non-critical | p(right token) at critical | failures starting at a critical token | verdict |",
             "|---|---|---|---|---|---|---|---|---|"]
    verdicts, ours, models = [], [], {}
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
        models[m] = {"n_digits": r["n_digits"], "digits": r["digits"], "delta_critical": crit, "delta_non_critical": other,
                     "delta_lowest_non_critical": lowest, "p_correct_critical": p,
                     "failures_at_critical": f.get("at_critical_fraction"), "verdict": verdict}
    overall = "reproduced" if all(v == "reproduced" for v in verdicts) else "partly" if any(v != "not reproduced" for v in verdicts) else "not reproduced"
    lines += ["", f"Verdict: **{overall}**. The full analysis of each model (per critical-token name, where failures start, "
              "discovery without the template) is in `table1/<model>/report.md`.", ""]

    names = (("critical", "critical"), ("non-critical", "non-critical"), ("non-critical (lowest)", "lowest non-critical"))
    deltas = {label: [_row(reports[m]["table1"]["max_prob"], key) for m in order] for key, label in names}
    labels = [f"{m} (N={reports[m]['n_digits']})" for m in order]
    lines += [f"![table 1]({plot_table1(plots, deltas, labels)})", ""]
    for m in order:
        pads = reports[m].get("scratchpads") or []
        if pads:
            lines += [f"![certainty along the scratchpad, {m}]({plot_certainty(plots, m, pads)})", ""]
    numbers = {"state": state, "verdict": overall, "models": models}
    return Section(lines, [("Critical tokens are uncertain (table 1)", PAPER_CLAIMS["table1"], "; ".join(ours), overall)], numbers)
