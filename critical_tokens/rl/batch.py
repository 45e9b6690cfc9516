"""One collect of the RL loop as a value: the episodes sampled, their rewards, the reference's log-probs
and the KL weights (:class:`RolloutBatch`), and what is computed from them before the loss: the
terminal reward, the KL moved into the reward (--kl-as-reward), and the advantages (ppo, grpo and rloo
once per collect; a2c per minibatch, on the current values).

Shapes: B episodes of the collect (b in a minibatch), P prompt positions, T completion positions.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .. import kl
from ..policy_gradient import group_advantages, leave_one_out_advantages
from .a2c import gae
from .config import RLConfig


@dataclass(frozen=True)
class RolloutBatch:
    """The episodes of one collect (or a minibatch of them) and everything the loss reads about them.

    sequences, attention_mask: (B, P + T) prompt and completion, left-padded prompts;
    completion_mask: (B, T) bool, the valid completion tokens (actions);
    old_logprobs: (B, T) the sampling log-probs, pi_old of the importance ratio;
    ref_logprobs: (B, T) the frozen reference's log-probs at the policy temperature;
    rewards: (B, T) +1 / -1 on each episode's last token (:func:`critical_tokens.policy_gradient.terminal_rewards`);
    weights: (B, T) the per-token KL weights (kl_rules), None without a KL penalty;
    advantages, returns: (B, T) fixed at collect time (ppo, grpo, rloo; grpo and rloo have no returns),
        None where they are computed per minibatch (a2c);
    critical, on_template: (B, T) bool, where the template's critical tokens are (selection.py), None
        when the run does not count the tokens its method frees."""

    sequences: torch.Tensor
    attention_mask: torch.Tensor
    prompt_length: int
    completion_mask: torch.Tensor
    old_logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    rewards: torch.Tensor
    weights: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None
    critical: torch.Tensor | None = None
    on_template: torch.Tensor | None = None

    @property
    def actions(self) -> torch.Tensor:
        """(B, T) the completion tokens."""
        return self.sequences[:, self.prompt_length :]

    def minibatch(self, rows: torch.Tensor) -> RolloutBatch:
        """The episodes ``rows`` (b,), cut to their longest completion T': (b, P + T') and (b, T')."""
        T = int(self.completion_mask[rows].sum(-1).max())  # trim the minibatch's trailing padding
        width = self.prompt_length + T
        cut = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if torch.is_tensor(getattr(self, f.name))}
        cut = {name: x[rows, : width if name in ("sequences", "attention_mask") else T] for name, x in cut.items()}
        return dataclasses.replace(self, **cut)


@torch.no_grad()
def kl_in_reward(rewards, logprobs, ref_logprobs, weights, completion_mask, kl_coef: float, estimator: str = "k2"):
    """--kl-as-reward (as TRL's PPO): the weighted KL estimate taken out of each token's reward,

        r'_t = r_t - kl_coef * w_t * k_t,   k_t = kl.kl_estimate(logprobs_t, ref_logprobs_t)

    on the completion tokens (0 elsewhere), instead of a KL term in the loss. ``logprobs``: the policy's
    at the time the advantages are computed (ppo, grpo, rloo: the sampling ones, at collect time; a2c:
    the current ones, per minibatch). All (B, T); returns (B, T) float32, without gradient."""
    return rewards - kl_coef * (weights * kl.kl_estimate(logprobs, ref_logprobs, estimator)) * completion_mask


@torch.no_grad()
def collect_advantages(policy, batch: RolloutBatch, config: RLConfig, group_size: int, kl_coef: float) -> RolloutBatch:
    """``batch`` with the advantages and returns of the whole collect, (B, T) each, fixed before the
    policy moves (rewards with the KL in them under --kl-as-reward). ppo: GAE on the critic's values at
    collect time (one pass without gradient, by minibatches); grpo, rloo: one advantage per episode from
    the total rewards of its group, on each of its tokens, and no returns (no critic). a2c: ``batch``
    as it is, its advantages computed per minibatch on the current values (:func:`minibatch_advantages`)."""
    if config.algorithm == "a2c":
        return batch
    mask, rewards = batch.completion_mask, batch.rewards  # (B, T)
    if config.kl_as_reward and batch.weights is not None:
        rewards = kl_in_reward(rewards, batch.old_logprobs, batch.ref_logprobs, batch.weights, mask, kl_coef, config.estimator)
    if config.algorithm == "ppo":
        size, P = config.minibatch_size, batch.prompt_length
        values = torch.cat([policy(batch.sequences[i : i + size], batch.attention_mask[i : i + size], P, config.temperature)[1]
                            for i in range(0, len(mask), size)])  # (B, T)
        advantages, returns = gae(rewards, values, mask, config.gamma, config.gae_lambda)
        return dataclasses.replace(batch, advantages=advantages, returns=returns)
    baseline = group_advantages if config.algorithm == "grpo" else leave_one_out_advantages
    advantages = baseline(rewards.sum(-1), group_size)  # (B,)
    return dataclasses.replace(batch, advantages=advantages[:, None] * mask)


def minibatch_advantages(mb: RolloutBatch, values, logprobs, config: RLConfig, kl_coef: float):
    """The (advantages, returns) of a minibatch, (b, T) each: those fixed at collect time (ppo, grpo,
    rloo), or for a2c GAE (gamma, lambda) on its terminal rewards (minus the weighted KL under
    --kl-as-reward, at the current ``logprobs``) and the current ``values`` of the critic."""
    if mb.advantages is not None:
        return mb.advantages, mb.returns
    rewards = mb.rewards
    if config.kl_as_reward and mb.weights is not None:
        rewards = kl_in_reward(rewards, logprobs, mb.ref_logprobs, mb.weights, mb.completion_mask, kl_coef, config.estimator)
    return gae(rewards, values.detach(), mb.completion_mask, config.gamma, config.gae_lambda)
