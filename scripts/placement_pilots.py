"""The pilots of the cpu-placement study: the realized penalty of the prioritized arms, per instance and beta.

The matched uniform penalty of the study is fixed per instance and beta, before the study, from pilot
runs on seeds disjoint from the study's (issue 35):

    python scripts/placement_pilots.py preset --out runs/placement-pilot.json     # from the instance search
    critical-tokens reproduce --preset runs/placement-pilot.json --out runs/placement-pilot --jobs 2
    python scripts/placement_pilots.py calibrate runs/placement-pilot                # docs/placement-pilots.{json,md}
    python scripts/placement_pilots.py study docs/placement-pilots.json              # critical_tokens/study/presets/cpu-placement.json

(``preset --found-so-far`` writes the pilots of the instances found so far, so that they can start
while the search goes on; ``calibrate`` then reads the two reproductions together.)

``preset`` reads the instances chosen by ``scripts/placement_instances.py`` (the first four seeds of
docs/placement-instances/ that meet the target) and writes a reproduction preset: the instances
made by the regime recipe, and on each of them the prioritized penalty at beta 4, 8 and 16 at the
pilot seeds 900-902 (a first version also ran the standard penalty; no rule reads it, and it was
dropped to save a quarter of the pilots' compute). ``calibrate`` reads the pilots' final evaluations and
writes, per instance and beta, the median realized penalty ratio (median over collects of
kl_term / kl, then over pilot seeds) and the matched coefficient 5 x that median, and the paired
standard deviation of the comfort KL (prioritized - standard, where pilots of the standard arm exist),
with each prioritized arm's comfort KL and sampled accuracy per seed. ``study`` writes the study's preset from the calibration: the matched
coefficient of each instance and beta is the calibration's; the accuracy margin is ``ACCURACY_MARGIN``
(3 points); the comfort endpoint is log10 of the comfort KL with margin ``COMFORT_MARGIN`` (half an
order of magnitude); the power of each hypothesis is computed from the pilots' spread (`power_inputs`).
(The first rules, committed before the pilots ended, took the raw comfort KL with a margin of a quarter
of its pilot mean, and 10 seeds: the pilots showed the raw KL spanning three orders of magnitude,
which gave those equivalence tests no power, and an accuracy spread that needs 15 seeds.)
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from critical_tokens.rl.endpoints import KL_FLOOR  # noqa: E402
from critical_tokens.runs import UserError, atomic_write_text, read_metrics, write_json  # noqa: E402
from critical_tokens.study.preset import PRESETS_DIR  # noqa: E402

BETAS = (4, 8, 16)
KL_COEF = 5.0
PILOT_SEEDS = (900, 3)  # first seed, count: disjoint from every study's seeds (cpu-confirm 100-109, cpu-methods 300-309, trl-grpo 500-507)
INSTANCES = 4
STUDY_SEEDS = (600, 15)  # first seed, count: no preset uses them (tested); pilots 900-902
ACCURACY_MARGIN = 0.03  # the equivalence margin on sampled N+1 accuracy: 3 points
COMFORT_MARGIN = 0.5  # the equivalence margin on log10 of the comfort KL: half an order of magnitude (a factor of 3.16)
ACC, COMFORT_KL, COMFORT = "final/accuracy_sampled", "final/comfort_kl", "final/comfort_kl_log10"


def chosen_instances(rows: Path, partial: bool = False) -> list[int]:
    """The first four seeds that meet the target, in seed order; ``partial``: those found so far
    (every seed before them checked), so that the first instances' pilots can start early."""
    found = sorted((json.loads(p.read_text()) for p in rows.glob("s*.json")), key=lambda r: r["seed"])
    seeds = []
    for expected, row in enumerate(found, start=found[0]["seed"] if found else 0):
        if row["seed"] != expected:  # a seed not checked yet: a later passing seed may not be among the first four
            break
        if row["verdict"] == "meets the target":
            seeds.append(row["seed"])
    seeds = seeds[:INSTANCES]
    if len(seeds) < INSTANCES and not (partial and seeds):
        raise UserError(f"the instance search has found {len(seeds)} of {INSTANCES} instances so far ({rows}); run scripts/placement_instances.py")
    return seeds


def cpu_confirm_with(seeds: list[int]) -> tuple[dict, dict]:
    """cpu-confirm's preset, and its models with its instances replaced by the regime recipe at ``seeds`` (``i<seed>``)."""
    base = json.loads((PRESETS_DIR / "cpu-confirm.json").read_text())
    template = base["models"]["i21"]
    models = {k: v for k, v in base["models"].items() if not k.startswith("i")}
    models.update({f"i{s}": {**copy.deepcopy(template), "seed": s} for s in seeds})
    return base, models


