"""Choose the model instances of the cpu-placement study by a rule fixed before any of them is trained.

The rule (issue 35, committed before the search ran):

1. candidates are the regime recipe (the shipped ``tiny-n3`` continued for one epoch of fresh
   1..3-digit additions with a 1% dose of 4-digit ones, learning rate 3e-4) at continuation seeds
   24, 25, 26, ... taken in order (seeds 5 and 21-23 made earlier models and are never reused);
2. each candidate is checked on a fresh evaluation seed (4001, never used by an earlier check) with
   1,000 examples per cell against the five regime criteria of ``scripts/regime_search.py``
   (in distribution >= 95%, greedy N+1 in 15..80%, critical tokens less certain with the 95%
   intervals apart, >= 25% of N+1 failures at a critical token, sampled N+1 >= 5% at T = 1);
3. the first four candidates that meet all five are the study's instances. Every seed tried is listed
   with its check, passing or not, in ``--rows``/SEARCH.md.

    python scripts/placement_instances.py                 # resumes; stops after four instances pass
    python scripts/placement_instances.py --render        # only rebuild SEARCH.md from the rows
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from regime_search import TARGET, dose_continuation, measure, verdict  # noqa: E402

from critical_tokens.pretrain import PretrainConfig, pretrain  # noqa: E402
from critical_tokens.runs import atomic_write_text, write_json  # noqa: E402

FIRST_SEED = 24
EVAL_SEED = 4001
EXAMPLES = 1000
WANTED = 4
DOSE, LR = 0.01, 3e-4


def row_path(rows: Path, seed: int) -> Path:
    return rows / f"s{seed}.json"


def search(runs: Path, rows: Path, max_seeds: int) -> list[int]:
    """Train and check seeds in order until WANTED pass (or max_seeds were tried); the passing seeds."""
    passing = []
    for seed in range(FIRST_SEED, FIRST_SEED + max_seeds):
        path = row_path(rows, seed)
        if not path.exists():
            run_dir = runs / f"s{seed}"
            resume = (run_dir / "model" / "trainer_state.pt").exists()  # a finished run resumes to its end at once
            pretrain(dataclasses.replace(PretrainConfig(), out=str(run_dir), resume=resume, **dose_continuation(DOSE, LR, seed)))
            row = measure(f"tiny-n3-dose1-lr3e-4-s{seed}", run_dir, EXAMPLES, EVAL_SEED)
            write_json(path, {**row, "seed": seed, "verdict": verdict(row)})
        row = json.loads(path.read_text())
        print(f"seed {seed}: {row['verdict']}", flush=True)
        if row["verdict"] == "meets the target":
            passing.append(seed)
        if len(passing) == WANTED:
            break
    return passing


def render(rows: Path) -> str:
    found = sorted((json.loads(p.read_text()) for p in rows.glob("s*.json")), key=lambda r: r["seed"])
    pct = lambda x: f"{100 * x:.1f}%"  # noqa: E731
    lines = ["# cpu-placement: the instance search", "",
             "Made by `python scripts/placement_instances.py` (do not edit by hand). The rule, fixed before the search: "
             f"the regime recipe at continuation seeds {FIRST_SEED}, {FIRST_SEED + 1}, ... in order, each checked on evaluation "
             f"seed {EVAL_SEED} with {EXAMPLES:,} examples per cell; the first {WANTED} that meet all five criteria are the instances.",
             f"Criteria: in distribution >= {TARGET['in_distribution_min']:.0%}; greedy N+1 in {TARGET['n_plus_1_range'][0]:.0%}.."
             f"{TARGET['n_plus_1_range'][1]:.0%}; certainty of the critical tokens below the other tokens' (95% intervals apart); "
             f">= {TARGET['failures_at_critical_min']:.0%} of N+1 failures at a critical token; sampled N+1 >= "
             f"{TARGET['sampled_n_plus_1_min']:.0%} at T = {TARGET['rl_temperature']:g}.", "",
             "| seed | in dist. (identical / varying) | greedy N+1 (identical / varying) | Δ critical [95%] | Δ other [95%] | failures at critical | sampled N+1 | verdict |",
             "|---|---|---|---|---|---|---|---|"]
    for r in found:
        a = r["accuracy"]
        lo, hi = r["gap_critical_ci"]
        olo, ohi = r["gap_non_critical_ci"]
        lines.append(f"| {r['seed']} | {pct(a['identical@+0'])} / {pct(a['varying@+0'])} | {pct(a['identical@+1'])} / {pct(a['varying@+1'])} | "
                     f"{r['gap_critical']:+.3f} [{lo:+.3f}, {hi:+.3f}] | {r['gap_non_critical']:+.4f} [{olo:+.4f}, {ohi:+.4f}] | "
                     f"{pct(r['failures_at_critical'])} | {pct(r['sampled']['n_plus_1@T=1'])} | {r['verdict']} |")
    chosen, checked = [], {r["seed"]: r for r in found}
    seed = FIRST_SEED
    while seed in checked and len(chosen) < WANTED:  # in seed order, up to the first seed not checked yet
        if checked[seed]["verdict"] == "meets the target":
            chosen.append(seed)
        seed += 1
    ahead = sorted(s for s in checked if s > seed - 1 and len(chosen) < WANTED)
    lines += ["", f"Instances: {', '.join(f'seed {s}' for s in chosen) or 'none yet'} ({len(chosen)} of {WANTED}; {len(found)} seeds tried)."
              + (f" Seed {seed} is not checked yet; the seeds checked ahead of order by a second worker ({', '.join(map(str, ahead))}) "
                 "count only if it misses." if ahead else "")]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="runs/placement-instances", help="where the candidates' pre-training runs go")
    parser.add_argument("--rows", default="docs/placement-instances", help="one JSON row per seed tried, and SEARCH.md")
    parser.add_argument("--max-seeds", type=int, default=24, help="give up after this many seeds")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--render", action="store_true", help="only rebuild SEARCH.md")
    args = parser.parse_args()
    if args.max_seeds <= 0 or args.threads <= 0:
        parser.error("--max-seeds and --threads must be positive")
    torch.set_num_threads(args.threads)
    rows = Path(args.rows)
    rows.mkdir(parents=True, exist_ok=True)
    if not args.render:
        passing = search(Path(args.runs), rows, args.max_seeds)
        print(f"instances: {passing}")
    atomic_write_text(rows / "SEARCH.md", render(rows))


if __name__ == "__main__":
    main()
