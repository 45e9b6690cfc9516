"""One complete RL run of a study's configuration, at an older commit and at the working tree, side by side.

The run is cpu-confirm's (its preset's RL values: RLOO, 640 episodes, the final evaluation on 200 N+1 /
100 in-distribution / 100 probe prompts), the prioritized arm (beta 8), on the shipped regime model,
one torch thread, evaluation included. The baseline runs from a temporary git worktree of COMMIT;
both sides run in processes of their own, alternating within each round. Per round it prints both
wall times, CPU times and their split (generation of the rollouts, reference pass, update, and
evaluation = the rest of the training call), and last the median of old / new wall time:

    python benchmarks/study_run.py --baseline aa60bb0 [--rounds 3] [--seed 7705]

The machine may be shared: the CPU-time ratio is printed beside the wall-time one, and only ratios
measured side by side mean anything.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import commit_tree, machine_header, presets_dir  # noqa: E402

# Runs inside the tree under test (PYTHONPATH): its own RLConfig, train and preset.
ONE_RUN = r"""
import json, resource, sys, time, torch
torch.set_num_threads(1)
from critical_tokens.rl.config import RLConfig
from critical_tokens.rl.loop import train
preset = json.load(open(sys.argv[3]))
config = RLConfig(**preset["rl"], kl="prioritized", beta="8", pretrained="critical_tokens/checkpoints/tiny-n3-d1-lr3e-4",
                  out=sys.argv[1], seed=int(sys.argv[2]))
wall, cpu = time.perf_counter(), time.process_time()
train(config)
wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
last = [json.loads(line) for line in open(sys.argv[1] + "/metrics.jsonl") if line.strip()][-1]
parts = {k.removeprefix("time/"): v for k, v in last.items() if k.startswith("time/") and k != "time/evaluation"}
parts["evaluation"] = wall - sum(parts.values())  # every evaluation, the first and the final one included
print("RESULT " + json.dumps({"wall": wall, "cpu": cpu, **parts, "final_sampled": last.get("final/accuracy_sampled")}))
"""


def run_once(tree: Path, seed: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
        done = subprocess.run([sys.executable, "-c", ONE_RUN, str(Path(out) / "run"), str(seed), str(presets_dir(tree) / "cpu-confirm.json")], cwd=tree, env=env,
                              capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"error: the run in {tree} failed:\n{done.stderr[-2000:]}")
    return json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])


def describe(name: str, r: dict) -> str:
    split = ", ".join(f"{k} {r[k]:.1f}s" for k in ("rollout", "reference", "update", "evaluation") if k in r)
    return f"  {name}: wall {r['wall']:.1f}s, cpu {r['cpu']:.1f}s ({split}); final sampled accuracy {r['final_sampled']:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", required=True, help="the commit to compare with (e.g. aa60bb0)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, each one run per side (alternating which goes first)")
    parser.add_argument("--seed", type=int, default=7705, help="the RL seed of every run")
    args = parser.parse_args()
    if args.rounds <= 0:
        parser.error("--rounds must be positive")
    machine_header(f"one study run (cpu-confirm, prioritized beta 8, 1 thread): {args.baseline} against the working tree", threads=1)
    with commit_tree(ROOT, args.baseline) as old_tree:
        ratios, cpu_ratios = [], []
        for round_ in range(args.rounds):
            sides = [("old", old_tree), ("new", ROOT)]
            results = {name: run_once(tree, args.seed) for name, tree in (sides if round_ % 2 == 0 else sides[::-1])}
            ratios.append(results["old"]["wall"] / results["new"]["wall"])
            cpu_ratios.append(results["old"]["cpu"] / results["new"]["cpu"])
            print(f"round {round_ + 1}: old / new wall {ratios[-1]:.2f}x, cpu {cpu_ratios[-1]:.2f}x")
            for name in ("old", "new"):
                print(describe(name, results[name]))
    print(f"cpu-time speedup: {statistics.median(cpu_ratios):.2f}x (rounds: {', '.join(f'{r:.2f}' for r in cpu_ratios)})")
    print(f"speedup: {statistics.median(ratios):.2f}x")


if __name__ == "__main__":
    main()
