"""The `trl-grpo` study: the prioritized KL penalty against the standard one and two uniform penalties of
matched strength, in TRL's GRPO (examples/trl_grpo_prioritized.py at its defaults), on paired seeds.
Its design, hypotheses and decision rule are fixed in docs/preregistration/trl-grpo.md.

    python scripts/trl_study.py --out runs/trl-grpo                     # all runs (resumes), then the report
    python scripts/trl_study.py --out runs/trl-grpo --report-only       # the report of the runs done so far

Each run is the example script in a process of its own, in OUT/<arm>-s<seed>/ (its result.json holds the
accuracies); a run with a result.json is not run again. The report, OUT/REPORT.md and OUT/results.json,
is built from the result.json files alone, with the paired tests of critical_tokens.report.paired.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm import tqdm

from critical_tokens import checks
from critical_tokens.report import paired
from critical_tokens.runs import UserError, atomic_write_text, check_output, read_json, write_json

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "trl_grpo_prioritized.py"
SEEDS = range(500, 508)  # fresh: no run of this project used them
ALPHA = 5.0  # the example's KL coefficient (TRL's beta)
MATCHED_WEIGHT = 0.21266  # E[c^8] on the reference's own rollouts (critical_tokens.rl.calibration.matched_weight: 512 prompts, T = 1)
MATCHED_PENALTY = 0.02948  # median of kl_prioritized / kl over the steps of two prioritized runs at seeds 0 and 2 (docs/preregistration/trl-grpo.md)
ARMS = {  # name: the example's options
    "standard": ["--prioritized-beta", "0", "--kl-coef", f"{ALPHA:g}"],
    "prioritized": ["--prioritized-beta", "8", "--kl-coef", f"{ALPHA:g}"],
    "matched-weight": ["--prioritized-beta", "0", "--kl-coef", f"{ALPHA * MATCHED_WEIGHT:.4g}"],
    "matched-penalty": ["--prioritized-beta", "0", "--kl-coef", f"{ALPHA * MATCHED_PENALTY:.4g}"],
}
HYPOTHESES = {  # name: (arm, versus, role); each one-sided, prioritized - versus > 0 on the primary endpoint
    "H1": ("prioritized", "standard", "primary"),
    "H2a": ("prioritized", "matched-weight", "control"),
    "H2b": ("prioritized", "matched-penalty", "control"),
}
ENDPOINT = "sampled"  # the accuracy after, of 4 completions per held-out addition sampled at temperature 1


def run_dir(out: Path, arm: str, seed: int) -> Path:
    return out / f"{arm}-s{seed}"


def run_one(out: Path, arm: str, seed: int) -> int:
    """One run of the example (its own process, one thread), its output in OUT/<arm>-s<seed>.log."""
    directory = run_dir(out, arm, seed)
    with open(out / f"{arm}-s{seed}.log", "w") as log:
        return subprocess.run([sys.executable, str(EXAMPLE), "--seed", str(seed), "--out", str(directory), *ARMS[arm]],
                              stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"}).returncode


def results(out: Path) -> tuple[dict[str, dict[int, dict]], dict[str, str]]:
    """{arm: {seed: result.json}} of the finished runs, and {run: why} of the runs whose result.json
    exists but cannot be read (cut short, edited, not the example's): those are not finished, run again."""
    found, unreadable = {arm: {} for arm in ARMS}, {}
    for arm in ARMS:
        for seed in SEEDS:
            path = run_dir(out, arm, seed) / "result.json"
            if path.exists():
                try:
                    found[arm][seed] = accuracies(read_json(path), path)
                except UserError as e:
                    unreadable[f"{arm}-s{seed}"] = str(e)
    return found, unreadable


def accuracies(result, path: Path) -> dict:
    """``result`` if it holds the numbers the report reads: the sampled and greedy accuracy before and after."""
    try:
        if all(0 <= result[when][key] <= 1 for when in ("before", "after") for key in ("sampled", "greedy")):
            return result
    except (TypeError, KeyError):
        pass
    raise UserError(f"{path} lacks the accuracies before and after")


def interval(values) -> str:
    """Mean [95% t interval] in percent (the interval of paired.paired_test on the values themselves)."""
    if not len(values):
        return "-"
    t = paired.paired_test(values)
    return f"{100 * t.mean:.1f}" if t.low is None else f"{100 * t.mean:.1f} [{100 * t.low:.1f}, {100 * t.high:.1f}]"


def report(out: Path) -> str:
    """OUT/REPORT.md and OUT/results.json from the finished runs."""
    found, unreadable = results(out)
    lines = ["# `trl-grpo`: the prioritized KL penalty in TRL's GRPO against the standard one and two matched controls", "",
             "Pre-registration: `docs/preregistration/trl-grpo.md`. Runs: `examples/trl_grpo_prioritized.py` at its defaults,",
             f"seeds {SEEDS.start}..{SEEDS.stop - 1}, one per pair; accuracy on each seed's 200 held-out 4-digit additions after 100 steps.", "",
             "| arm | options | runs | sampled after, mean [95% t] | greedy after | sampled before |", "|---|---|---|---|---|---|"]
    for arm, options in ARMS.items():
        runs = found[arm].values()
        lines.append(f"| {arm} | `{' '.join(options)}` | {len(runs)}/{len(SEEDS)} | {interval([r['after']['sampled'] for r in runs])} | "
                     f"{interval([r['after']['greedy'] for r in runs])} | {interval([r['before']['sampled'] for r in runs])} |")
    differences = {h: [d for _, d in paired.paired_differences({s: r["after"][ENDPOINT] for s, r in found[arm].items()},
                                                                {s: r["after"][ENDPOINT] for s, r in found[versus].items()})]
                   for h, (arm, versus, _) in HYPOTHESES.items()}
    roles = {h: role for h, (_, _, role) in HYPOTHESES.items()}
    tested = paired.hypothesis_results(differences, {h: 0.0 for h in HYPOTHESES}, roles)
    decision = paired.decide(tested, roles)
    lines += ["", f"Paired differences on the primary endpoint ({ENDPOINT} accuracy after), one-sided t-tests, Holm over the {len(HYPOTHESES)} hypotheses:", "",
              "| hypothesis | difference | pairs | mean [95% t] (points) | p (t) | p (Holm) | p (Wilcoxon) | rejects at 0.05 |", "|---|---|---|---|---|---|---|---|"]
    summary = {}
    for h, (arm, versus, role) in HYPOTHESES.items():
        r = tested[h]
        t = r.test
        row = f"| {h} ({role}) | {arm} - {versus} | {len(differences[h])} | "
        if t is None or t.p_t is None:
            lines.append(row + "- | - | - | - | not run |")
        else:
            lines.append(row + f"{100 * t.mean:+.1f} [{100 * t.low:+.1f}, {100 * t.high:+.1f}] | {t.p_t:.2g} | {r.p_holm:.2g} | {t.p_wilcoxon:.2g} | {'yes' if r.rejects() else 'no'} |")
        summary[h] = {"arm": arm, "versus": versus, "role": role, "differences": differences[h],
                      "p_t": t.p_t if t else None, "p_holm": r.p_holm, "rejects": r.rejects()}
    lines += ["", f"Decision by the pre-registered rule: **{decision}**.", ""]
    if unreadable:  # counted as not run above, and named here
        lines += [f"Not counted: {len(unreadable)} run(s) whose result.json cannot be read:", "",
                  *[f"- {run}: {why}" for run, why in unreadable.items()], ""]
    write_json(out / "results.json", {"seeds": list(SEEDS), "arms": ARMS, "runs": found, "unreadable": unreadable,
                                      "hypotheses": summary, "decision": decision})
    text = "\n".join(lines)
    atomic_write_text(out / "REPORT.md", text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/trl-grpo", help="the study's directory (runs, logs, REPORT.md)")
    parser.add_argument("--workers", type=int, default=2, help="runs at once (each one thread)")
    parser.add_argument("--report-only", action="store_true", help="no runs: the report of those done")
    args = parser.parse_args()
    checks.in_range("--workers", args.workers, 1, integer=True)
    check_output(args.out, "--out", directory=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        done, _ = results(out)
        todo = [(arm, seed) for seed in SEEDS for arm in ARMS if seed not in done[arm]]  # seed by seed: pairs finish together
        with ThreadPoolExecutor(args.workers) as pool, tqdm(total=len(todo), desc="runs") as bar:
            for (arm, seed), code in zip(todo, pool.map(lambda job: run_one(out, *job), todo)):
                bar.update()
                if code != 0:
                    tqdm.write(f"{arm} seed {seed} failed (exit {code}): see {out}/{arm}-s{seed}.log")
    print(report(out))


if __name__ == "__main__":
    try:
        main()
    except UserError as error:
        sys.exit(f"error: {error}")