def pilot_preset(seeds: list[int]) -> dict:
    """cpu-confirm's preset with the chosen instances and the pilot arms in place of its study."""
    base, models = cpu_confirm_with(seeds)
    arms = [{"name": f"prio-b{b}", "kl": "prioritized", "beta": str(b)} for b in BETAS]  # the standard arm: no calibration reads it
    return {"name": "cpu-placement-pilot",
            "description": "The pilots of cpu-placement: the realized penalty of the prioritized arms at beta 4, 8 and 16, and the "
                           "comfort KL's spread, on the study's instances at seeds disjoint from the study's.",
            "notes": "Made by scripts/placement_pilots.py preset; the RL values are cpu-confirm's.",
            "models": models, "rl": base["rl"],
            "experiments": {"kl_by_model": {"models": [f"i{s}" for s in seeds], "seeds": PILOT_SEEDS[1], "first_seed": PILOT_SEEDS[0],
                                            "rl": {"task": "plus1", "kl_coef": KL_COEF}, "arms": arms}}}


def final_record(run: Path) -> dict | None:
    """The last metrics line of a finished run, when it holds the final evaluation."""
    lines = read_metrics(run)
    return lines[-1] if lines and "final/accuracy_sampled" in lines[-1] else None


def calibrate(roots: list[Path]) -> dict:
    """The calibration from one or more pilot reproductions (the first instances' pilots may run apart)."""
    result = {"kl_coef": KL_COEF, "instances": {}}
    for root in roots:
        result["instances"].update(_calibrate_one(root))
    return result


def _calibrate_one(root: Path) -> dict:
    runs_dir = root / "kl_by_model"
    if not runs_dir.is_dir():
        raise UserError(f"{root} holds no kl_by_model runs; run the pilot reproduction first")
    instances = sorted(p.name for p in runs_dir.iterdir() if p.is_dir())
    result = {}
    for instance in instances:
        entry = {}
        standard = {p.name: final_record(p) for p in sorted((runs_dir / instance / "standard").glob("seed*"))}  # {} without them
        for beta in BETAS:
            prio = {p.name: final_record(p) for p in sorted((runs_dir / instance / f"prio-b{beta}").glob("seed*"))}
            ratios = [r["final/penalty_ratio"] for r in prio.values() if r and r.get("final/penalty_ratio") is not None]
            diffs = [prio[s]["final/comfort_kl"] - standard[s]["final/comfort_kl"] for s in prio
                     if prio[s] and standard.get(s) and "final/comfort_kl" in prio[s] and "final/comfort_kl" in standard[s]]
            median = statistics.median(ratios) if ratios else None
            entry[f"beta {beta}"] = {"pilot_runs": len(ratios), "ratios": ratios, "median_ratio": median,
                                     "matched_kl_coef": None if median is None else KL_COEF * median,
                                     "comfort_kl_paired_differences": diffs,
                                     "comfort_kl_paired_sd": statistics.stdev(diffs) if len(diffs) > 1 else None,
                                     "seeds": sorted(s for s, r in prio.items() if r),
                                     "comfort_kl": [prio[s][COMFORT_KL] for s in sorted(prio) if prio[s] and COMFORT_KL in prio[s]],
                                     "accuracy_sampled": [prio[s][ACC] for s in sorted(prio) if prio[s]]}
        result[instance] = entry
    return result


def _pooled_sd(groups: list[list[float]]) -> float | None:
    """The pooled within-group standard deviation (each group's own mean removed), None without a degree of freedom."""
    groups = [g for g in groups if len(g) > 1]
    df = sum(len(g) - 1 for g in groups)
    if not df:
        return None
    return (sum(statistics.variance(g) * (len(g) - 1) for g in groups) / df) ** 0.5


def power_inputs(result: dict) -> dict:
    """The spreads and margins the study's power is computed from (the rules of the module docstring).

    - accuracy: the pilots have no matched arm, so the spread of prioritized - matched is taken from the
      closest pairs they have, prioritized at adjacent betas (4 - 8 and 8 - 16) on the same seed: the
      standard deviation of those paired differences over instances and seeds (variances of the two
      pairs averaged), or cpu-confirm's 4.4 points (prioritized - matched-penalty) if that is larger;
    - comfort KL of each beta, on the log10 scale of the study's endpoint: sqrt(2) x the prioritized
      arm's pooled within-instance standard deviation of log10 comfort KL (the two arms' values taken as
      independent); its margin ``COMFORT_MARGIN``.
    """
    instances = result["instances"].values()
    variances = []
    for low, high in zip(BETAS, BETAS[1:]):
        diffs = []
        for entry in instances:
            a, b = entry[f"beta {low}"], entry[f"beta {high}"]
            by_seed = dict(zip(b["seeds"], b["accuracy_sampled"]))
            diffs += [x - by_seed[s] for s, x in zip(a["seeds"], a["accuracy_sampled"]) if s in by_seed]
        if len(diffs) > 1:
            variances.append(statistics.variance(diffs))
    pilot_sd = statistics.mean(variances) ** 0.5 if variances else None
    out = {"accuracy": {"pilot_sd": pilot_sd, "sd": max(0.044, pilot_sd or 0.0), "margin": ACCURACY_MARGIN, "effect": ACCURACY_MARGIN}}
    for beta in BETAS:
        values = [[math.log10(max(v, KL_FLOOR)) for v in entry[f"beta {beta}"]["comfort_kl"]] for entry in instances]
        within = _pooled_sd(values)
        mean = statistics.mean(v for vs in values for v in vs)
        out[f"comfort beta {beta}"] = {"pilot_mean_log10": mean, "pilot_within_sd": within,
                                       "sd": None if within is None else 2 ** 0.5 * within, "margin": COMFORT_MARGIN, "effect": COMFORT_MARGIN}
    return out


