"""The CPU-regime search (issue "Make the paper's effect visible on a 2-core CPU").

For each candidate pre-training configuration: pre-train it with ``critical-tokens pretrain`` (or reuse
a finished run), then measure with the project's own commands

- in-distribution and N+1 / N+2 accuracy (``evaluate``, identical and varying digits),
- table 1's certainty gap and where failures start (``critical``, on N+1 additions),
- the success of *sampled* rollouts at temperatures 1, 1.5 and 2, in distribution and at N+1,

and write one JSON file per configuration under ``docs/regime/`` and the whole table, with the
verdict of each row against the target, to ``docs/cpu-regime.md``. Every configuration tried stays
in the table, including the ones that failed.

    python scripts/regime_search.py --list
    python scripts/regime_search.py --only tiny-n4            # pre-train (hours on 2 cores) and measure
    python scripts/regime_search.py --only tiny-n4 --run runs/pt-tiny-n4   # measure a finished run
    python scripts/regime_search.py --render                  # rebuild docs/cpu-regime.md from docs/regime/
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from critical_tokens import addition
from critical_tokens.critical.command import CriticalConfig, critical
from critical_tokens.evaluate import EvaluateConfig, accuracy_on, evaluate
from critical_tokens.pretrain import PretrainConfig, load_pretrained, pretrain
from critical_tokens.runs import read_json, read_metrics, write_json, atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
ROWS = ROOT / "docs" / "regime"
TABLE = ROOT / "docs" / "cpu-regime.md"
CONCLUSION = ROWS / "conclusion.md"  # written by hand from the table; rendered after it

# The target of the search ("the paper's regime"): a model the CPU can fine-tune that is right in
# distribution, partly right at N+1, uncertain at its critical tokens (certainty gap below the other
# tokens', the 95% intervals apart), with a good share of its N+1 failures starting at a critical
# token, and whose *sampled* rollouts at the RL temperature succeed often enough for RL to learn.
TARGET = {"in_distribution_min": 0.95, "n_plus_1_range": (0.15, 0.80), "failures_at_critical_min": 0.25,
          "sampled_n_plus_1_min": 0.05, "rl_temperature": 1.0}
SHIPPED_N3 = "critical_tokens/checkpoints/tiny-n3"  # relative: run the script from the repository root


def dose_continuation(fraction: float, lr: float, seed: int = 5) -> dict:
    """The shipped tiny-n3 continued for one epoch of fresh 1..3-digit additions with ``fraction`` of 4-digit
    additions (the RL task's) mixed in: the dose lever of issue 10, a deviation from the paper."""
    return dict(preset="tiny", n_digits=3, examples_per_length=10_000, epochs=1, lr=lr, warmup_fraction=0.02, seed=seed,
                init_from=SHIPPED_N3, random_position_offset=True, n_plus_one_fraction=fraction)


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
    # The dose lever (issue 10; a deviation from the paper): continue the shipped tiny-n3 for one epoch
    # of fresh 1..3-digit data with a fraction of 4-digit additions (the RL task's) mixed in. Dose 0 is
    # the control: the same continued pre-training without any N+1 example.
    **{f"tiny-n3-dose{round(100 * f)}": dose_continuation(f, lr=1e-3) for f in (0.0, 0.01, 0.02, 0.03, 0.05)},
    # The same continuation at a third of the learning rate: does a gentler continuation keep the failure
    # structure of tiny-n3 (38.5% of its N+1 failures start at a critical token; 24% after the dose-0
    # continuation at lr 1e-3) while the dose still brings partial N+1 competence? (the criterion on where
    # failures start)
    **{f"tiny-n3-dose{100 * f:g}-lr3e-4": dose_continuation(f, lr=3e-4) for f in (0.0, 0.005, 0.01, 0.02, 0.03, 0.05)},
    # The model instances of the pre-registered cpu-confirm study: the regime recipe (1% dose at lr 3e-4)
    # at three continuation seeds never used before it (made by `reproduce --preset cpu-confirm`).
    **{f"tiny-n3-dose1-lr3e-4-s{seed}": dose_continuation(0.01, lr=3e-4, seed=seed) for seed in (21, 22, 23)},
    "tiny-n4-offset": dict(preset="tiny", n_digits=4, examples_per_length=10_000, epochs=2, lr=2e-3, random_position_offset=True),
    "tiny-n5": dict(preset="tiny", n_digits=5, examples_per_length=20_000, epochs=1, lr=2e-3),
    "small-n4": dict(preset="small", n_digits=4, examples_per_length=10_000, epochs=2, lr=1e-3),
    "small-n5-offset": dict(preset="small", n_digits=5, examples_per_length=20_000, epochs=2, lr=1e-3, random_position_offset=True),
    "medium-n7": dict(preset="medium", n_digits=7, examples_per_length=20_000, epochs=2, lr=1e-3),
}
TEMPERATURES = (1.0, 1.5, 2.0)


