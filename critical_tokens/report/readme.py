"""The README's numbers, generated from a committed report's summary.json instead of typed by hand.

README.md marks each generated block with where its numbers come from, and which of them::

    <!-- numbers: docs/results/cpu-full -->
    (generated from docs/results/cpu-full/summary.json: the outcome of the KL comparison)
    <!-- /numbers -->

The source is a report's directory (its summary.json) or a row of the regime search
(``docs/regime/NAME.json``). After a report's directory, a part may follow: ``kl_comparison`` (the
default: the outcome table), ``curves`` (where each arm's mean curve is lowest and highest),
``kl_by_model`` (the comparison from several starting models), ``beta_sweep`` (the sensitivity to
beta), ``confirm`` (a pre-registered study: its decision, arms and hypotheses), ``placement`` (a study
under the placement rule: per strength its verdict, placement share and hypotheses), or ``levels``,
``table1``, ``rl_levels``, ``tracked_tokens`` (that experiment's rows of the report's summary table).

``python -m critical_tokens.report.readme README.md`` (``make readme``) rewrites the lines between
each pair of markers and nothing else; ``tests/test_readme.py`` fails when a committed block differs
from what this generates, so a hand edit cannot drift from the report.
"""

from __future__ import annotations

import argparse
import re
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

from ..config import add_arguments, arg, from_namespace
from ..runs import UserError, atomic_write_text, read_json
from .confirm_section import share_text
from .document import duration
from .statistics import weight_text
from .statistics import Estimate, pct
from .study_runs import in_points

BLOCK = re.compile(r"^(?P<indent>[ \t]*)<!-- numbers: (?P<source>\S+)(?: (?P<part>[a-z0-9_]+))? -->\n(?P<body>.*?)^(?P=indent)<!-- /numbers -->$",
                   re.M | re.S)
WIDTH = 105  # the README's line length


def _estimate(e: dict | None) -> Estimate | None:
    return None if e is None else Estimate(**e)


def _arm_label(arm: dict, kl: dict) -> str:
    """An arm as the README names it; its KL coefficient only where it differs from the standard arm's."""
    if arm["kl"] == "none":
        return "no KL"
    base, coef = kl["arms"].get(kl.get("standard_arm") or "", {}).get("kl_coef"), arm.get("kl_coef")
    name = f"{arm['kl']} KL" + (f" with alpha = {coef:g}" if coef is not None and base is not None and coef != base else "")
    if arm["kl"] != "prioritized":
        return name
    if not str(arm["beta"]).startswith("auto"):
        return f"{name} (beta = {arm['beta']})"
    used = arm.get("beta_used")
    return f"{name} (beta = auto" + (f": {used[0]:.3g}..{used[1]:.3g})" if used else ")")


def _machine(summary: dict) -> str:
    hw = summary.get("hardware") or {}
    if not hw:
        return "a machine not recorded"
    gpu = f" and {hw['gpus']} x {hw['gpu']}" if hw.get("gpu") else ""
    threads = summary["threads_per_job"]
    return f"{hw.get('cpu', '?')} ({hw.get('cores', '?')} cores{gpu}, {threads} torch thread{'s' if threads != 1 else ''} per run)"


def _experiment(summary: dict, name: str) -> dict:
    """The numbers of experiment ``name`` in a report's summary.json; an error if it did not run."""
    numbers = summary["experiments"].get(name, {"state": "not run"})
    if numbers["state"] == "not run":
        raise UserError(f"the report of preset {summary['preset']!r} has no {name} runs to put in the README")
    return numbers


def _mean_over(arms: dict) -> str:
    """'mean over 10 seeds' when every arm has that many, else 'mean over seeds'."""
    seeds = {a["seeds"] for a in arms.values()}
    return f"mean over {seeds.pop()} seeds" if len(seeds) == 1 else "mean over seeds"


