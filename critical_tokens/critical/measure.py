"""Critical tokens: find them and measure them (docs/method.md section 6; the paper's section 3.3, table 1,
appendix B and figures 4 and 7).

A critical token (a) decides the outcome: get it wrong and the answer is wrong, the model does not
recover; and (b) is a token on which the pre-trained model is much less certain than on the rest of
the output. For addition, `addition.critical_tokens` gives their offsets from the scratchpad
template; this module measures both criteria on a model:

- `teacher_forced`: certainty (eq. 1 and eq. 2) and probability of the right token along the
  correct completions (`teacher_forced_ids` does it for any prompts and completions of token ids);
- `certainty_gap`, `table_by_position`: the gap Δ of the paper's table 1 on critical vs other tokens;
- `first_error`, `where_failures_start`: where greedy failures start (criterion a), and how often
  the model recovers from a wrong critical token;
- `discover_critical_positions`, `discovery_scores`: the lowest-Δ positions, found from the
  certainties alone, against the template's critical tokens;
- `tracked_probabilities`: the policy's probability of the right token at the paper's six tracked
  critical tokens, logged during RL (figures 4 and 7).

Scratchpads shaded by certainty are drawn by `critical_pictures`; the `critical-tokens critical
RUN_DIR` command, all of the above on one model, is `critical_command`.

Position-level functions take plain arrays (one value per completion token) and lists of offsets,
nothing about the scratchpad format, so they apply to any task with one output per prompt.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
import torch

from .. import addition, kl
from ..addition import TRACKED_TOKENS, CriticalToken, tracked_token_key
from ..evaluate import bootstrap_ci, first_difference
from ..model import check_fits
from ..runs import UserError
from ..tokenizer import encode

DISCOVERY_KS = (1, 3, 5, 10)
BOOTSTRAP_RESAMPLES = 1000


# --- 1. Certainty along the correct completion (teacher forcing) -----------------------------------


@dataclass(frozen=True)
class TokenScores:
    """Per-token scores of a model along one completion of L tokens (one character each for addition)."""

    max_prob: np.ndarray  # (L,) certainty, the paper's eq. 2: 1 + log max_a p_T(a) / log|V|
    negentropy: np.ndarray  # (L,) certainty, the paper's eq. 1: 1 - H(p_T) / log|V|
    p_correct: np.ndarray  # (L,) probability of the right token at the policy temperature

    def certainty(self, method: str) -> np.ndarray:
        if method not in kl.CERTAINTY_METHODS:
            raise ValueError(f"unknown certainty method {method!r}; expected one of {kl.CERTAINTY_METHODS}")
        return getattr(self, method)


@torch.no_grad()
def teacher_forced_ids(
    model,
    prompts: Sequence[Sequence[int]],
    completions_ids: Sequence[Sequence[int]],
    *,
    pad_token_id: int,
    temperature: float = 1.0,
    certainty_temperature: float = 4.0,
    batch_size: int = 250,
) -> list[TokenScores]:
    """Feeds each prompt + its completion and scores every completion token (any task, token ids).

    For completion token y_t in state s_t = prompt + y_<t, with z the logits in s_t:
    certainty c(s_t) by both methods of `kl.certainty` at `certainty_temperature` (the paper: T = 4),
    and p_correct = softmax(z / temperature)[y_t].

    Rows are right-padded with explicit position ids 0..len-1: with a causal model a row's real tokens
    never see the padding after them, so a row's scores do not depend on the batch. Puts the model
    back in its previous train/eval mode.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if any(len(c) == 0 for c in completions_ids) or any(len(p) == 0 for p in prompts):
        raise ValueError("teacher forcing needs non-empty prompts and completions")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    scores: list[TokenScores] = []
    try:
        for start in range(0, len(prompts), batch_size):
            b_prompts = prompts[start : start + batch_size]
            b_completions = completions_ids[start : start + batch_size]
            b_scores = _teacher_forced_batch(
                model, b_prompts, b_completions, pad_token_id, temperature, certainty_temperature, device
            )
            scores += b_scores
    finally:
        model.train(was_training)
    return scores