def study_preset(result: dict) -> dict:
    """The cpu-placement study's preset from the pilots' calibration: cpu-confirm's models and RL values,
    the calibrated instances, seven arms (standard, and per beta the prioritized arm and the uniform arm
    matched per instance to its realized penalty), per beta superiority and TOST on sampled N+1 accuracy
    and on log10 of the comfort KL (lower is better), the replication of cpu-confirm's H1 as a
    comparison, and the placement decision rule."""
    instances = list(result["instances"])
    base, models = cpu_confirm_with([int(name.removeprefix("i")) for name in instances])
    arms = [{"name": "standard", "kl": "standard"}]
    hypotheses = [{"name": "C-b8", "arm": "prio-b8", "versus": "standard", "metric": ACC, "margin": 0.0, "role": "comparison", "group": "beta 8"}]
    groups = []
    for beta in BETAS:
        prio, matched, group = f"prio-b{beta}", f"matched-b{beta}", f"beta {beta}"
        coefs = {name: float(f"{result['instances'][name][group]['matched_kl_coef']:.4g}") for name in instances}
        arms += [{"name": prio, "kl": "prioritized", "beta": str(beta)}, {"name": matched, "kl": "standard", "kl_coef_by_model": coefs}]
        groups.append({"name": group, "prioritized": prio, "matched": matched})
        common = {"arm": prio, "versus": matched, "group": group}
        hypotheses += [{"name": f"S-acc-b{beta}", **common, "metric": ACC, "margin": 0.0, "role": "superiority"},
                       {"name": f"E-acc-b{beta}", **common, "metric": ACC, "margin": ACCURACY_MARGIN, "role": "equivalence"},
                       {"name": f"S-kl-b{beta}", **common, "metric": COMFORT, "margin": 0.0, "role": "superiority", "direction": "lower"},
                       {"name": f"E-kl-b{beta}", **common, "metric": COMFORT, "margin": COMFORT_MARGIN, "role": "equivalence", "direction": "lower"}]
    study = {"title": "Placement or strength", "models": instances, "seeds": STUDY_SEEDS[1], "first_seed": STUDY_SEEDS[0],
             "rl": {"task": "plus1", "kl_coef": KL_COEF}, "arms": arms, "hypotheses": hypotheses, "alpha": 0.05,
             "decision": "placement", "placement": {"baseline": "standard", "metric": ACC, "groups": groups}, "analysis": "pooled",
             "preregistration": "docs/preregistration/cpu-placement.md",
             "notes": "Per beta (4, 8, 16): the prioritized penalty (alpha 5, w = c^beta) against a uniform penalty whose coefficient "
                      "is 5 x the median realized kl_term / kl of that beta's prioritized pilot runs on that instance "
                      "(docs/placement-pilots.md, seeds 900-902); superiority and TOST on sampled N+1 accuracy (margin 3 points) and on "
                      "log10 of the comfort KL (lower is better, margin 0.5); Holm over all 13 hypotheses. Endpoints from each run's final evaluation."}
    return {"name": "cpu-placement",
            "description": "The pre-registered study of placement against strength on a 2-core CPU: at three strengths (beta 4, 8 and 16), "
                           "does the prioritized KL penalty beat, or match within stated margins, a uniform penalty of the same realized "
                           "size, on sampled N+1 accuracy and on the in-distribution KL to the reference? Four instances of the regime "
                           "recipe that meet the regime target (continuation seeds 25, 26, 28, 30), seven arms, RL seeds 600-614 in every "
                           "arm (paired), the analysis and decision rule of docs/preregistration/cpu-placement.md. About 14 core-hours "
                           "(7 hours on 2 cores): run it in the background; it resumes where it stopped.",
            "notes": "Deviations from the paper: those of cpu-confirm (RLOO instead of A2C, policy temperature 1.0, 640 episodes, a tiny "
                     "N = 3 model that saw 1% of N+1 additions in its last epoch of pre-training), beta 4-16 instead of 150. Every RL "
                     "value is cpu-confirm's. The design, the margins, the hypotheses and the decision rule were committed before any run.",
            "models": models, "rl": base["rl"], "experiments": {"confirm": study}}


