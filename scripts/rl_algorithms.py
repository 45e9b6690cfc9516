"""Can RL learn N+1 at all from the CPU model? A2C against RLOO and GRPO, with and without the KL penalty.

Every KL comparison of the `cpu` and `cpu-full` presets uses A2C, and there no arm ever ends above its
start; without a KL penalty A2C collapses. Before reading that as a verdict on the KL penalties, this
probe asks whether the RL itself can learn here: one seed (0) per configuration, 640 episodes from the
shipped `tiny-n3-d3`, every RL value the `cpu-full` preset's except the algorithm, the KL penalty and
the learning rate. It writes one row per run and the table to ``docs/rl-algorithms.md``.

    python scripts/rl_algorithms.py                      # run the missing configurations, then the table
    python scripts/rl_algorithms.py --only rloo-none-lr2e-5
    python scripts/rl_algorithms.py --render             # the table from the runs already there
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from critical_tokens.study.preset import load_preset
from critical_tokens.study.preset_fields import section_fields
from critical_tokens.rl.loop import train
from critical_tokens.rl.config import RLConfig
from critical_tokens.runs import atomic_write_text, read_json, read_metrics

ROOT = Path(__file__).resolve().parents[1]
TABLE = ROOT / "docs" / "rl-algorithms.md"
MODEL = "critical_tokens/checkpoints/tiny-n3-d3"  # relative: run the script from the repository root
CONCLUSION = ROOT / "docs" / "rl-algorithms-conclusion.md"  # written by hand from the table

# name -> (algorithm, kl, lr, detach_critic). 2e-4 is the cpu and cpu-full presets' A2C learning rate,
# 2e-5 the `rl` command's default. The a2c-detached rows test why A2C collapses: its value head reads
# the transformer's hidden states detached, so the value loss no longer moves the language model.
CONFIGS = {
    **{f"a2c-{kl}-lr{lr}": ("a2c", kl, float(lr), False) for lr in ("2e-4", "6e-5", "2e-5") for kl in ("none", "standard")},
    "rloo-none-lr2e-5": ("rloo", "none", 2e-5, False),
    "rloo-none-lr6e-5": ("rloo", "none", 6e-5, False),
    "rloo-standard-lr6e-5": ("rloo", "standard", 6e-5, False),
    "grpo-none-lr6e-5": ("grpo", "none", 6e-5, False),
    "a2c-detached-none-lr2e-5": ("a2c", "none", 2e-5, True),
}


def config_of(name: str, runs_dir: Path) -> RLConfig:
    algorithm, kl, lr, detach_critic = CONFIGS[name]
    preset, where = load_preset("cpu-full")
    fields = section_fields(preset, "rl", {"algorithm": algorithm, "kl": kl, "lr": lr, "group_size": 8, "detach_critic": detach_critic}, where)
    return RLConfig(**fields, pretrained=MODEL, out=str(runs_dir / name / "seed0"), seed=0)


def finished(run_dir: Path) -> bool:
    """Whether a run has evaluated its last episode (the `rl` command writes no end marker)."""
    if not (run_dir / "config.json").exists():
        return False
    episodes = read_json(run_dir / "config.json")["config"]["episodes"]
    return any(m.get("episodes") == episodes and "eval/accuracy_sampled" in m for m in read_metrics(run_dir))


def row(name: str, run_dir: Path) -> dict:
    """A run's evaluations: sampled and greedy N+1 accuracy and greedy in-distribution accuracy."""
    config = read_json(run_dir / "config.json")["config"]
    evaluations = [m for m in read_metrics(run_dir) if "eval/accuracy_sampled" in m]
    algorithm = config["algorithm"] + (" (detached critic)" if config.get("detach_critic") else "")
    return {"name": name, "algorithm": algorithm, "kl": config["kl"], "lr": config["lr"],
            "sampled": {m["episodes"]: m["eval/accuracy_sampled"] for m in evaluations},
            "final": evaluations[-1]}


def render(runs_dir: Path) -> str:
    pct = lambda x: f"{100 * x:.1f}%"  # noqa: E731
    done = {n: finished(runs_dir / n / "seed0") for n in CONFIGS}
    rows = [row(n, runs_dir / n / "seed0") for n in CONFIGS if done[n]]
    episodes = sorted({e for r in rows for e in r["sampled"]})
    lines = ["# Can RL learn N+1 from the CPU model? A2C, RLOO and GRPO", "",
             "Produced by `python scripts/rl_algorithms.py` (do not edit by hand: rerun `--render`). One seed (0) per "
             "row, 640 episodes from the shipped `tiny-n3-d3` on 4-digit additions (N+1), every other RL value the "
             "`cpu-full` preset's (collects of 32 episodes, minibatches of 8, policy temperature 1, alpha 5 with k2 where "
             "there is a KL penalty; RLOO and GRPO: 4 prompts x 8 episodes per collect). Accuracy on 32 episodes per "
             "evaluation (in distribution: 8), so a single cell is rough (one episode is 3.1 points); the table shows "
             "direction and size, not a significance.", "",
             "| run | algorithm | KL | lr | " + " | ".join(f"sampled N+1 @{e}" for e in episodes)
             + " | greedy N+1 @end | in distribution (greedy) @end |",
             "|---" * (6 + len(episodes)) + "|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['algorithm']} | {r['kl']} | {r['lr']:g} | "
                     + " | ".join(pct(r["sampled"][e]) if e in r["sampled"] else "-" for e in episodes)
                     + f" | {pct(r['final']['eval/accuracy_greedy'])} | {pct(r['final']['eval/comfort_accuracy_greedy'])} |")
    missing = [n for n in CONFIGS if not done[n]]
    if missing:
        lines += ["", "Not run yet: " + ", ".join(f"`{n}`" for n in missing) + "."]
    if CONCLUSION.exists():
        lines += ["", CONCLUSION.read_text().rstrip()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=list(CONFIGS), help="run only these configurations")
    parser.add_argument("--runs-dir", default="runs/rl-algorithms", help="where the runs go (default: runs/rl-algorithms)")
    parser.add_argument("--render", action="store_true", help="only rebuild the table from the finished runs")
    args = parser.parse_args()
    runs_dir = Path(args.runs_dir)
    if not args.render:
        for name in args.only or list(CONFIGS):
            config = config_of(name, runs_dir)
            if not finished(Path(config.out)):
                train(dataclasses.replace(config, resume=(Path(config.out) / "model").exists()))
    atomic_write_text(TABLE, render(runs_dir))
    print(TABLE.read_text())


if __name__ == "__main__":
    main()
