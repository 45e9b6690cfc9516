"""Length generalisation of a pre-trained model: the paper's tables 4 and 5 (Appendix A).

Accuracy of greedy decoding on "identical" (both operands n digits) and "varying" (one operand n
digits, the other fewer) additions for n = N..N+3, 1,000 examples per cell by default, with 95%
confidence intervals by bootstrap resampling.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from . import addition
from .config import arg, check_fields, check_range
from .generation import addition_stop_rule, generate
from .model import check_fits, load_pretrained, pick_device
from .runs import UserError, atomic_write_text, output_dir, write_json
from .tokenizer import encode

KINDS = ("identical", "varying")


@dataclass(frozen=True)
class EvaluateConfig:
    run: str = arg(None, "pre-training run directory (or any directory holding a critical-tokens model)", positional=True, metavar="RUN_DIR")
    out: str | None = arg(None, "directory for table.json and table.md (default: RUN_DIR/eval; for a checkpoint shipped in the package, ./eval-<name>)")
    examples: int = arg(1000, "examples per cell (the paper: 1,000)")
    extra_digits: int = arg(3, "evaluate n = N..N+extra_digits")
    batch_size: int = arg(250, "prompts generated in parallel")
    n_digits: int | None = arg(None, "N, the digits the model was pre-trained on (default: the N the model records)")
    show_failures: int = arg(0, "print this many failed scratchpads (first wrong character marked)")
    seed: int = arg(1234, "seed of the evaluation sets")
    bootstrap: int = arg(1000, "bootstrap resamples for the confidence intervals")


def _limit(model, pairs, prompt_len: int) -> int:
    """The most new tokens for ``pairs``: docs/method.md section 4, up to 100 characters past the longest
    completion, as far as the context allows."""
    longest = addition.max_completion_length(max(max(len(str(a)), len(str(b))) for a, b in pairs))
    check_fits(model, prompt_len + longest)
    return min(longest + 100, model.config.n_positions - prompt_len)


def completions(model, tokenizer, pairs, *, batch_size: int = 250, temperature: float = 0.0, generator=None, desc=None) -> list[str]:
    """Generated completions (greedy by default) for (a, b) pairs, in batches."""
    if not pairs:
        return []
    stop = addition_stop_rule(tokenizer)
    texts: list[str] = []
    batches = range(0, len(pairs), batch_size)
    for start in tqdm(batches, desc=desc, leave=False, disable=desc is None):
        chunk = pairs[start : start + batch_size]
        prompts = [encode(tokenizer, addition.prompt(a, b)) for a, b in chunk]
        max_new = _limit(model, pairs, max(map(len, prompts)))
        out = generate(model, prompts, max_new_tokens=max_new, temperature=temperature, generator=generator, **stop)
        texts += out.completions(tokenizer)
    return texts


def completions_together(model, tokenizer, sets, *, generator=None, batch_size: int = 250) -> list[list[str]]:
    """The completions of several sets of pairs, each ``(pairs, temperature)``, as `completions` would
    give them set by set (at most one sampled set, drawing from ``generator``), but in one call of
    `generate` when they fit in ``batch_size`` rows: a decoding step costs little more for 72 rows
    than for 32, so the small evaluations of an RL run take one pass instead of three. Each row keeps
    its own set's temperature and completion limit, and the sampled rows their noise
    (`generation.generate`), so each set gets its own call's tokens. Sets beyond ``batch_size`` rows
    in all go set by set."""
    if sum(t > 0 for _, t in sets) > 1:
        raise ValueError("completions_together draws noise for one sampled set; several would interleave")
    if sum(len(pairs) for pairs, _ in sets) > batch_size:
        return [completions(model, tokenizer, pairs, batch_size=batch_size, temperature=t, generator=generator) for pairs, t in sets]
    prompts, temperatures, limits = [], [], []
    for pairs, t in sets:
        rows = [encode(tokenizer, addition.prompt(a, b)) for a, b in pairs]
        limit = _limit(model, pairs, max(map(len, rows))) if pairs else 0
        prompts += rows
        temperatures += [t] * len(rows)
        limits += [limit] * len(rows)
    if not prompts:
        return [[] for _ in sets]
    texts = generate(model, prompts, max_new_tokens=limits, temperature=temperatures, generator=generator,
                     **addition_stop_rule(tokenizer)).completions(tokenizer)
    starts = [0]
    for pairs, _ in sets:
        starts.append(starts[-1] + len(pairs))
    return [texts[a:b] for a, b in zip(starts, starts[1:])]


def accuracy_on(model, tokenizer, pairs, **kwargs) -> torch.Tensor:
    """(len(pairs),) float 0/1: whether each generated result is right."""
    return right_answers(pairs, completions(model, tokenizer, pairs, **kwargs))


def right_answers(pairs, texts: list[str]) -> torch.Tensor:
    """(len(pairs),) float 0/1: whether each completion in ``texts`` has the right result."""
    return torch.tensor([addition.is_correct(a, b, t) for (a, b), t in zip(pairs, texts)], dtype=torch.float)


def bootstrap_ci(correct: np.ndarray, resamples: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the mean of a 0/1 array."""
    rng = np.random.default_rng(seed)
    means = rng.choice(correct, size=(resamples, len(correct)), replace=True).mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def first_difference(expected: str, got: str) -> int:
    for i, (x, y) in enumerate(zip(expected, got)):
        if x != y:
            return i
    return min(len(expected), len(got))