def power_table(result: dict) -> list[str]:
    """The power of each kind of hypothesis at the study's size (units = instances x seeds), Holm's worst case."""
    from critical_tokens.report.power import power_superiority, power_tost

    n, h = len(result["instances"]) * STUDY_SEEDS[1], 1 + 4 * len(BETAS)
    lines = [f"Power at n = {n} paired units, each hypothesis at 0.05 / {h} (Holm's first step, the worst case):", "",
             "| endpoint | sd of the paired difference | margin | superiority (true difference = margin) | TOST (true difference 0) |",
             "|---|---|---|---|---|"]
    for name, p in power_inputs(result).items():
        if p["sd"] is None:
            lines.append(f"| {name} | - | {p['margin']:.3g} | - | - |")
            continue
        sup, tost = power_superiority(p["sd"], p["effect"], n, 0.05, h), power_tost(p["sd"], p["margin"], n, 0.05, h)
        lines.append(f"| {name} | {p['sd']:.3g} | {p['margin']:.3g} | {sup:.3f} | {tost:.3f} |")
    return lines


def markdown(result: dict) -> str:
    lines = ["# cpu-placement: the pilots", "", "Made by `python scripts/placement_pilots.py calibrate` (do not edit by hand). Per instance "
             f"and beta: each pilot run's realized penalty ratio (median over its collects of kl_term / kl), their median over the "
             f"pilot seeds, the matched uniform coefficient {result['kl_coef']:g} x that median, and the prioritized arm's comfort KL "
             "and sampled N+1 accuracy (each seed's, in seed order).", "",
             "| instance | beta | pilot runs | ratios | median ratio | matched coefficient | comfort KL | sampled N+1 |",
             "|---|---|---|---|---|---|---|---|"]
    for instance, entry in result["instances"].items():
        for beta, e in entry.items():
            ratios = ", ".join(f"{r:.4f}" for r in e["ratios"]) or "-"
            coef = "-" if e["matched_kl_coef"] is None else f"{e['matched_kl_coef']:.4f}"
            median = "-" if e["median_ratio"] is None else f"{e['median_ratio']:.4f}"
            comfort = ", ".join(f"{v:.2e}" for v in e.get("comfort_kl", [])) or "-"
            accuracy = ", ".join(f"{100 * v:.1f}%" for v in e.get("accuracy_sampled", [])) or "-"
            lines.append(f"| {instance} | {beta.removeprefix('beta ')} | {e['pilot_runs']} | {ratios} | {median} | {coef} | {comfort} | {accuracy} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    make = sub.add_parser("preset", help="write the pilot reproduction's preset from the instance search")
    make.add_argument("--rows", default="docs/placement-instances", help="the instance search's rows")
    make.add_argument("--out", default="runs/placement-pilot.json", help="the preset file to write")
    make.add_argument("--found-so-far", action="store_true", help="the instances found so far (the first of the four), to start their pilots early")
    read = sub.add_parser("calibrate", help="read the pilot reproduction(s) and write the calibration")
    read.add_argument("run", nargs="+", help="the pilot reproduction's directory (several: each instance's pilots in one of them)")
    read.add_argument("--to", default="docs/placement-pilots", help="writes TO.json and TO.md")
    study = sub.add_parser("study", help="write the study's preset from the calibration, and print the power of its hypotheses")
    study.add_argument("calibration", nargs="?", default="docs/placement-pilots.json", help="the calibration that calibrate wrote")
    study.add_argument("--out", default="critical_tokens/study/presets/cpu-placement.json", help="the preset file to write")
    args = parser.parse_args()
    try:
        if args.command == "preset":
            preset = pilot_preset(chosen_instances(Path(args.rows), partial=args.found_so_far))
            write_json(Path(args.out), preset)
            print(f"wrote {args.out}: instances {', '.join(preset['experiments']['kl_by_model']['models'])}")
        elif args.command == "calibrate":
            result = calibrate([Path(r) for r in args.run])
            write_json(Path(args.to + ".json"), result)
            text = markdown(result) + "\n" + "\n".join(power_table(result)) + "\n"
            atomic_write_text(Path(args.to + ".md"), text)
            print(text, end="")
        else:
            path = Path(args.calibration)
            if not path.is_file():
                raise UserError(f"{path} does not exist; run calibrate first")
            result = json.loads(path.read_text())
            write_json(Path(args.out), study_preset(result))
            print(f"wrote {args.out}")
            print("\n".join(power_table(result)))
    except (UserError, OSError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
