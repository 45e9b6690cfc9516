"""The same numbers at two commits: RL runs of the studies' arms at an older commit and at the working tree, compared number for number.

A change meant to leave behaviour alone (a refactor, a new layout) is checked by running the same
configurations at both commits, each in its own process with one torch thread, and comparing every
number of their ``metrics.jsonl`` (the ``time/*`` keys aside) and of ``final_eval.json``:

    python scripts/same_numbers.py --baseline 094f75d                        # cpu-confirm's prioritized arm, cpu-methods' archer arm
    python scripts/same_numbers.py --baseline 094f75d --arms cpu-methods:kl-cov --episodes 640
    python scripts/same_numbers.py --baseline cac5674 --rtol 1e-4                # the same tokens, floats to rounding

Each ARM is ``PRESET:ARM`` of a study (the ``confirm`` experiment): the run is the preset's RL values,
the study's and the arm's overrides, on the shipped regime model ``tiny-n3-d1-lr3e-4``, at ``--seed``,
for ``--episodes`` episodes (the final evaluation at the preset's sizes). Prints one line per arm
("identical", "equal within rtol" with the largest relative difference, or the differing keys) and
exits 1 if any differs beyond ``--rtol`` and ``--atol``. A change of the order of floating-point operations (another
attention kernel) keeps the tokens but moves the floats in their last digits: ``--rtol`` says how far.

Over long runs such floats can tip a sampled token, and the runs part ways. ``--seeds`` then checks
the same science in distribution instead of number for number:

    python scripts/same_numbers.py --baseline aa60bb0 --episodes 640 --seeds 7710 7711 7712 7713 \\
        --arms cpu-confirm:prioritized cpu-confirm:matched-penalty

runs every arm at every seed at both commits and prints, per arm and final endpoint (sampled and
greedy N+1 accuracy, greedy in-distribution accuracy), each commit's mean over the seeds with its
95% t interval and the paired difference new - old with its interval; it exits 1 if either mean
falls outside the other commit's interval.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import commit_tree, presets_dir  # noqa: E402

sys.path.insert(0, str(ROOT))
from critical_tokens.report.paired import paired_test  # noqa: E402
from critical_tokens.report.statistics import Estimate, t_interval  # noqa: E402

# The final endpoints compared in distribution (--seeds): every commit's final_eval.json has them.
ENDPOINTS = ("final/accuracy_sampled", "final/accuracy_greedy", "final/comfort_accuracy_greedy")

# Runs inside the tree under test (PYTHONPATH): its own RLConfig, train and presets.
ONE_RUN = r"""
import json, sys, torch
from pathlib import Path
torch.set_num_threads(1)
from critical_tokens.rl.config import RLConfig
from critical_tokens.rl.loop import train
out, preset_path, arm_name, seed, episodes = sys.argv[1:6]
preset = json.loads(Path(preset_path).read_text())
study = preset["experiments"]["confirm"]
arm = next(a for a in study["arms"] if a["name"] == arm_name)
values = {**preset["rl"], **study.get("rl", {}), **{k: v for k, v in arm.items() if k != "name"},
          "pretrained": "critical_tokens/checkpoints/tiny-n3-d1-lr3e-4", "out": out, "seed": int(seed), "episodes": int(episodes)}