def outcome(summary: dict) -> list[str]:
    """The block for one report: the KL comparison's runs, where they start, and each arm's final
    accuracy (sampled and greedy on the RL task, greedy in distribution) with its 95% interval."""
    kl = _experiment(summary, "kl_comparison")
    digits = "N+" + kl["task"].removeprefix("plus")
    arms = kl["arms"]
    start = kl["start"]
    # The wall time measures the reproduction only when one invocation ran it all (an interrupted
    # invocation records none, and resumed ones add up to less than the whole).
    wall = "" if not summary.get("wall_s") or summary.get("invocations") != 1 else (
        f" The whole reproduction took {duration(summary['wall_s'])} of wall time, in one invocation ({summary['parallel_jobs']} runs in parallel).")
    text = (f"{kl['runs']} runs of {kl['episodes']} episodes, {duration(kl['compute_s'])} of compute on {_machine(summary)}.{wall} "
            f"Verdict: **{kl['verdict']}**. {'Both arms start' if len(arms) == 2 else f'All {len(arms)} arms start'} at "
            f"{pct(_estimate(start['sampled']))} sampled accuracy on {digits} (greedy {pct(_estimate(start['greedy']))}). "
            f"Final accuracy, {_mean_over(arms)} [95% interval]:")
    lines = _wrap(text)
    lines += ["", f"| | sampled {digits} | greedy {digits} | in distribution (greedy) |", "|---|---|---|---|"]
    for arm in arms.values():
        final = {k: pct(_estimate(v)) for k, v in arm["final"].items()}
        lines.append(f"| {_arm_label(arm, kl)} | {final['sampled']} | {final['greedy']} | {final['comfort_greedy']} |")
    return lines + [""]  # a blank line: the closing marker must not read as a row of the table


def _wrap(text: str, width: int = WIDTH) -> list[str]:
    return textwrap.wrap(text, width, break_long_words=False, break_on_hyphens=False)


def _bullet(text: str) -> list[str]:
    lines = _wrap(text, WIDTH - 2)
    return ["- " + lines[0]] + ["  " + line for line in lines[1:]]


def curves(summary: dict) -> list[str]:
    """Where each arm's mean curve of sampled accuracy on the RL task is lowest and highest, with the
    in-distribution accuracy at that episode: the shape of the curves behind the final numbers."""
    kl = _experiment(summary, "kl_comparison")
    lines = []
    for arm in kl["arms"].values():
        c = arm.get("curve")
        if not c:
            continue
        lo, hi = c["lowest"], c["highest"]
        lines += _bullet(f"{_arm_label(arm, kl)}: lowest {pct(_estimate(lo['sampled']))} at episode {lo['episode']} (in distribution "
                         f"{pct(_estimate(lo['comfort_greedy']))}), highest {pct(_estimate(hi['sampled']))} at episode {hi['episode']} "
                         f"of {kl['episodes']}.")
    return lines + [""]


def kl_by_model(summary: dict) -> list[str]:
    """The KL comparison from several starting models: per model, its dose, where RL starts and each
    arm's final sampled accuracy, with the seeds behind them."""
    by_model = _experiment(summary, "kl_by_model")
    lines = _wrap(f"State: {by_model['state']}; verdict: **{by_model['verdict']}**. Final sampled accuracy on the RL task, "
                  "mean over seeds [95% interval]:")
    for name, m in by_model["models"].items():
        finals = ", ".join(f"{arm} {pct(_estimate(e))}" for arm, e in m["final_sampled"].items())
        verdicts = "; ".join(f"{arm}: {v}" for arm, v in m["verdicts"].items()) or "no verdict"
        lines += _bullet(f"`{name}` (N+1 dose {100 * m['n_plus_one_fraction']:g}%, starts at {pct(_estimate(m['start']['greedy']))} "
                         f"greedy), {m['seeds']} of {m['of']} seeds: {finals} ({verdicts}).")
    return lines + [""]