def mark_failure(a: int, b: int, got: str) -> dict:
    """A failed generation: the prompt and scratchpad with its first wrong character in ``⟦ ⟧``."""
    expected = addition.completion(a, b)
    i = first_difference(expected, got)
    marked = f"{addition.prompt(a, b)}{got[:i]}⟦{got[i:i + 1] or '∅'}⟧{got[i + 1:]}"
    return {"a": a, "b": b, "first_wrong": i, "expected": expected[i : i + 1], "marked": marked}


def evaluate_model(model, tokenizer, n_digits: int, config: EvaluateConfig) -> dict:
    """{"cells": [{kind, n, accuracy, ci_low, ci_high, examples}], "failures": [...]}"""
    model.eval()
    cells, failures = [], []
    for kind in KINDS:
        for n in range(n_digits, n_digits + config.extra_digits + 1):
            if kind == "varying" and n < 2:
                continue
            pairs = addition.eval_pairs(n, kind, config.examples, seed=config.seed + 97 * n + (kind == "varying"))
            texts = completions(model, tokenizer, pairs, batch_size=config.batch_size, desc=f"{kind} {n} digits")
            correct = np.array([addition.is_correct(a, b, t) for (a, b), t in zip(pairs, texts)], dtype=float)
            low, high = bootstrap_ci(correct, config.bootstrap, seed=config.seed + n)
            cells.append({"kind": kind, "n": n, "accuracy": float(correct.mean()), "ci_low": low, "ci_high": high, "examples": len(pairs)})
            failures += [mark_failure(a, b, t) for (a, b), t, ok in zip(pairs, texts, correct) if not ok]
    return {"n_digits": n_digits, "cells": cells, "failures": failures[: config.show_failures]}


def table_markdown(result: dict) -> str:
    """The layout of the paper's tables 4 (identical) and 5 (varying): one row per model, one column
    per digit count, accuracy ± half-width of the 95% interval, in percent."""
    n0 = result["n_digits"]
    lines = []
    for kind, number in (("identical", 4), ("varying", 5)):
        cells = [c for c in result["cells"] if c["kind"] == kind]
        header = " | ".join(f"{'N' if c['n'] == n0 else 'N+' + str(c['n'] - n0)} ({c['n']})" for c in cells)
        lines += [f"**{kind.capitalize()} digits** (paper's table {number})", "", f"| N | {header} |",
                  "|---" * (len(cells) + 1) + "|"]
        values = " | ".join(f"{100 * c['accuracy']:.1f}% ± {100 * (c['ci_high'] - c['ci_low']) / 2:.1f}%" for c in cells)
        lines += [f"| {n0} | {values} |", ""]
    return "\n".join(lines)


def validate(config: EvaluateConfig) -> None:
    if config.run is None:
        raise UserError("give the run directory to evaluate: critical-tokens evaluate RUN_DIR")
    check_fields(config)
    check_range(config, ("examples", "batch_size", "bootstrap"), 0, low_open=True)
    check_range(config, ("extra_digits",), 0, addition.MAX_DIGITS)
    check_range(config, ("show_failures",), 0)


def evaluate(config: EvaluateConfig) -> dict:
    validate(config)
    out = output_dir(config.out, config.run, "eval")
    model, tokenizer, n_digits = load_pretrained(config.run, config.n_digits)
    model.to(pick_device("auto"))
    result = evaluate_model(model, tokenizer, n_digits, config)
    markdown = table_markdown(result)
    write_json(out / "table.json", result)
    atomic_write_text(out / "table.md", markdown + "\n")
    print(markdown)
    for f in result["failures"]:
        print(f"\n--- {f['a']}+{f['b']}: first wrong character in ⟦ ⟧ at {f['first_wrong']}, expected {f['expected']!r} ---\n{f['marked']}")
    print(f"\nwrote {out / 'table.json'} and {out / 'table.md'}")
    return result