def _teacher_forced_batch(model, prompts, completions_ids, pad_token_id, temperature, certainty_temperature, device):
    sequences = [list(p) + list(c) for p, c in zip(prompts, completions_ids)]
    B, width = len(sequences), max(map(len, sequences))
    check_fits(model, width)
    input_ids = torch.full((B, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((B, width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        input_ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention_mask[i, : len(seq)] = 1
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    position_ids = torch.arange(width, device=device)[None, :].expand(B, -1)  # (B, S)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits.float()  # (B, S, V)

    # Completion token t of row i sits at prompt_len_i + t and is predicted at prompt_len_i + t - 1.
    prompt_lengths = torch.tensor([len(p) for p in prompts], device=device)  # (B,)
    L = max(len(c) for c in completions_ids)
    predicting = (prompt_lengths[:, None] - 1 + torch.arange(L, device=device)[None, :]).clamp(max=width - 2)  # (B, L)
    completion_logits = logits.gather(1, predicting[..., None].expand(-1, -1, logits.shape[-1]))  # (B, L, V)
    targets = input_ids.gather(1, predicting + 1)  # (B, L)

    max_prob = kl.certainty(completion_logits, "max_prob", certainty_temperature)  # (B, L)
    negentropy = kl.certainty(completion_logits, "negentropy", certainty_temperature)  # (B, L)
    logp = torch.log_softmax(completion_logits / temperature, dim=-1)  # (B, L, V)
    p_correct = logp.gather(-1, targets[..., None])[..., 0].exp()  # (B, L)

    arrays = torch.stack([max_prob, negentropy, p_correct]).cpu().double().numpy()  # (3, B, L), one transfer
    return [TokenScores(*arrays[:, i, : len(c)]) for i, c in enumerate(completions_ids)]


def teacher_forced(
    model,
    tokenizer,
    pairs: Sequence[tuple[int, int]],
    *,
    temperature: float = 1.0,
    certainty_temperature: float = 4.0,
    batch_size: int = 250,
) -> list[TokenScores]:
    """`teacher_forced_ids` on the addition prompts and their correct completions: for each (a, b),
    arrays over the characters of `addition.completion(a, b)` (the same offsets as `CriticalToken`)."""
    prompts = [encode(tokenizer, addition.prompt(a, b)) for a, b in pairs]
    targets = [encode(tokenizer, addition.completion(a, b)) for a, b in pairs]
    return teacher_forced_ids(
        model, prompts, targets, pad_token_id=tokenizer.pad_token_id, temperature=temperature,
        certainty_temperature=certainty_temperature, batch_size=batch_size,
    )


def critical_tokens_of(pairs: Sequence[tuple[int, int]], n_digits: int) -> list[list[CriticalToken]]:
    """`addition.critical_tokens` of every pair; a `UserError` when none of them has any.

    Operands of at most N digits (the comfort zone) have no critical tokens: there is nothing to
    analyse on such prompts.
    """
    if not pairs:
        raise UserError("no prompts to analyse")
    rows = [addition.critical_tokens(a, b, n_digits) for a, b in pairs]
    if not any(rows):
        shown = ", ".join(f"{a}+{b}" for a, b in pairs[:3]) + (", ..." if len(pairs) > 3 else "")
        raise UserError(
            f"these prompts have no critical tokens ({shown}): operands of at most N = {n_digits} digits "
            "(the comfort zone) have none; use prompts with an operand of more than N digits"
        )
    return rows


# --- 2. Table 1: the certainty gap ------------------------------------------------------------------


def certainty_gap(certainty: np.ndarray) -> np.ndarray:
    """Δ_i = c_i - mean_{j != i} c_j over the L tokens of one output (the paper's section 3.3, table 1).

    With S = sum_j c_j: Δ_i = c_i - (S - c_i) / (L - 1). (L,) -> (L,). Within one output Δ is an
    increasing function of c, and mean_i Δ_i = 0.
    """
    c = np.asarray(certainty, dtype=np.float64)
    if c.ndim != 1 or len(c) < 2:
        raise ValueError(f"the gap needs a 1-D array of at least 2 certainties, got shape {c.shape}")
    return c - (c.sum() - c) / (len(c) - 1)


def mean_at(rows: Sequence[np.ndarray], positions: Sequence[Sequence[int]], reduce=np.mean) -> np.ndarray:
    """Per output, `reduce` of its values at the given positions; nan where it has none. -> (n_outputs,)"""
    return np.array([reduce(np.asarray(r)[list(p)]) if len(p) else np.nan for r, p in zip(rows, positions)])


def mean_ci(per_output: np.ndarray, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> dict:
    """Mean over outputs (nan left out) and its 95% percentile-bootstrap interval, resampling outputs."""
    values = np.asarray(per_output, dtype=np.float64)
    values = values[~np.isnan(values)]
    if len(values) == 0:
        return {"mean": None, "ci_low": None, "ci_high": None, "outputs": 0}
    low, high = bootstrap_ci(values, resamples, seed)
    return {"mean": float(values.mean()), "ci_low": low, "ci_high": high, "outputs": int(len(values))}


def table_by_position(
    values: Sequence[np.ndarray],
    critical: Sequence[Sequence[int]],
    groups: dict[str, Sequence[Sequence[int]]] | None = None,
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
) -> dict[str, dict]:
    """Per-token values (e.g. Δ) averaged within each output over critical and over non-critical
    positions, then over outputs with a 95% bootstrap interval (outputs are the resampled unit).

    values: per output an (L,) array. critical: per output its critical positions. groups: optional
    named subsets of the critical positions (per output), one row each. Rows: "critical",
    "non-critical", "non-critical (lowest)" (each output's minimum over its non-critical positions:
    are the critical tokens lower than everything else, or only than the average?), then the groups.
    Outputs without any critical position are left out of every row. -> {row: {mean, ci_low, ci_high, outputs}}
    """
    kept = [i for i, c in enumerate(critical) if len(c)]
    values = [np.asarray(values[i]) for i in kept]
    crit = [sorted(set(critical[i])) for i in kept]
    others = [sorted(set(range(len(v))) - set(c)) for v, c in zip(values, crit)]
    table = {
        "critical": mean_ci(mean_at(values, crit), resamples, seed),
        "non-critical": mean_ci(mean_at(values, others), resamples, seed),
        "non-critical (lowest)": mean_ci(mean_at(values, others, np.min), resamples, seed),
    }
    for name, positions in (groups or {}).items():
        table[name] = mean_ci(mean_at(values, [positions[i] for i in kept]), resamples, seed)
    return table


def _name_order(name: str) -> tuple[int, bool]:
    """n+1_comma, n+1_digit, n+2_comma, ..."""
    return int(name[2:].split("_")[0]), name.endswith("digit")


def addition_groups(tokens: Sequence[Sequence[CriticalToken]]) -> tuple[dict, dict]:
    """Critical offsets per output grouped by name ("n+1_comma", ...) and by (step, operand) ("step1/op2")."""
    names = sorted({t.name for row in tokens for t in row}, key=_name_order)
    places = sorted({(t.step, t.operand) for row in tokens for t in row})
    by_name = {n: [[t.offset for t in row if t.name == n] for row in tokens] for n in names}
    by_place = {f"step{s}/op{o}": [[t.offset for t in row if (t.step, t.operand) == (s, o)] for row in tokens] for s, o in places}
    return by_name, by_place


def certainty_table(scores: Sequence[TokenScores], tokens: Sequence[Sequence[CriticalToken]], seed: int = 0) -> dict:
    """Table 1 for addition: Δ by both certainty methods and p_correct, over critical / non-critical
    tokens, per critical-token name and per (step, operand). -> {"max_prob": table, "negentropy": ..., "p_correct": ...}"""
    critical = [[t.offset for t in row] for row in tokens]
    by_name, by_place = addition_groups(tokens)
    groups = {**by_name, **by_place}
    result = {}
    for method in kl.CERTAINTY_METHODS:
        gaps = [certainty_gap(s.certainty(method)) for s in scores]
        result[method] = table_by_position(gaps, critical, groups, seed=seed)
    result["p_correct"] = table_by_position([s.p_correct for s in scores], critical, groups, seed=seed)
    return result


# --- 3. Where failures start ------------------------------------------------------------------------


@dataclass(frozen=True)
class FirstError:
    """The first character where a generation departs from the correct completion of a + b."""

    a: int
    b: int
    offset: int  # index into addition.completion(a, b)
    expected: str  # "" when the generation runs on past the correct completion
    got: str  # "" when the generation ends there
    correct: bool  # the result line is right all the same
    critical: CriticalToken | None  # the critical token at `offset`, if there is one
    place: str  # where it is in the scratchpad: "step 2 line, operand 1 list", "result line", ...

    @property
    def category(self) -> str:
        return f"critical {self.critical.key}" if self.critical else f"not critical, {self.place}"


def scratchpad_place(expected: str, offset: int) -> str:
    """Where `offset` is in the correct completion: its line (a line's newline belongs to it) and, on
    a step line, whether it is in operand 1's list, operand 2's list, or the rest."""
    if offset >= len(expected):
        return "past the end"
    lines = expected.split("\n")  # "", "<scratch>", step lines..., "[] + [] ...", "</scratch>", result, ""
    n_steps = len(lines) - 6
    line = expected.count("\n", 0, offset)
    if line <= 1:
        return "<scratch> line"
    if line <= 1 + n_steps:  # which part of the step line: copying a list, or the arithmetic after
        text, column = lines[line], offset - (expected.rfind("\n", 0, offset) + 1)
        end1 = text.index("]")
        part = "operand 1 list" if column <= end1 else "operand 2 list" if column <= text.index("]", end1 + 1) else "rest"
        return f"step {line - 1} line, {part}"
    return {2 + n_steps: "final list line", 3 + n_steps: "</scratch> line"}.get(line, "result line")


def first_error(a: int, b: int, generated: str, n_digits: int) -> FirstError | None:
    """Where `generated` first departs from `addition.completion(a, b)`, classified as a critical
    token (which one) or not; None when it is the correct completion exactly."""
    expected = addition.completion(a, b)
    if generated == expected:
        return None
    offset = first_difference(expected, generated)
    critical = {t.offset: t for t in addition.critical_tokens(a, b, n_digits)}.get(offset)
    return FirstError(
        a, b, offset, expected[offset : offset + 1], generated[offset : offset + 1],
        addition.is_correct(a, b, generated), critical, scratchpad_place(expected, offset),
    )


def where_failures_start(pairs: Sequence[tuple[int, int]], generated: Sequence[str], n_digits: int) -> dict:
    """Criterion (a) of the definition, measured on generations (e.g. greedy) for `pairs`.

    failures: generations with a wrong result. For each, its first wrong character, counted by
    category (a critical token's key, or the scratchpad line of a non-critical one);
    at_critical_fraction = failures starting at a critical token / failures.
    recovery: among all generations whose first wrong character is at a critical token (the text
    before it correct), those whose result is right all the same: recovered / total.
    """
    errors = [first_error(a, b, g, n_digits) for (a, b), g in zip(pairs, generated)]
    failures = [e for e in errors if e is not None and not e.correct]
    at_critical = [e for e in failures if e.critical]
    wrong_critical = [e for e in errors if e is not None and e.critical]
    recovered = sum(e.correct for e in wrong_critical)
    return {
        "generations": len(generated),
        "correct": len(generated) - len(failures),
        "failures": len(failures),
        "counts": dict(Counter(e.category for e in failures).most_common()),
        "at_critical": len(at_critical),
        "at_critical_fraction": len(at_critical) / len(failures) if failures else None,
        "recovery": {"recovered": recovered, "total": len(wrong_critical),
                     "fraction": recovered / len(wrong_critical) if wrong_critical else None},
        "first_errors": [_error_record(e) for e in errors if e is not None],
    }


def _error_record(e: FirstError) -> dict:
    record = {k: v for k, v in asdict(e).items() if k != "critical"}
    return {**record, "category": e.category}


# --- 4. Discovery without the template --------------------------------------------------------------


def discover_critical_positions(certainty_rows: Sequence[np.ndarray], k: int) -> list[np.ndarray]:
    """Per output, the k positions with the lowest gap Δ (`certainty_gap`), lowest first (ties: the
    earlier position). Uses the certainties alone, nothing about the output's format. (L,) -> (min(k, L),)"""
    return [np.argsort(certainty_gap(c), kind="stable")[:k] for c in certainty_rows]


def discovery_scores(
    certainty_rows: Sequence[np.ndarray], critical: Sequence[Sequence[int]], ks: Sequence[int] = DISCOVERY_KS
) -> dict:
    """How well the k lowest-Δ positions D_k of each output recover its known critical positions C.

    precision@k = |D_k ∩ C| / |D_k|, recall@k = |D_k ∩ C| / |C|, averaged over the outputs with a
    non-empty C. chance_precision = mean |C| / L: the precision of k positions drawn at random.
    """
    kept = [i for i, c in enumerate(critical) if len(c)]
    if not kept:
        raise UserError("no output has a critical position: nothing to compare the discovered positions with")
    rows = {}
    for k in ks:
        found = discover_critical_positions([certainty_rows[i] for i in kept], k)
        hits = [len(set(f.tolist()) & set(critical[i])) for f, i in zip(found, kept)]
        rows[k] = {
            "precision": float(np.mean([h / len(f) for h, f in zip(hits, found)])),
            "recall": float(np.mean([h / len(set(critical[i])) for h, i in zip(hits, kept)])),
        }
    chance = float(np.mean([len(set(critical[i])) / len(certainty_rows[i]) for i in kept]))
    return {"outputs": len(kept), "chance_precision": chance, "at_k": rows}


# --- 5. Tracking during RL --------------------------------------------------------------------------


def probe_pairs(n_digits: int, count: int = 64, seed: int = 2024) -> list[tuple[int, int]]:
    """A fixed probe set of N+1-digit additions (the "plus1" task) for `tracked_probabilities`."""
    return addition.rl_pairs(n_digits, 1, count, seed)


def tracked_probabilities(model, tokenizer, pairs: Sequence[tuple[int, int]], n_digits: int, temperature: float) -> dict[str, float]:
    """The policy's probability of the right token at the critical tokens of the correct completions
    (the paper's figures 4 and 7), for the RL loop's evaluations.

    One batched teacher-forced forward pass of `model` (no gradients; its train/eval mode restored).
    Keys: "p_correct/" + tracked_token_key(step, operand, name) for each of `TRACKED_TOKENS` that
    some probe pair has (averaged over those pairs), and "p_correct/critical_mean" over all critical
    tokens of all pairs. The reference logs a critical token only when the text before it is right;
    teacher forcing the correct completion holds that by construction.
    """
    tokens = critical_tokens_of(pairs, n_digits)
    scores = teacher_forced(model, tokenizer, pairs, temperature=temperature, batch_size=len(pairs))
    by_key: dict[str, list[float]] = defaultdict(list)
    for row, s in zip(tokens, scores):
        for t in row:
            by_key[t.key].append(float(s.p_correct[t.offset]))
    result = {}
    for step, operand, name in TRACKED_TOKENS:
        key = tracked_token_key(step, operand, name)
        if by_key[key]:
            result["p_correct/" + key] = float(np.mean(by_key[key]))
    result["p_correct/critical_mean"] = float(np.mean([p for ps in by_key.values() for p in ps]))
    return result