def beta_sweep(summary: dict) -> list[str]:
    """The sensitivity to beta: each beta's final accuracy (sampled and greedy on the RL task, greedy in
    distribution) with its 95% interval, beta = 0 being the standard penalty, and its mean KL weight
    (how much of the penalty its tokens kept: 1 for the standard penalty)."""
    sweep = _experiment(summary, "beta_sweep")
    lines = _wrap(f"State: {sweep['state']}; verdict: **{sweep['verdict']}**. Final accuracy, {_mean_over(sweep['arms'])} "
                  "[95% interval], and the mean KL weight w = c^beta over tokens, iterations and seeds:")
    lines += ["", "| beta | sampled | greedy | in distribution (greedy) | mean KL weight |", "|---|---|---|---|---|"]
    for arm in sweep["arms"].values():
        final = {k: pct(_estimate(v)) for k, v in arm["final"].items()}
        weight = arm.get("mean_kl_weight")  # absent from reports made before it was computed
        lines.append(f"| {arm['beta']} | {final['sampled']} | {final['greedy']} | {final.get('comfort_greedy', '-')} | "
                     f"{weight_text(None if weight is None else weight['mean'])} |")
    return lines + [""]


def regime(row: dict) -> list[str]:
    """One row of the regime search (``docs/regime/NAME.json``): the model's accuracies, its certainty
    gap at the critical tokens and where its N+1 failures start."""
    acc = row["accuracy"]
    sampled = row.get("sampled") or {}
    seed = f", evaluation seed {row['eval_seed']}" if row.get("eval_seed") is not None else ""
    lines = _wrap(f"`{row['name']}` on {row['examples']:,} examples per cell{seed}:")
    lines += _bullet(f"{100 * acc['identical@+0']:.1f}% / {100 * acc['varying@+0']:.1f}% greedy in distribution "
                     "(identical / varying digits);")
    rl = f", and {100 * sampled['n_plus_1@T=1']:.1f}% of sampled N+1 rollouts are right at T = 1" if "n_plus_1@T=1" in sampled else ""
    lines += _bullet(f"{100 * acc['identical@+1']:.1f}% / {100 * acc['varying@+1']:.1f}% greedy at N+1{rl};")
    lines += _bullet(f"certainty gap Δ = {row['gap_critical']:+.3f} at the critical tokens against {row['gap_non_critical']:+.4f} "
                     f"elsewhere; {100 * row['failures_at_critical']:.1f}% of its greedy N+1 failures start at a critical token.")
    return lines + [""]


def _outcome(h: dict) -> str:
    """What a hypothesis's test says: a safety hypothesis (non-inferiority) "holds" when it rejects, an
    equivalence (TOST) is shown or not shown within its margin."""
    if h["role"] == "safety":
        return "holds" if h["rejects"] else "does not hold"
    if h["role"] == "equivalence":
        return "equivalent within the margin" if h["rejects"] else "not shown equivalent within the margin"
    return "rejects" if h["rejects"] else "does not reject"


def _hypothesis_line(name: str, h: dict) -> str:
    """One hypothesis's paired difference (points for an accuracy, the metric's units otherwise), its
    interval (an equivalence: the TOST interval at 1 - 2 alpha) and its Holm p-value; or that it has no pairs yet."""
    if not h.get("n"):
        return f"{name} ({h['role']}): {h['arm']} - {h['versus']}: no paired runs yet."
    scale, unit = (100, " points") if in_points(h["metric"]) else (1, "")
    number = (lambda x: f"{scale * x:+.1f}") if scale == 100 else (lambda x: f"{x:+.3g}")
    # summary.json holds the tested difference: arm - versus, or versus - arm where lower is better (report/paired.py)
    difference = f"{h['versus']} - {h['arm']}" if h.get("direction") == "lower" else f"{h['arm']} - {h['versus']}"
    equivalence = h["role"] == "equivalence" and h.get("low_tost") is not None
    low, high = (h["low_tost"], h["high_tost"]) if equivalence else (h.get("low"), h.get("high"))
    interval = "" if low is None else f" [{number(low)}, {number(high)}]" + (f" ({100 * h['level']:g}% interval)" if equivalence else "")
    margin = f"±{scale * h['margin']:g}" if h["role"] == "equivalence" else f"{scale * h['margin']:+g}"
    p = "-" if h["p_holm"] is None else f"{h['p_holm']:.2g}"
    return (f"{name} ({h['role']}): {difference} on `{h['metric']}`: {number(h['mean'])}{unit}{interval} "
            f"over {h['n']} pairs, margin {margin}; Holm p = {p}: {_outcome(h)}.")