def sampled_success(model, tokenizer, n_digits: int, examples: int, seed: int, temperatures=TEMPERATURES) -> dict:
    """Fraction of sampled rollouts that are right, at each temperature, in distribution and at N+1."""
    sets = {"in_distribution": addition.rl_pairs(n_digits - 1, 1, examples, seed) if n_digits > 1 else addition.eval_pairs(1, "identical", examples, seed),
            "n_plus_1": addition.rl_pairs(n_digits, 1, examples, seed + 1)}
    out = {}
    for temperature in temperatures:
        for name, pairs in sets.items():
            generator = torch.Generator().manual_seed(seed)
            out[f"{name}@T={temperature:g}"] = accuracy_on(model, tokenizer, pairs, temperature=temperature, generator=generator).mean().item()
    return out


def measure(name: str, run_dir: Path, examples: int, eval_seed: int | None = None) -> dict:
    """The row of one configuration. ``eval_seed`` (a check on fresh data): other evaluation, analysis
    and sampling seeds than the search's, ``examples`` sampled rollouts per cell, and only what the
    target needs (N and N+1 digits, sampling at the RL temperature), to keep 1,000 examples affordable."""
    config = read_json(run_dir / "config.json")
    pre = config["config"]
    steps = read_metrics(run_dir)
    fresh = {} if eval_seed is None else {"seed": eval_seed}
    evaluation = evaluate(EvaluateConfig(run=str(run_dir), examples=examples, extra_digits=2 if eval_seed is None else 1, **fresh))
    report = critical(CriticalConfig(run=str(run_dir), examples=examples, show=0, **fresh))
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
        "gap_critical_ci": [t1["critical"]["ci_low"], t1["critical"]["ci_high"]],
        "gap_non_critical_ci": [t1["non-critical"]["ci_low"], t1["non-critical"]["ci_high"]],
        "n_plus_one_fraction": pre.get("n_plus_one_fraction", 0.0), "init_from": pre.get("init_from"),
        "failures_at_critical": failures["at_critical_fraction"], "n_plus_1_greedy": failures["correct"] / max(1, failures["generations"]),
        "sampled": sampled_success(model, tokenizer, n, min(examples, 100), seed=99) if eval_seed is None else
                   sampled_success(model, tokenizer, n, examples, seed=eval_seed, temperatures=(TARGET["rl_temperature"],)),
        "examples": examples, "eval_seed": eval_seed,
    }


def verdict(row: dict) -> str:
    in_dist = min(row["accuracy"].get("identical@+0", 0), row["accuracy"].get("varying@+0", 0))
    n1 = max(row["accuracy"].get("identical@+1", 0), row["accuracy"].get("varying@+1", 0))
    low, high = TARGET["n_plus_1_range"]
    gap_high = row.get("gap_critical_ci", [None, None])[1]
    other_low = row.get("gap_non_critical_ci", [None, None])[0]
    sampled = row["sampled"].get(f"n_plus_1@T={TARGET['rl_temperature']:g}", 0)
    checks = {
        f"in-distribution >= {TARGET['in_distribution_min']:.0%}": in_dist >= TARGET["in_distribution_min"],
        f"greedy N+1 in {low:.0%}..{high:.0%}": low <= n1 <= high,
        "critical tokens less certain (intervals apart)": gap_high is not None and other_low is not None and gap_high < other_low,
        f">= {TARGET['failures_at_critical_min']:.0%} of N+1 failures at a critical token": (row["failures_at_critical"] or 0) >= TARGET["failures_at_critical_min"],
        f"sampled N+1 at T = {TARGET['rl_temperature']:g} >= {TARGET['sampled_n_plus_1_min']:.0%}": sampled >= TARGET["sampled_n_plus_1_min"],
    }
    failed = [k for k, ok in checks.items() if not ok]
    return "meets the target" if not failed else "misses: " + "; ".join(failed)


