"""The CPU-regime search (issue "Make the paper's effect visible on a 2-core CPU").

For each candidate pre-training configuration: pre-train it with ``critical-tokens pretrain`` (or reuse
a finished run), then measure with the project's own commands

- in-distribution and N+1 / N+2 accuracy (``evaluate``, identical and varying digits),
- table 1's certainty gap and where failures start (``critical``, on N+1 additions),
- the success of *sampled* rollouts at temperatures 1, 1.5 and 2, in distribution and at N+1,

and write one JSON file per configuration under ``docs/regime/`` and the whole table, with the
verdict of each row against the target, to ``docs/cpu-regime.md``. Every configuration tried stays
in the table, including the ones that failed.

    python experiments/regime_search.py --list
    python experiments/regime_search.py --only tiny-n4            # pre-train (hours on 2 cores) and measure
    python experiments/regime_search.py --only tiny-n4 --run runs/pt-tiny-n4   # measure a finished run
    python experiments/regime_search.py --render                  # rebuild docs/cpu-regime.md from docs/regime/
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from critical_tokens import addition
from critical_tokens.critical import CriticalConfig, critical
from critical_tokens.evaluate import EvaluateConfig, accuracy_on, evaluate
from critical_tokens.pretrain import PretrainConfig, load_pretrained, pretrain
from critical_tokens.runs import read_json, read_metrics, write_json, atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
ROWS = ROOT / "docs" / "regime"
TABLE = ROOT / "docs" / "cpu-regime.md"
CONCLUSION = ROWS / "conclusion.md"  # written by hand from the table; rendered after it

# The target of the search: a model the CPU can fine-tune whose N+1 accuracy is partial and whose
# failures start at low-certainty critical tokens.
TARGET = {"in_distribution_min": 0.90, "n_plus_1_range": (0.10, 0.70), "failures_at_critical_min": 0.5, "gap_max": -0.05}

# Candidate configurations, cheapest first. Each is a set of PretrainConfig overrides.
CANDIDATES: dict[str, dict] = {
    "tiny-n4": dict(preset="tiny", n_digits=4, examples_per_length=10_000, epochs=2, lr=2e-3),
    "tiny-n3": dict(preset="tiny", n_digits=3, examples_per_length=10_000, epochs=3, lr=1e-3),
    # Continued pre-training of tiny-n3 on fresh data (the shipped `tiny-n3`): stage 1 ended with the
    # schedule while the digits were still being learned.
    "tiny-n3-continued": dict(preset="tiny", n_digits=3, examples_per_length=10_000, epochs=3, lr=1e-3, warmup_fraction=0.02,
                              seed=1, init_from="runs/regime/tiny-n3"),
    # A third stage on twice the data for four epochs (the shipped `tiny-n3` since stage 3), and the same
    # stage with random position offsets, to compare with and without them at the same budget.
    "tiny-n3-stage3": dict(preset="tiny", n_digits=3, examples_per_length=20_000, epochs=4, lr=1e-3, warmup_fraction=0.02,
                           seed=3, init_from="runs/regime/tiny-n3-continued"),
    "tiny-n3-stage3-offset": dict(preset="tiny", n_digits=3, examples_per_length=20_000, epochs=4, lr=1e-3, warmup_fraction=0.02,
                                  seed=3, init_from="runs/regime/tiny-n3-continued", random_position_offset=True),
    "tiny-n4-offset": dict(preset="tiny", n_digits=4, examples_per_length=10_000, epochs=2, lr=2e-3, random_position_offset=True),
    "tiny-n5": dict(preset="tiny", n_digits=5, examples_per_length=20_000, epochs=1, lr=2e-3),
    "small-n4": dict(preset="small", n_digits=4, examples_per_length=10_000, epochs=2, lr=1e-3),
    "small-n5-offset": dict(preset="small", n_digits=5, examples_per_length=20_000, epochs=2, lr=1e-3, random_position_offset=True),
    "medium-n7": dict(preset="medium", n_digits=7, examples_per_length=20_000, epochs=2, lr=1e-3),
}
TEMPERATURES = (1.0, 1.5, 2.0)


def sampled_success(model, tokenizer, n_digits: int, examples: int, seed: int) -> dict:
    """Fraction of sampled rollouts that are right, at each temperature, in distribution and at N+1."""
    sets = {"in_distribution": addition.rl_pairs(n_digits - 1, 1, examples, seed) if n_digits > 1 else addition.eval_pairs(1, "identical", examples, seed),
            "n_plus_1": addition.rl_pairs(n_digits, 1, examples, seed + 1)}
    out = {}
    for temperature in TEMPERATURES:
        for name, pairs in sets.items():
            generator = torch.Generator().manual_seed(seed)
            out[f"{name}@T={temperature:g}"] = accuracy_on(model, tokenizer, pairs, temperature=temperature, generator=generator).mean().item()
    return out


def measure(name: str, run_dir: Path, examples: int) -> dict:
    config = read_json(run_dir / "config.json")
    pre = config["config"]
    steps = read_metrics(run_dir)
    evaluation = evaluate(EvaluateConfig(run=str(run_dir), examples=examples, extra_digits=2))
    report = critical(CriticalConfig(run=str(run_dir), examples=examples, show=0))
    model, tokenizer, n = load_pretrained(run_dir)
    model.eval()
    cells = {f"{c['kind']}@{c['n'] - n:+d}": c["accuracy"] for c in evaluation["cells"]}
    t1 = report["table1"]["max_prob"]
    failures = report["failures"]
    return {
        "name": name, "run": str(run_dir), "preset": pre["preset"], "n_digits": n, "params": config.get("n_params"),
        "examples_per_length": pre["examples_per_length"], "epochs": pre["epochs"], "steps": config.get("total_steps"),
        "random_position_offset": pre.get("random_position_offset", False), "init": pre.get("init", "scratch"),
        "final_loss": steps[-1]["loss"] if steps else None, "accuracy": cells,
        "pretrain_minutes": steps[-1]["elapsed_s"] / 60 if steps and "elapsed_s" in steps[-1] else None,
        "gap_critical": t1["critical"]["mean"], "gap_non_critical": t1["non-critical"]["mean"],
        "failures_at_critical": failures["at_critical_fraction"], "n_plus_1_greedy": failures["correct"] / max(1, failures["generations"]),
        "sampled": sampled_success(model, tokenizer, n, min(examples, 100), seed=99), "examples": examples,
    }


def verdict(row: dict) -> str:
    in_dist = min(row["accuracy"].get("identical@+0", 0), row["accuracy"].get("varying@+0", 0))
    n1 = row["n_plus_1_greedy"]
    checks = {
        f"in-distribution >= {TARGET['in_distribution_min']:.0%}": in_dist >= TARGET["in_distribution_min"],
        "partial N+1": TARGET["n_plus_1_range"][0] <= n1 <= TARGET["n_plus_1_range"][1],
        "failures start at critical tokens": (row["failures_at_critical"] or 0) >= TARGET["failures_at_critical_min"],
        "uncertain at critical tokens": row["gap_critical"] is not None and row["gap_critical"] <= TARGET["gap_max"],
    }
    failed = [k for k, ok in checks.items() if not ok]
    return "meets the target" if not failed else "misses: " + "; ".join(failed)


def render() -> str:
    rows = [json.loads(p.read_text()) for p in sorted(ROWS.glob("*.json"))]
    pct = lambda x: "-" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    lines = [
        "# The CPU regime search",
        "",
        "Produced by `python experiments/regime_search.py` (do not edit by hand: rerun `--render`).",
        f"Target: in-distribution accuracy >= {TARGET['in_distribution_min']:.0%}, greedy N+1 accuracy in "
        f"{TARGET['n_plus_1_range'][0]:.0%}..{TARGET['n_plus_1_range'][1]:.0%}, >= {TARGET['failures_at_critical_min']:.0%} of N+1 "
        f"failures starting at a critical token, certainty gap on critical tokens <= {TARGET['gap_max']} (max-prob, T = 4).",
        "",
        "| config | preset | params | N | data/len x epochs | offsets | pre-train time | final loss | ident. N | vary. N | ident. N+1 | vary. N+1 | N+1 (RL task) | N+2 vary. | Δ critical | Δ other | failures at critical | verdict |",
        "|---" * 18 + "|",
    ]
    for r in rows:
        a = r["accuracy"]
        minutes = "-" if r.get("pretrain_minutes") is None else f"{r['pretrain_minutes']:.0f} min"
        lines.append(
            f"| {r['name']} | {r['preset']} | {r['params'] / 1e6:.2f}M | {r['n_digits']} | {r['examples_per_length']:,} x {r['epochs']:g} | "
            f"{'yes' if r['random_position_offset'] else 'no'} | {minutes} | {r['final_loss']:.2g} | {pct(a.get('identical@+0'))} | {pct(a.get('varying@+0'))} | "
            f"{pct(a.get('identical@+1'))} | {pct(a.get('varying@+1'))} | {pct(r['n_plus_1_greedy'])} | {pct(a.get('varying@+2'))} | "
            f"{r['gap_critical']:+.3f} | {r['gap_non_critical']:+.4f} | {pct(r['failures_at_critical'])} | {verdict(r)} |")
    lines += ["", "## Sampled rollouts: success at each temperature", "",
              "| config | " + " | ".join(f"in-dist. T={t:g} | N+1 T={t:g}" for t in TEMPERATURES) + " |",
              "|---" * (1 + 2 * len(TEMPERATURES)) + "|"]
    for r in rows:
        s = r["sampled"]
        lines.append(f"| {r['name']} | " + " | ".join(f"{pct(s[f'in_distribution@T={t:g}'])} | {pct(s[f'n_plus_1@T={t:g}'])}" for t in TEMPERATURES) + " |")
    untried = [n for n in CANDIDATES if not (ROWS / f"{n}.json").exists()]
    if untried:
        lines += ["", "Not run yet (each needs its pre-training; see the script's CANDIDATES): " + ", ".join(f"`{n}`" for n in untried) + "."]
    if CONCLUSION.exists():
        lines += ["", CONCLUSION.read_text().rstrip()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", default=[], help="candidate(s) to run (default: all)")
    parser.add_argument("--run", help="with one --only: measure this finished pre-training run instead of pre-training")
    parser.add_argument("--runs-dir", default="runs/regime", help="where pre-training runs go")
    parser.add_argument("--examples", type=int, default=200, help="examples per evaluation cell and per analysis")
    parser.add_argument("--list", action="store_true", help="list the candidates and exit")
    parser.add_argument("--render", action="store_true", help="only rebuild docs/cpu-regime.md from docs/regime/*.json")
    args = parser.parse_args()
    if args.list:
        for name, overrides in CANDIDATES.items():
            print(f"{name}: {overrides}")
        return
    if not args.render:
        for name in args.only or list(CANDIDATES):
            if name not in CANDIDATES:
                parser.error(f"unknown candidate {name!r}; --list shows them")
            run_dir = Path(args.run) if args.run else Path(args.runs_dir) / name
            if not args.run:
                resume = (run_dir / "model" / "trainer_state.pt").exists()
                pretrain(dataclasses.replace(PretrainConfig(), out=str(run_dir), resume=resume, **CANDIDATES[name]))
            write_json(ROWS / f"{name}.json", measure(name, run_dir, args.examples))
    atomic_write_text(TABLE, render())
    print(TABLE.read_text())


if __name__ == "__main__":
    main()