def confirm(summary: dict) -> list[str]:
    """A pre-registered study: its decision, each arm's final accuracy (pooled over instances and seeds)
    with the KL coefficient it applied, and each hypothesis's paired difference with its Holm p-value."""
    study = _experiment(summary, "confirm")
    prereg = study["preregistration"]
    commit = (prereg.get("commit") or "")[:7] or "not recorded"
    arms = study["arms"]
    text = (f"State: {study['state']}. Decision by the rule pre-registered in `{prereg.get('path')}` (commit {commit}): "
            f"**{study['decision']}**. {study['runs']} runs, {duration(study['compute_s'])} of compute on {_machine(summary)}. "
            "Final accuracy on held-out prompts, mean over runs [95% interval]:")
    verdicts = study.get("verdicts") or {}  # a per-arm rule: each arm's verdict in its row
    lines = _wrap(text) + ["", "| arm | penalty | sampled N+1 | greedy N+1 | in distribution (greedy) | KL coefficient |"
                           + (" verdict |" if verdicts else ""), "|---|---|---|---|---|---|" + ("---|" if verdicts else "")]
    for name, arm in arms.items():
        final = {k: pct(_estimate(v)) for k, v in arm["final"].items()}
        coef = arm.get("kl_coef_used")
        coef_text = "-" if not coef else f"{coef[0]:.3g}" + (f"..{coef[1]:.3g}" if f"{coef[1]:.3g}" != f"{coef[0]:.3g}" else "")
        lines.append(f"| {name} | {arm['kl']} | {final['sampled']} | {final['greedy']} | {final['comfort_greedy']} | {coef_text} |"
                     + (f" {verdicts.get(name, 'baseline')} |" if verdicts else ""))
    if any(h.get("role") == "equivalence" or not in_points(h["metric"]) for h in study["hypotheses"].values()):
        intro = ("Paired differences (arm - versus, or versus - arm where lower is better; points for an accuracy; over the "
                 "(instance, seed) units both finished), one-sided paired t-test or two one-sided tests (TOST), Holm-adjusted:")
    else:
        intro = "Paired differences (arm - versus, points, over the (instance, seed) units both finished), one-sided paired t-test, Holm-adjusted:"
    lines += ["", *_wrap(intro)]
    for name, h in study["hypotheses"].items():
        lines += _bullet(_hypothesis_line(name, h))
    return lines + [""]


def placement(summary: dict) -> list[str]:
    """A study under the placement rule: its decision, then per group (one strength) its verdict, its
    placement share (prioritized - matched) / (prioritized - baseline) with its interval, and the paired
    difference and Holm p-value of each of its hypotheses."""
    study = _experiment(summary, "confirm")
    if not study.get("groups"):
        raise UserError(f"the report of preset {summary['preset']!r} is not of a study under the placement rule (no groups)")
    prereg = study["preregistration"]
    commit = (prereg.get("commit") or "")[:7] or "not recorded"
    lines = _wrap(f"State: {study['state']}. Decision by the rule pre-registered in `{prereg.get('path')}` (commit {commit}), "
                  f"after Holm's correction over all {len(study['hypotheses'])} hypotheses: **{study['decision']}**. "
                  f"{study['runs']} runs, {duration(study['compute_s'])} of compute on {_machine(summary)}.")
    for group, numbers in study["groups"].items():
        lines += [""] + _bullet(f"**{group}: {numbers['verdict']}** (placement share {share_text(numbers['share'])})")
        for name, h in study["hypotheses"].items():
            if h.get("group") == group:
                lines += ["  " + line for line in _bullet(_hypothesis_line(name, h))]
    return lines + [""]


