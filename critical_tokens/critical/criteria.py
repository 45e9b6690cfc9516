"""Which criterion finds the critical tokens best, at the start of RL: certainty, entropy or covariance.

Each token-level method singles out tokens by a criterion (token_weights.py): the prioritized KL
penalty by the reference's certainty c(s) (it frees the tokens of c^beta < 0.5), 80/20 and Archer by
the policy's entropy, KL-Cov and Clip-Cov by the covariance of log-prob and advantage. On the addition
task the tokens that decide success are known (selection.template_masks), so each criterion can be
scored on a model's own rollouts. At the start of RL the policy is the pre-trained model, so one model
gives all three:

1. `token_stats`: ``group_size`` rollouts per N+1-digit prompt at the sampling temperature
   (generation.generate, which also gives c(s) at the certainty temperature), one teacher-forced pass
   for the entropy and log-probs (policy.Policy, as the RL loop's step 5), the +1/-1 reward
   (policy_gradient.terminal_rewards), RLOO advantages and the covariance over the whole batch;
2. `measure`: per method, over the on-template tokens, the ROC AUC of its score for "critical or not"
   (`auc`), the precision at k = the number of critical tokens (`precision_at_k`), and the precision,
   recall and share of the set it would select with its source's defaults (selection.SelectionCounts);
3. `criteria`: the ``critical-tokens criteria RUN_DIR`` command, which prints the table and writes
   ``criteria.json``.

The sets are selected over the whole batch (the 80/20 quantile, KL-Cov's top share), where the RL
loop selects per minibatch; Clip-Cov (a random draw among the tokens of covariance in (1, 5)) is left out.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.stats import rankdata
from tqdm.auto import tqdm

from .. import addition, kl
from .. import token_weights as tw
from ..config import arg, check_fields, check_range
from ..generation import addition_stop_rule, concatenate, generate
from ..model import RL_SLACK, check_fits
from ..policy import Policy, token_logprobs_and_entropy
from ..policy_gradient import leave_one_out_advantages, terminal_rewards
from ..runs import UserError, check_output, write_json
from ..seeding import stream_seed
from ..tokenizer import encode
from .selection import SelectionCounts, template_masks

TEMPERATURE = 1.0  # the sampling temperature of the CPU presets
CERTAINTY_TEMPERATURE = 4.0  # the paper's, RLConfig's default
CHUNK = 64  # episodes per generation call and per teacher-forced pass

# name -> (label, score, the set it selects with its source's defaults)
METHODS = {
    "prioritized_kl": ("prioritized KL", "1 - c", "c^beta < 0.5"),
    "entropy80": ("80/20", "entropy", "top 20% of the batch"),
    "archer": ("Archer", "entropy", "above each response's 0.8-quantile"),
    "kl_cov": ("KL-Cov", "covariance", "top 2e-4 of the batch, at least 1"),
}


# --- 1. The rollouts and their per-token quantities -------------------------------------------------


@dataclass
class TokenStats:
    """Per completion token of a batch of rollouts, all (B, T) on the CPU; ``correct`` (B,)."""

    certainty: torch.Tensor  # c(s): the reference's max-prob certainty at the certainty temperature
    entropy: torch.Tensor  # the policy's entropy at the sampling temperature
    covariance: torch.Tensor  # Cov_t of log-prob and RLOO advantage over the batch (token_weights.token_covariance)
    completion_mask: torch.Tensor  # bool: generated tokens
    critical: torch.Tensor  # bool: the template's critical offsets
    on_template: torch.Tensor  # bool: up to and including the first wrong character
    correct: torch.Tensor  # (B,) bool: +1 reward


@torch.no_grad()
def token_stats(lm, tokenizer, n_digits: int, prompts: int = 64, group_size: int = 8, seed: int = 0,
                temperature: float = TEMPERATURE, certainty_temperature: float = CERTAINTY_TEMPERATURE,
                progress: bool = False) -> TokenStats:
    """``group_size`` rollouts of ``lm`` (the pre-trained model: policy and reference at once) for each
    of ``prompts`` N+1-digit prompts (addition.rl_pairs; prompts and sampling from the "criteria"
    stream of ``seed``), a group's episodes side by side, and their per-token quantities."""
    stream = stream_seed(seed, "criteria")
    pairs = [pair for pair in addition.rl_pairs(n_digits, 1, prompts, seed=stream) for _ in range(group_size)]
    stop_rule = addition_stop_rule(tokenizer)
    max_new = addition.max_completion_length(n_digits + 1) + RL_SLACK  # docs/method.md section 4
    check_fits(lm, len(addition.prompt(10 ** (n_digits + 1) - 1, 10 ** (n_digits + 1) - 1)) + max_new)
    sampler = torch.Generator().manual_seed(stream)
    lm.eval()
    parts = [generate(lm, [encode(tokenizer, addition.prompt(a, b)) for a, b in pairs[start : start + CHUNK]],
                      max_new_tokens=max_new, temperature=temperature, certainty_method="max_prob",
                      certainty_temperature=certainty_temperature, generator=sampler, **stop_rule)
             for start in tqdm(range(0, len(pairs), CHUNK), desc="rollouts", unit="batch", disable=not progress)]
    rollout = concatenate(parts, stop_rule["pad_token_id"])
    mask, P = rollout.completion_mask, rollout.prompt_length  # (B, T)

    # The policy's entropy and log-probs, one teacher-forced pass per chunk (trimmed to its longest episode).
    policy, entropy, logprobs = Policy(lm, None), torch.zeros(mask.shape), torch.zeros(mask.shape)  # (B, T)
    for rows in torch.arange(len(pairs)).split(CHUNK):
        T = int(mask[rows].sum(-1).max())
        logits, _ = policy(rollout.sequences[rows, : P + T], rollout.attention_mask[rows, : P + T], P, temperature)  # (b, T, V)
        taken, spread = token_logprobs_and_entropy(logits, rollout.sequences[rows, P : P + T])
        entropy[rows, :T], logprobs[rows, :T] = spread.cpu(), taken.cpu()

    mask = mask.cpu()
    texts = rollout.completions(tokenizer)
    returns = terminal_rewards(pairs, texts, rollout.finished, mask).sum(-1)  # (B,): +1 / -1
    advantages = leave_one_out_advantages(returns, group_size)[:, None] * mask  # (B, T)
    critical, on_template = template_masks(pairs, texts, n_digits, mask.shape[1])
    return TokenStats(certainty=rollout.certainty.cpu(), entropy=entropy,
                      covariance=tw.token_covariance(advantages, logprobs, mask), completion_mask=mask,
                      critical=critical, on_template=on_template & mask, correct=returns > 0)


