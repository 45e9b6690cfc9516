"""Continuous endpoints of an RL run's final evaluation: how far the policy moved from the reference.

Accuracy in distribution sits at its ceiling after a short RL run, so it cannot tell how much an arm
kept of the pre-trained model's behaviour there. These measures can move:

- ``comfort_kl``: the mean per-token KL(policy || reference) on held-out in-distribution prompts,
  over the policy's own greedy completions, each token's KL exact over the vocabulary at the RL
  temperature: KL_t = sum_v pi(v | s_t) (log pi(v | s_t) - log pi_ref(v | s_t)); 0 = the reference's
  behaviour there, larger = further away; ``comfort_kl_log10``, its base-10 logarithm (floored at
  ``KL_FLOOR``): across runs it spans orders of magnitude, and a log scale is where the spread of
  runs is even enough for a t-test (a difference of 1 is a factor of 10);
- ``n_plus_1_kl``: the same on the first ``N_PLUS_1_KL_PROMPTS`` held-out N+1 prompts, how far the
  policy travelled where it learned (a secondary measure: on fewer prompts, as the passes cost);
- ``comfort_logprob``: the mean per-token log-probability the policy gives the right in-distribution
  completion (teacher-forced), at the RL temperature;
- ``penalty_ratio``: the median over collects of ``kl_term / kl``, the realized size of the penalty
  relative to the unweighted KL (1 for a uniform penalty, below 1 for the prioritized one), and
  ``effective_kl_coef`` = the KL coefficient used x that ratio.
"""

from __future__ import annotations

import math
import statistics

import torch

from .. import addition
from ..generation import left_pad
from ..tokenizer import encode

BATCH = 50  # sequences per teacher-forced pass
N_PLUS_1_KL_PROMPTS = 100
KL_FLOOR = 1e-12  # comfort_kl_log10 of a policy equal to the reference (KL 0): -12


def teacher_forced_logprobs(lm, prompts: list[list[int]], completions: list[list[int]], temperature: float, pad_id: int):
    """log softmax(logits / temperature) at every completion token's state, (B, T, V), and the
    completion mask (B, T): prompts left-padded, completions right-padded, one pass."""
    device = next(lm.parameters()).device
    prompt_ids, prompt_mask = left_pad(prompts, pad_id, device)  # (B, P)
    T = max(1, max(map(len, completions)))
    completion_ids = torch.full((len(prompts), T), pad_id, dtype=torch.long, device=device)  # (B, T)
    completion_mask = torch.zeros((len(prompts), T), dtype=torch.bool, device=device)
    for i, c in enumerate(completions):
        completion_ids[i, : len(c)] = torch.tensor(c, dtype=torch.long)
        completion_mask[i, : len(c)] = True
    sequences = torch.cat([prompt_ids, completion_ids], 1)  # (B, P+T)
    attention_mask = torch.cat([prompt_mask, completion_mask.long()], 1)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = lm(input_ids=sequences, attention_mask=attention_mask, position_ids=position_ids).logits  # (B, P+T, V)
    P = prompt_ids.shape[1]
    logits = logits[:, P - 1 : P + T - 1].float() / temperature  # state t predicts completion token t
    return torch.log_softmax(logits, -1), completion_ids, completion_mask


def _batches(lm, tokenizer, pairs, completions: list[str], temperature: float):
    """`teacher_forced_logprobs` of ``pairs`` and their ``completions`` (text), ``BATCH`` at a time."""
    for start in range(0, len(pairs), BATCH):
        prompts = [encode(tokenizer, addition.prompt(a, b)) for a, b in pairs[start : start + BATCH]]
        ids = [encode(tokenizer, t) for t in completions[start : start + BATCH]]
        yield teacher_forced_logprobs(lm, prompts, ids, temperature, tokenizer.pad_token_id)


@torch.no_grad()
def mean_kl(lm, ref_lm, tokenizer, pairs, texts: list[str], temperature: float) -> float:
    """Mean per-token exact KL(policy || reference) over the completions ``texts`` of ``pairs``."""
    total, count = 0.0, 0
    for (logp, _, mask), (ref_logp, _, _) in zip(_batches(lm, tokenizer, pairs, texts, temperature),
                                                 _batches(ref_lm, tokenizer, pairs, texts, temperature)):
        per_token = (logp.exp() * (logp - ref_logp)).sum(-1)  # (B, T)
        total += float(per_token[mask].sum())
        count += int(mask.sum())
    return total / max(1, count)


@torch.no_grad()
def right_completion_logprob(lm, tokenizer, pairs, temperature: float) -> float:
    """Mean per-token log-probability of the exact scratchpad completion of each of ``pairs``."""
    total, count = 0.0, 0
    for logp, ids, mask in _batches(lm, tokenizer, pairs, [addition.completion(a, b) for a, b in pairs], temperature):
        taken = logp.gather(-1, ids[..., None])[..., 0]  # (B, T)
        total += float(taken[mask].sum())
        count += int(mask.sum())
    return total / max(1, count)


def penalty_ratio(records: list[dict]) -> float | None:
    """The median over collects of kl_term / kl (None when no collect had a KL term)."""
    ratios = [r["kl_term"] / r["kl"] for r in records if r.get("kl") and "kl_term" in r and r["kl_term"] is not None]
    return statistics.median(ratios) if ratios else None


def final_endpoints(lm, ref_lm, tokenizer, task_pairs, task_texts, comfort_pairs, comfort_texts, temperature: float,
                    records: list[dict], kl_coef: float | None) -> dict:
    """The continuous endpoints of the final evaluation (module docstring), keys without prefix."""
    ratio = penalty_ratio(records)
    comfort_kl = mean_kl(lm, ref_lm, tokenizer, comfort_pairs, comfort_texts, temperature)
    return {
        "comfort_kl": comfort_kl,
        "comfort_kl_log10": math.log10(max(comfort_kl, KL_FLOOR)),
        "comfort_logprob": right_completion_logprob(lm, tokenizer, comfort_pairs, temperature),
        "n_plus_1_kl": mean_kl(lm, ref_lm, tokenizer, task_pairs[:N_PLUS_1_KL_PROMPTS], task_texts[:N_PLUS_1_KL_PROMPTS], temperature),
        "penalty_ratio": ratio,
        "effective_kl_coef": None if ratio is None or kl_coef is None else kl_coef * ratio,
    }

