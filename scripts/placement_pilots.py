"""The pilots of the cpu-placement study: the realized penalty of the prioritized arms, per instance and beta.

The matched uniform penalty of the study is fixed per instance and beta, before the study, from pilot
runs on seeds disjoint from the study's (issue 35):

    python scripts/placement_pilots.py preset --out runs/placement-pilot.json     # from the instance search
    critical-tokens reproduce --preset runs/placement-pilot.json --out runs/placement-pilot --jobs 2
    python scripts/placement_pilots.py calibrate runs/placement-pilot                # docs/placement-pilots.{json,md}

(``preset --found-so-far`` writes the pilots of the instances found so far, so that they can start
while the search goes on; ``calibrate`` then reads the two reproductions together.)

``preset`` reads the instances chosen by ``scripts/placement_instances.py`` (the first four seeds of
docs/placement-instances/ that meet the target) and writes a reproduction preset: the instances
made by the regime recipe, and on each of them the prioritized penalty at beta 4, 8 and 16 and the
standard penalty, at the pilot seeds 900-902. ``calibrate`` reads the pilots' final evaluations and
writes, per instance and beta, the median realized penalty ratio (median over collects of
kl_term / kl, then over pilot seeds) and the matched coefficient 5 x that median, and the paired
standard deviation of the comfort KL (prioritized - standard) from which the study's comfort margin
is fixed.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from critical_tokens.runs import UserError, atomic_write_text, read_metrics, write_json  # noqa: E402

BETAS = (4, 8, 16)
KL_COEF = 5.0
PILOT_SEEDS = (900, 3)  # first seed, count: disjoint from every study's seeds (cpu-confirm 100-109, cpu-methods 300-309, trl-grpo 500-507)
INSTANCES = 4


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


def pilot_preset(seeds: list[int]) -> dict:
    """cpu-confirm's preset with the chosen instances and the pilot arms in place of its study."""
    base = json.loads((ROOT / "critical_tokens" / "study" / "presets" / "cpu-confirm.json").read_text())
    template = base["models"]["i21"]
    models = {k: v for k, v in base["models"].items() if not k.startswith("i")}
    models.update({f"i{s}": {**copy.deepcopy(template), "seed": s} for s in seeds})
    arms = [{"name": f"prio-b{b}", "kl": "prioritized", "beta": str(b)} for b in BETAS] + [{"name": "standard", "kl": "standard"}]
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
        standard = {p.name: final_record(p) for p in sorted((runs_dir / instance / "standard").glob("seed*"))}
        for beta in BETAS:
            prio = {p.name: final_record(p) for p in sorted((runs_dir / instance / f"prio-b{beta}").glob("seed*"))}
            ratios = [r["final/penalty_ratio"] for r in prio.values() if r and r.get("final/penalty_ratio") is not None]
            diffs = [prio[s]["final/comfort_kl"] - standard[s]["final/comfort_kl"] for s in prio
                     if prio[s] and standard.get(s) and "final/comfort_kl" in prio[s] and "final/comfort_kl" in standard[s]]
            median = statistics.median(ratios) if ratios else None
            entry[f"beta {beta}"] = {"pilot_runs": len(ratios), "ratios": ratios, "median_ratio": median,
                                     "matched_kl_coef": None if median is None else KL_COEF * median,
                                     "comfort_kl_paired_differences": diffs,
                                     "comfort_kl_paired_sd": statistics.stdev(diffs) if len(diffs) > 1 else None}
        result[instance] = entry
    return result


def markdown(result: dict) -> str:
    lines = ["# cpu-placement: the pilots", "", "Made by `python scripts/placement_pilots.py calibrate` (do not edit by hand). Per instance "
             f"and beta: the median over pilot seeds of each run's realized penalty ratio (median over collects of kl_term / kl), the "
             f"matched uniform coefficient {result['kl_coef']:g} x that median, and the paired standard deviation of the comfort KL "
             "(prioritized - standard) over the pilot seeds.", "",
             "| instance | beta | pilot runs | ratios | median ratio | matched coefficient | comfort KL paired SD |", "|---|---|---|---|---|---|---|"]
    for instance, entry in result["instances"].items():
        for beta, e in entry.items():
            ratios = ", ".join(f"{r:.4f}" for r in e["ratios"]) or "-"
            coef = "-" if e["matched_kl_coef"] is None else f"{e['matched_kl_coef']:.4f}"
            median = "-" if e["median_ratio"] is None else f"{e['median_ratio']:.4f}"
            sd = "-" if e["comfort_kl_paired_sd"] is None else f"{e['comfort_kl_paired_sd']:.2e}"
            lines.append(f"| {instance} | {beta.removeprefix('beta ')} | {e['pilot_runs']} | {ratios} | {median} | {coef} | {sd} |")
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
    args = parser.parse_args()
    try:
        if args.command == "preset":
            preset = pilot_preset(chosen_instances(Path(args.rows), partial=args.found_so_far))
            write_json(Path(args.out), preset)
            print(f"wrote {args.out}: instances {', '.join(preset['experiments']['kl_by_model']['models'])}")
        else:
            result = calibrate([Path(r) for r in args.run])
            write_json(Path(args.to + ".json"), result)
            atomic_write_text(Path(args.to + ".md"), markdown(result))
            print(markdown(result))
    except (UserError, OSError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