# --- 2. The measures ---------------------------------------------------------------------------------


def auc(scores, labels) -> float | None:
    """ROC AUC of ``scores`` for the 0/1 ``labels``: the probability that a positive scores above a
    negative, ties counting 1/2 (Mann-Whitney: (sum of the positives' average ranks - n+(n+ + 1)/2) /
    (n+ n-)). scores, labels: (n,). None when either class is empty."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    return float((rankdata(scores)[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def precision_at_k(scores, labels) -> float | None:
    """The share of positives among the k highest ``scores``, k = the number of positives (so also the
    recall at k); ties at the k-th score broken by position. scores, labels: (n,). None when no positive."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=bool)
    k = int(labels.sum())
    if k == 0:
        return None
    return float(labels[np.argsort(-scores, kind="stable")[:k]].mean())


def scores_and_sets(stats: TokenStats, beta: float) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per method of METHODS: (its score, the set it selects with its defaults), both (B, T)."""
    m = stats.completion_mask
    return {
        "prioritized_kl": (1.0 - stats.certainty, (kl.prioritized_weights(stats.certainty, beta) < 0.5) & m),
        "entropy80": (stats.entropy, tw.high_entropy_mask(stats.entropy, m)),
        "archer": (stats.entropy, tw.archer_high_entropy_set(stats.entropy, m)),
        "kl_cov": (stats.covariance, tw.kl_cov_selection(stats.covariance, m)),
    }


def measure(stats: TokenStats, beta: float) -> dict[str, dict[str, float | None]]:
    """Per method, over the on-template tokens: ``auc`` and ``precision_at_k`` of its score for
    "critical", and the ``precision``, ``recall`` and ``share`` of its selected set; each in [0, 1] or None."""
    on = stats.on_template
    labels = stats.critical[on].numpy()
    rows = {}
    for name, (score, selected) in scores_and_sets(stats, beta).items():
        counts = SelectionCounts()
        counts.add(selected, stats.critical, on)
        values = score[on].double().numpy()
        rows[name] = {"auc": auc(values, labels), "precision_at_k": precision_at_k(values, labels),
                      **{k.removeprefix("selection/"): v for k, v in counts.record().items()}}
    return rows


# --- 3. The command ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CriteriaConfig:
    run: str = arg(None, "pre-training run directory (the --out of critical-tokens pretrain, or a checkpoint shipped in critical_tokens/checkpoints/); not an RL run, whose policy has left the pre-trained model", positional=True, metavar="RUN_DIR")
    prompts: int = arg(64, "N+1-digit prompts to sample")
    group_size: int = arg(8, "episodes per prompt (RLOO advantages within each group; at least 2)")
    seed: int = arg(0, "seed of the prompts and of the sampling")
    beta: float = arg(8.0, "exponent of the prioritized weights: the penalty frees the tokens of c^beta < 0.5")
    out: str | None = arg(None, "directory for criteria.json (default: runs/criteria/<run name>)")


def validate(config: CriteriaConfig) -> Path:
    """Checks the options; returns the output directory."""
    if config.run is None:
        raise UserError("give the pre-training run to measure: critical-tokens criteria RUN_DIR")
    check_fields(config)
    check_range(config, ("prompts",), 1)
    check_range(config, ("group_size",), 2)
    check_range(config, ("beta",), 0, low_open=True)
    source = Path(config.run).resolve()
    source = source.parent if source.name == "model" else source
    out = config.out if config.out is not None else str(Path("runs") / "criteria" / source.name)
    check_output(out, "--out", directory=True)
    return Path(out)


def table_text(report: dict) -> str:
    """The report as a Markdown table, one row per method, after two lines on the rollouts."""
    t, beta = report["tokens"], report["config"]["beta"]
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    lines = [f"N = {report['n_digits']}: {report['episodes']} rollouts of N+1 = {report['digits']}-digit additions "
             f"({report['config']['prompts']} prompts x {report['config']['group_size']}, temperature {report['temperature']:g}), "
             f"{100 * report['accuracy']:.1f}% right",
             f"{t['on_template']} on-template tokens, {t['critical']} of them critical "
             f"({fmt(report['base_rate'])}: a random set's precision)", "",
             "| method | score | AUC | precision@k | selected set | precision | recall | share |",
             "|---|---|---|---|---|---|---|---|"]
    for name, row in report["criteria"].items():
        label, score, selects = METHODS[name]
        selects = selects.replace("beta", f"{beta:g}")
        lines.append(f"| {label} | {score} | {fmt(row['auc'])} | {fmt(row['precision_at_k'])} | {selects} | "
                     f"{fmt(row['precision'])} | {fmt(row['recall'])} | {fmt(row['share'])} |")
    return "\n".join(lines)


def criteria(config: CriteriaConfig) -> dict:
    """`critical-tokens criteria RUN_DIR`: the table, and ``criteria.json`` in --out."""
    from ..model import load_pretrained, pick_device

    out = validate(config)
    lm, tokenizer, n_digits = load_pretrained(config.run, kinds=("pretrain",))
    lm.to(pick_device("auto"))
    stats = token_stats(lm, tokenizer, n_digits, config.prompts, config.group_size, config.seed, progress=True)
    on, critical = int(stats.on_template.sum()), int((stats.critical & stats.on_template).sum())
    report = {
        "config": asdict(config), "n_digits": n_digits, "digits": n_digits + 1, "episodes": len(stats.correct),
        "temperature": TEMPERATURE, "certainty_temperature": CERTAINTY_TEMPERATURE,
        "accuracy": float(stats.correct.float().mean()),
        "tokens": {"completion": int(stats.completion_mask.sum()), "on_template": on, "critical": critical},
        "base_rate": critical / on if on else None,
        "methods": {name: {"score": score, "selects": selects} for name, (_, score, selects) in METHODS.items()},
        "criteria": measure(stats, config.beta),
    }
    write_json(out / "criteria.json", report)
    print(table_text(report))
    print(f"\nwrote {out / 'criteria.json'}")
    return report