def render() -> str:
    rows = [json.loads(p.read_text()) for p in sorted(ROWS.glob("*.json"))]
    pct = lambda x: "-" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    lines = [
        "# The CPU regime search",
        "",
        "Produced by `python scripts/regime_search.py` (do not edit by hand: rerun `--render`).",
        f"Target (\"the paper's regime\"): in-distribution accuracy >= {TARGET['in_distribution_min']:.0%} (identical and varying), greedy N+1 "
        f"accuracy in {TARGET['n_plus_1_range'][0]:.0%}..{TARGET['n_plus_1_range'][1]:.0%} (identical or varying), the critical tokens less "
        "certain than the other tokens (Δ, max-prob certainty at T = 4, 95% intervals apart), "
        f">= {TARGET['failures_at_critical_min']:.0%} of greedy N+1 failures starting at a critical token, and sampled N+1 success "
        f">= {TARGET['sampled_n_plus_1_min']:.0%} at the RL temperature T = {TARGET['rl_temperature']:g}. Rows measured before this target "
        "was set lack the intervals of Δ and miss its third criterion for that reason alone. N+1 dose: the fraction of "
        "(N+1)-digit additions in the (continued) pre-training data, a deviation from the paper (0: none).",
        "",
        "| config | preset | params | N | data/len x epochs | offsets | N+1 dose | pre-train time | final loss | ident. N | vary. N | ident. N+1 | vary. N+1 | N+1 (RL task) | N+2 vary. | Δ critical | Δ other | failures at critical | verdict |",
        "|---" * 19 + "|",
    ]
    for r in rows:
        a = r["accuracy"]
        minutes = "-" if r.get("pretrain_minutes") is None else f"{r['pretrain_minutes']:.0f} min"
        lines.append(
            f"| {r['name']} | {r['preset']} | {r['params'] / 1e6:.2f}M | {r['n_digits']} | {r['examples_per_length']:,} x {r['epochs']:g} | "
            f"{'yes' if r['random_position_offset'] else 'no'} | {pct(r.get('n_plus_one_fraction', 0.0))} | {minutes} | {r['final_loss']:.2g} | {pct(a.get('identical@+0'))} | {pct(a.get('varying@+0'))} | "
            f"{pct(a.get('identical@+1'))} | {pct(a.get('varying@+1'))} | {pct(r['n_plus_1_greedy'])} | {pct(a.get('varying@+2'))} | "
            f"{r['gap_critical']:+.3f} | {r['gap_non_critical']:+.4f} | {pct(r['failures_at_critical'])} | {verdict(r)} |")
    lines += ["", "## Sampled rollouts: success at each temperature", "",
              "| config | " + " | ".join(f"in-dist. T={t:g} | N+1 T={t:g}" for t in TEMPERATURES) + " |",
              "|---" * (1 + 2 * len(TEMPERATURES)) + "|"]
    for r in rows:
        s = r["sampled"]
        lines.append(f"| {r['name']} | " + " | ".join(f"{pct(s.get(f'in_distribution@T={t:g}'))} | {pct(s.get(f'n_plus_1@T={t:g}'))}" for t in TEMPERATURES) + " |")
    untried = [n for n in CANDIDATES if not (ROWS / f"{n}.json").exists()]
    lines.insert(4, "Rows named `<config>@seed<k>` check a configuration on fresh evaluation data (other seeds, "
                 "the examples of that row per cell, sampled rollouts included).")
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
    parser.add_argument("--eval-seed", type=int, help="with one --only and --run: check the row on fresh evaluation data (this seed, "
                        "--examples sampled rollouts per cell); written as a separate row '<name>@seed<k>'")
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
            row_name = name if args.eval_seed is None else f"{name}@seed{args.eval_seed}"
            write_json(ROWS / f"{row_name}.json", {**measure(name, run_dir, args.examples, args.eval_seed), "name": row_name})
    atomic_write_text(TABLE, render())
    print(TABLE.read_text())


if __name__ == "__main__":
    main()
