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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", required=True, help="the commit to compare with")
    parser.add_argument("--arms", nargs="+", default=["cpu-confirm:prioritized", "cpu-methods:archer"], help="PRESET:ARM of each run")
    parser.add_argument("--seed", type=int, default=7705, help="the RL seed of every run")
    parser.add_argument("--episodes", type=int, default=160, help="episodes of every run (the preset's final evaluation at the end)")
    parser.add_argument("--rtol", type=float, default=0.0, help="relative tolerance on floats (default 0: bit for bit); "
                        "counts, tokens' outcomes and other non-floats must always be identical")
    parser.add_argument("--atol", type=float, default=0.0, help="absolute tolerance on floats, added to --rtol's (for a loss, "
                        "a sum of terms that nearly cancel)")
    args = parser.parse_args()
    if args.episodes <= 0 or min(args.rtol, args.atol) < 0 or any(":" not in arm for arm in args.arms):
        parser.error("--episodes must be positive, --rtol and --atol not negative and each arm PRESET:ARM")
    differ = False
    with commit_tree(ROOT, args.baseline) as old_tree, tempfile.TemporaryDirectory() as scratch:
        for k, arm in enumerate(args.arms):
            old = run(old_tree, Path(scratch) / f"old{k}", arm, args.seed, args.episodes)
            new = run(ROOT, Path(scratch) / f"new{k}", arm, args.seed, args.episodes)
            line, beyond = verdict(differences(old, new), args.rtol, args.atol)
            differ |= beyond
            print(f"{arm} (seed {args.seed}, {args.episodes} episodes, {len(old[0])} metrics lines): {line}")
    sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