# The findings of summary.json's table that each part quotes, by the start of their name.
FINDINGS = {"levels": ("Accuracy drops beyond N", "More digits generalise further"), "table1": ("Critical tokens are uncertain",),
            "rl_levels": ("RL from several pre-training levels",), "tracked_tokens": ("Prioritized KL keeps the critical tokens right",)}


def findings(summary: dict, part: str) -> list[str]:
    """The rows of a report's summary table for one experiment: each finding, its verdict and our
    numbers, as REPORT.md's summary states them."""
    rows = [f for f in summary["findings"] if f["finding"].startswith(FINDINGS[part])]
    if not rows or all(f["verdict"] == "not run" for f in rows):
        raise UserError(f"the report of preset {summary['preset']!r} has no {part} results to quote")
    lines = []
    for f in rows:
        lines += _bullet(f"{f['finding']}: **{f['verdict']}** ({f['ours']}).")
    return lines + [""]


PARTS = {"kl_comparison": outcome, "curves": curves, "kl_by_model": kl_by_model, "beta_sweep": beta_sweep, "confirm": confirm,
         "placement": placement}


def blocks(text: str) -> list[re.Match]:
    """Each marked block of a README, markers included: ``m["indent"]``, ``m["source"]`` (a report's
    directory or a ``.json`` row of the regime search, relative to the README), ``m["part"]`` (None:
    the default) and ``m["body"]`` (the lines between the markers)."""
    return list(BLOCK.finditer(text))


def _is_regime_row(m: re.Match) -> bool:
    return m["source"].endswith(".json")


def source(readme: Path, m: re.Match) -> Path:
    """The file block ``m`` of ``readme`` is generated from."""
    path = readme.parent / m["source"]
    return path if _is_regime_row(m) else path / "summary.json"


def block(readme: Path, m: re.Match) -> str:
    """The block ``m`` of ``readme`` as generated from its source, markers included."""
    data = read_json(source(readme, m))
    part = m["part"] or "kl_comparison"
    if _is_regime_row(m):
        lines = regime(data)
    elif part in PARTS:
        lines = PARTS[part](data)
    elif part in FINDINGS:
        lines = findings(data, part)
    else:
        raise UserError(f"{readme}: unknown part {m['part']!r} of <!-- numbers: {m['source']} -->; one of {', '.join([*PARTS, *FINDINGS])}")
    body = textwrap.indent("\n".join(lines) + "\n", m["indent"], lambda line: line.strip() != "")
    marker = f"{m['source']} {m['part']}" if m["part"] else m["source"]
    return f"{m['indent']}<!-- numbers: {marker} -->\n{body}{m['indent']}<!-- /numbers -->"


def rewrite(readme: Path) -> str:
    """README.md with every marked block generated anew; the rest byte for byte."""
    text = readme.read_text()
    if text.count("<!-- numbers: ") != text.count("<!-- /numbers -->") or not blocks(text):
        raise UserError(f"{readme}: no block, or an unclosed one, between <!-- numbers: DIR --> and <!-- /numbers -->")
    if len(blocks(text)) != text.count("<!-- numbers: "):
        raise UserError(f"{readme}: a <!-- numbers: DIR PART --> marker that is not a block (its part is letters, digits and '_'; "
                        "its closing marker has the same indent)")
    return BLOCK.sub(lambda m: block(readme, m), text)


@dataclass(frozen=True)
class ReadmeConfig:
    readme: str = arg("README.md", "the README whose <!-- numbers: DIR --> blocks to regenerate from DIR/summary.json", positional=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m critical_tokens.report.readme", description=__doc__.splitlines()[0])
    add_arguments(parser, ReadmeConfig)
    config = from_namespace(ReadmeConfig, parser.parse_args(argv))
    readme = Path(config.readme)
    try:
        if not readme.is_file():
            raise UserError(f"{readme} is not a file")
        text = rewrite(readme)
    except UserError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    changed = text != readme.read_text()
    if changed:
        atomic_write_text(readme, text)
    print(f"{readme}: {len(blocks(text))} block(s) of numbers, {'rewritten' if changed else 'unchanged'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