train(RLConfig(**values))
"""


def run(tree: Path, out: Path, arm: str, seed: int, episodes: int) -> tuple[list[dict], dict]:
    """One run of ``arm`` in ``tree``: its metrics lines without time/*, and its final_eval.json."""
    preset, name = arm.split(":", 1)
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    preset_path = presets_dir(tree) / f"{preset}.json"
    done = subprocess.run([sys.executable, "-c", ONE_RUN, str(out), str(preset_path), name, str(seed), str(episodes)], cwd=tree, env=env,
                          capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"error: {arm} in {tree} failed:\n{done.stderr[-2000:]}")
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [{k: v for k, v in line.items() if not k.startswith("time/")} for line in lines], json.loads((out / "final_eval.json").read_text())


def differences(old, new, where: str = "") -> list[tuple[str, object, object]]:
    """(path, old, new) wherever two JSON values differ (floats compared exactly; NaN equals NaN)."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(set(old) | set(new)) for d in differences(old.get(k), new.get(k), f"{where}.{k}")]
    if isinstance(old, (list, tuple)) and isinstance(new, (list, tuple)):
        if len(old) != len(new):
            return [(where, f"{len(old)} items", f"{len(new)} items")]
        return [d for i, (a, b) in enumerate(zip(old, new)) for d in differences(a, b, f"{where}[{i}]")]
    same = old == new or (isinstance(old, float) and isinstance(new, float) and math.isnan(old) and math.isnan(new))
    return [] if same else [(where, old, new)]


def relative_difference(old, new) -> float:
    """|old - new| / max(|old|, |new|) of two numbers; infinity for anything else (a count, a string)."""
    if not all(isinstance(x, float) for x in (old, new)):
        return math.inf
    return abs(old - new) / max(abs(old), abs(new))


def within(old, new, rtol: float, atol: float) -> bool:
    """Two floats within |old - new| <= atol + rtol * max(|old|, |new|) (numpy's isclose, symmetric);
    never two values of which one is not a float."""
    if not all(isinstance(x, float) for x in (old, new)):
        return False
    return abs(old - new) <= atol + rtol * max(abs(old), abs(new))


def verdict(found: list[tuple[str, object, object]], rtol: float, atol: float = 0.0) -> tuple[str, bool]:
    """A one-line account of the differences, and whether any is beyond ``rtol`` and ``atol``."""
    if not found:
        return "identical", False
    worst = max(found, key=lambda d: relative_difference(d[1], d[2]))
    largest = relative_difference(worst[1], worst[2])
    tolerance = f"rtol {rtol:g}" + (f", atol {atol:g}" if atol else "")
    beyond = [d for d in found if not within(d[1], d[2], rtol, atol)]
    if not beyond:
        return (f"equal within {tolerance}: {len(found)} floats differ, the largest relative difference {largest:.1e} "
                f"(at {worst[0]}); every other value identical"), False
    beyond.sort(key=lambda d: relative_difference(d[1], d[2]), reverse=True)  # a changed outcome or count first
    return (f"{len(beyond)} of {len(found)} differences beyond {tolerance}, the largest relative difference {largest:.1e}: "
            + "; ".join(f"{p}: {a!r} against {b!r}" for p, a, b in beyond[:5])), True


def inside(value: float, interval: Estimate) -> bool:
    """``value`` within ``interval``'s 95% bounds (a single seed has none: never inside)."""
    return interval.low is not None and interval.low <= value <= interval.high


def distribution_line(arm: str, endpoint: str, old: dict[int, float], new: dict[int, float]) -> tuple[str, bool]:
    """One endpoint of one arm over the seeds at both commits: each commit's mean and 95% interval,
    the paired difference new - old, and whether either mean falls outside the other's interval."""
    a, b = t_interval(list(old.values())), t_interval(list(new.values()))
    difference = paired_test([new[s] - old[s] for s in sorted(old)])
    apart = not (inside(a.mean, b) and inside(b.mean, a))
    span = (f"[{difference.low:+.3f}, {difference.high:+.3f}]" if difference.low is not None else "(one seed)")
    return (f"{arm} {endpoint}: old {a.mean:.3f} [{a.low:.3f}, {a.high:.3f}], new {b.mean:.3f} [{b.low:.3f}, {b.high:.3f}], "
            f"new - old {difference.mean:+.3f} {span}; " + ("a mean outside the other's interval" if apart
                                                             else "each mean inside the other's interval")), apart


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", required=True, help="the commit to compare with")
    parser.add_argument("--arms", nargs="+", default=["cpu-confirm:prioritized", "cpu-methods:archer"], help="PRESET:ARM of each run")
    parser.add_argument("--seed", type=int, default=7705, help="the RL seed of every run")
    parser.add_argument("--seeds", type=int, nargs="+", help="several RL seeds: compare the final endpoints in distribution "
                        "(means and intervals over the seeds) instead of number for number")
    parser.add_argument("--episodes", type=int, default=160, help="episodes of every run (the preset's final evaluation at the end)")
    parser.add_argument("--rtol", type=float, default=0.0, help="relative tolerance on floats (default 0: bit for bit); "
                        "counts, tokens' outcomes and other non-floats must always be identical")
    parser.add_argument("--atol", type=float, default=0.0, help="absolute tolerance on floats, added to --rtol's (for a loss, "
                        "a sum of terms that nearly cancel)")
    args = parser.parse_args()
    if args.episodes <= 0 or min(args.rtol, args.atol) < 0 or any(":" not in arm for arm in args.arms):
        parser.error("--episodes must be positive, --rtol and --atol not negative and each arm PRESET:ARM")
    if args.seeds is not None and len(set(args.seeds)) < 2:
        parser.error("--seeds needs at least two different seeds (one seed: --seed)")
    if args.seeds:
        sys.exit(1 if compare_in_distribution(args.baseline, args.arms, sorted(set(args.seeds)), args.episodes) else 0)
    differ = False
    with commit_tree(ROOT, args.baseline) as old_tree, tempfile.TemporaryDirectory() as scratch:
        for k, arm in enumerate(args.arms):
            old = run(old_tree, Path(scratch) / f"old{k}", arm, args.seed, args.episodes)
            new = run(ROOT, Path(scratch) / f"new{k}", arm, args.seed, args.episodes)
            line, beyond = verdict(differences(old, new), args.rtol, args.atol)
            differ |= beyond
            print(f"{arm} (seed {args.seed}, {args.episodes} episodes, {len(old[0])} metrics lines): {line}")
    sys.exit(1 if differ else 0)


def compare_in_distribution(baseline: str, arms: list[str], seeds: list[int], episodes: int) -> bool:
    """Every arm at every seed at ``baseline`` and at the working tree; one line per run as it ends,
    then one per arm and endpoint (`distribution_line`). True if any endpoint's means fall apart."""
    finals: dict[tuple[str, str], dict[int, dict]] = {}
    with commit_tree(ROOT, baseline) as old_tree, tempfile.TemporaryDirectory() as scratch:
        for arm in arms:
            for seed in seeds:
                for side, tree in (("old", old_tree), ("new", ROOT)):
                    _, final = run(tree, Path(scratch) / f"{side}-{arm.replace(':', '-')}-{seed}", arm, seed, episodes)
                    finals.setdefault((arm, side), {})[seed] = final
                    print(f"{arm} seed {seed} {side}: " + ", ".join(f"{k} {final[k]:.3f}" for k in ENDPOINTS), flush=True)
    apart = False
    for arm in arms:
        for endpoint in ENDPOINTS:
            line, off = distribution_line(arm, endpoint, *({s: finals[arm, side][s][endpoint] for s in seeds} for side in ("old", "new")))
            apart |= off
            print(line)
    return apart


if __name__ == "__main__":
    main()
