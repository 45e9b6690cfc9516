"""The values of an RL run measured on the reference model before RL, once, into its resolved config
(rl/config.py's :class:`Resolved`): a beta 'auto' (--beta auto, prioritized:auto in --kl-weights) and
the matched-weight control's coefficient (--match-weight-beta). Both read the reference's certainty
c(s) on its own rollouts of RL prompts, sampled at the RL temperature."""

from __future__ import annotations

import dataclasses

import torch

from .. import addition, kl, kl_rules
from ..generation import addition_stop_rule, generate
from ..seeding import stream_seed
from ..tokenizer import encode
from .config import Resolved, RLConfig

# The matched-weight control's calibration: one set of prompts for every seed, so that all the seeds
# of a starting model share one coefficient (measured once, before RL; the seeds differ in RL alone).
MATCH_CALIBRATION_PROMPTS, MATCH_CALIBRATION_SEED = 512, 0


@torch.no_grad()
def certainty_on_own_rollouts(ref_lm, tokenizer, resolved: Resolved, config: RLConfig, count: int, seed: int) -> torch.Tensor:
    """The reference's certainty c(s) at every completion token of its own rollouts of ``count`` RL
    prompts, sampled at the RL temperature (the policy's tokens before any update); flat (tokens,)."""
    stream = stream_seed(seed, "calibration")
    pairs = addition.rl_pairs(resolved.n_digits, resolved.plus, count, seed=stream)
    prompts = [encode(tokenizer, addition.prompt(a, b)) for a, b in pairs]
    gen = generate(ref_lm, prompts, max_new_tokens=resolved.max_new_tokens, temperature=config.temperature,
                   certainty_method=config.certainty, certainty_temperature=config.certainty_temperature,
                   generator=torch.Generator().manual_seed(stream), **addition_stop_rule(tokenizer))
    return gen.certainty[gen.completion_mask]


def matched_weight(ref_lm, tokenizer, resolved: Resolved, config: RLConfig) -> tuple[float, dict]:
    """--match-weight-beta B: the factor E[c^B] by which the matched-weight control scales its uniform
    penalty, the mean prioritized weight (kl.prioritized_weights) over the reference's own rollouts.
    A uniform coefficient kl_coef * E[c^B] gives the penalty the prioritized arm's mean weight at the
    start of RL, spread evenly instead of lifted at the uncertain tokens."""
    c = certainty_on_own_rollouts(ref_lm, tokenizer, resolved, config, MATCH_CALIBRATION_PROMPTS, MATCH_CALIBRATION_SEED)
    factor = float(kl.prioritized_weights(c, config.match_weight_beta).mean())
    return factor, {"match_weight_beta": config.match_weight_beta, "mean_weight": factor, "tokens": int(c.numel()),
                    "prompts": MATCH_CALIBRATION_PROMPTS, "calibration_seed": MATCH_CALIBRATION_SEED}


def calibrated_beta(ref_lm, tokenizer, resolved: Resolved, config: RLConfig) -> tuple[float, dict]:
    """--beta auto: beta such that the weight is ``auto_beta_weight`` at the ``auto_beta_quantile``
    of the reference's certainty on its own rollouts of RL prompts (kl.calibrate_beta)."""
    c = certainty_on_own_rollouts(ref_lm, tokenizer, resolved, config, 64, config.seed)
    beta = kl.calibrate_beta(c, config.auto_beta_quantile, config.auto_beta_weight)
    quantiles = {f"c_q{int(q * 100):02d}": float(torch.quantile(c, q)) for q in (0.01, 0.05, 0.25, 0.5)}
    return beta, quantiles


def calibrate(resolved: Resolved, config: RLConfig, ref_lm, tokenizer, kl_rule: kl_rules.Rule | None) -> Resolved:
    """``resolved`` (rl/config.derive) with what only the reference can tell: the beta of a rule that
    awaits one, and for the matched-weight control the KL coefficient applied, --kl-coef x E[c^beta]."""
    if kl_rule is not None and kl_rule.needs_calibration:  # --beta auto, or prioritized:auto in --kl-weights
        beta, quantiles = calibrated_beta(ref_lm, tokenizer, resolved, config)
        resolved = dataclasses.replace(resolved, beta=beta, beta_calibration=quantiles, kl_weights_rule=str(kl_rule.with_beta(beta)))
    if config.match_weight_beta is not None:
        factor, how = matched_weight(ref_lm, tokenizer, resolved, config)
        resolved = dataclasses.replace(resolved, kl_coef_used=config.kl_coef * factor, kl_calibration=how)
    return resolved
