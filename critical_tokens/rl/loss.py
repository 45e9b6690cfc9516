"""The RL loss as named terms (the loop's step 7), its parts chosen once per run:

    loss = actor + vf_coef * value - ent_coef * entropy + kl_coef * kl_term

- actor: the algorithm's and ``--method``'s policy loss (:func:`actor_loss` picks one of the
  ``*_actor`` functions below and binds its options): a2c's -A log pi; ppo / grpo / rloo's clipped
  surrogate (policy_gradient.py), or a token-level method's (token_weights.py: entropy80, archer,
  kl_cov, clip_cov);
- value: 0.5 (V - R)^2, the critic's (a2c, ppo; 0 without a critic);
- entropy: the mean entropy of the policy, a bonus;
- kl_term: the KL penalty to the reference, mean_t w_t k_t (kl.kl_penalty; archer: each entropy group
  averaged on its own), or 0 under --kl-as-reward (the KL is then in the rewards, rl/batch.py) or --kl none.

:func:`rl_loss` assembles them on one minibatch and returns them all (:class:`LossTerms`), with the
statistics the loop logs. Shapes: (b, T), b episodes of a minibatch, T completion positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch

from .. import kl
from .. import token_weights as tw
from ..policy_gradient import clipped_surrogate
from .batch import RolloutBatch
from .config import RLConfig


@dataclass(frozen=True)
class ActorTerms:
    """An actor loss (a float32 scalar with gradient) and what it says about the tokens: ``selected``,
    the (b, T) bool set a token-level method frees or favours (None: none), and ``clip_fraction``, the
    share of tokens whose ratio was clipped (PPO's clip; None for the others)."""

    loss: torch.Tensor
    selected: torch.Tensor | None = None
    clip_fraction: torch.Tensor | None = None


# --- the actor losses: (logprobs, old_logprobs, advantages, entropy, completion_mask, generator, **options) -> ActorTerms
def a2c_actor(logprobs, old_logprobs, advantages, entropy, completion_mask, generator) -> ActorTerms:
    """A2C's policy gradient, -mean_t A_t log pi(a_t|s_t) (docs/method.md section 4)."""
    return ActorTerms(-kl.masked_mean(advantages * logprobs, completion_mask))


def ppo_actor(logprobs, old_logprobs, advantages, entropy, completion_mask, generator, *, clip_range) -> ActorTerms:
    """PPO's clipped surrogate (policy_gradient.clipped_surrogate), for ppo, grpo and rloo under --method kl."""
    loss, clip_fraction = clipped_surrogate(logprobs, old_logprobs, advantages, completion_mask, clip_range)
    return ActorTerms(loss, clip_fraction=clip_fraction)


def entropy80_actor(logprobs, old_logprobs, advantages, entropy, completion_mask, generator, *, rho, clip_range) -> ActorTerms:
    """80/20: the clipped surrogate on the high-entropy minority only (TRL's normaliser: all tokens)."""
    selected = tw.high_entropy_mask(entropy, completion_mask, rho)
    per_token = tw.clipped_surrogate_per_token(logprobs, old_logprobs, advantages, clip_range, clip_range)
    return ActorTerms(tw.masked_policy_gradient(per_token, selected, completion_mask, denominator="all"), selected)


def archer_actor(logprobs, old_logprobs, advantages, entropy, completion_mask, generator, *, quantile, clip_range, clip_high) -> ActorTerms:
    """Archer: a wider clip range on each response's high-entropy tokens (its KL term: :func:`archer_kl_term`)."""
    selected = tw.archer_high_entropy_set(entropy, completion_mask, quantile)
    eps_low, eps_high = tw.archer_clip_ranges(selected, (clip_range,) * 2, (clip_high,) * 2)
    per_token = tw.clipped_surrogate_per_token(logprobs, old_logprobs, advantages, eps_low, eps_high)
    return ActorTerms(kl.masked_mean(per_token, completion_mask), selected)


def kl_cov_actor(logprobs, old_logprobs, advantages, entropy, completion_mask, generator, *, ratio, kappa) -> ActorTerms:
    """KL-Cov: a |log r| penalty on the tokens of highest covariance, no clipping."""
    cov = tw.token_covariance(advantages, logprobs, completion_mask)  # (b, T)
    selected = tw.kl_cov_selection(cov, completion_mask, ratio)
    return ActorTerms(tw.kl_cov_loss(logprobs, old_logprobs, advantages, selected, completion_mask, kappa), selected)


def clip_cov_actor(logprobs, old_logprobs, advantages, entropy, completion_mask, generator, *, ratio, clip_range, low, high) -> ActorTerms:
    """Clip-Cov: a gradient stop on random tokens of covariance in (low, high); ``generator`` draws them."""
    cov = tw.token_covariance(advantages, logprobs, completion_mask)  # (b, T)
    r = torch.exp(logprobs.detach().float() - old_logprobs.float())  # (b, T)
    selected = tw.clip_cov_selection(cov, r, advantages, completion_mask, clip_range, clip_range, low, high, ratio, generator)
    return ActorTerms(tw.clip_cov_loss(logprobs, old_logprobs, advantages, selected, completion_mask, clip_range, clip_range), selected)


def actor_loss(config: RLConfig) -> Callable[..., ActorTerms]:
    """The run's actor loss, its options bound: a2c's, or ppo / grpo / rloo's by --method."""
    if config.algorithm == "a2c":
        return a2c_actor
    c = config
    return {"kl": partial(ppo_actor, clip_range=c.clip_range),
            "entropy80": partial(entropy80_actor, rho=c.entropy_quantile, clip_range=c.clip_range),
            "archer": partial(archer_actor, quantile=c.archer_quantile, clip_range=c.clip_range, clip_high=c.archer_clip_high),
            "kl_cov": partial(kl_cov_actor, ratio=c.cov_ratio, kappa=c.kl_cov_coef),
            "clip_cov": partial(clip_cov_actor, ratio=c.cov_ratio, clip_range=c.clip_range, low=c.clip_cov_low, high=c.clip_cov_high),
            }[config.method]


# --- the KL terms: (logprobs, ref_logprobs, weights, kl_per_token, selected, completion_mask, estimator) -> scalar
def no_kl_term(logprobs, ref_logprobs, weights, kl_per_token, selected, completion_mask, estimator):
    """--kl none, or --kl-as-reward (the KL is in the rewards): 0."""
    return torch.zeros((), device=logprobs.device)


def penalty_kl_term(logprobs, ref_logprobs, weights, kl_per_token, selected, completion_mask, estimator):
    """The (standard or prioritized) KL penalty, mean_t w_t k_t (kl.kl_penalty; the paper's eq. 1)."""
    return kl.kl_penalty(logprobs, ref_logprobs, completion_mask, estimator, weights)


def archer_kl_term(logprobs, ref_logprobs, weights, kl_per_token, selected, completion_mask, estimator, *, high_scale):
    """Archer's: the KL of its high-entropy tokens scaled by ``high_scale``, each group averaged on its own."""
    return tw.archer_kl(weights * kl_per_token, selected, completion_mask, 1.0, high_scale)


@dataclass(frozen=True)
class Loss:
    """A run's loss, chosen once from its options (:func:`loss_of`): the actor loss, how the KL enters
    the loss, the coefficients (``kl_coef``: the one applied, rl/config.Resolved.kl_coef_used) and the
    estimator. ``frees_low_weights``: the prioritized penalty under --method kl, whose freed tokens are
    those of weight < 0.5; ``tracks_selection``: the run counts the tokens its method frees (selection.py)."""

    actor: Callable[..., ActorTerms]
    kl_term: Callable[..., torch.Tensor]
    vf_coef: float
    ent_coef: float
    kl_coef: float
    estimator: str
    frees_low_weights: bool
    tracks_selection: bool

    @property
    def penalized(self) -> bool:
        """Whether the loss holds a KL term (--kl standard or prioritized, without --kl-as-reward)."""
        return self.kl_term is not no_kl_term


def loss_of(config: RLConfig, kl_coef: float) -> Loss:
    """The loss of a run with these options and this KL coefficient applied."""
    if config.kl == "none" or config.kl_as_reward:
        kl_term = no_kl_term
    elif config.method == "archer":
        kl_term = partial(archer_kl_term, high_scale=config.archer_high_kl_scale)
    else:
        kl_term = penalty_kl_term
    return Loss(actor=actor_loss(config), kl_term=kl_term, vf_coef=config.vf_coef, ent_coef=config.ent_coef, kl_coef=kl_coef,
                estimator=config.estimator, frees_low_weights=config.kl == "prioritized",
                tracks_selection=config.method != "kl" or config.kl == "prioritized")


@dataclass(frozen=True)
class LossTerms:
    """The loss of one minibatch and its named terms (float32 scalars; ``total`` with gradient), logged
    under :meth:`logged`'s names; ``selected``: the (b, T) bool tokens the method frees (None: none)."""

    total: torch.Tensor
    actor: torch.Tensor
    value: torch.Tensor
    entropy: torch.Tensor
    kl_term: torch.Tensor
    kl: torch.Tensor  # mean_t k_t, the unweighted KL estimate
    clip_fraction: torch.Tensor | None = None
    selected: torch.Tensor | None = None

    def logged(self) -> dict[str, torch.Tensor]:
        """The terms by their names in metrics.jsonl."""
        clip = {} if self.clip_fraction is None else {"clip_fraction": self.clip_fraction}
        return {**clip, "loss": self.total, "actor_loss": self.actor, "value_loss": self.value, "entropy": self.entropy,
                "kl_term": self.kl_term, "kl": self.kl}


def rl_loss(loss: Loss, mb: RolloutBatch, logprobs, entropy, values, advantages, returns, generator=None) -> LossTerms:
    """The loss of minibatch ``mb`` given the policy's ``logprobs`` and ``entropy`` (b, T, with gradient),
    the critic's ``values`` (b, T, or None without one) and the ``advantages`` and ``returns`` (b, T;
    returns None without a critic); ``generator``: Clip-Cov's random pick (a CPU torch.Generator)."""
    mask = mb.completion_mask  # (b, T)
    kl_per_token = kl.kl_estimate(logprobs, mb.ref_logprobs, loss.estimator)  # (b, T)
    actor = loss.actor(logprobs, mb.old_logprobs, advantages, entropy.detach(), mask, generator)
    selected = mb.weights < 0.5 if actor.selected is None and loss.frees_low_weights else actor.selected  # (b, T) or None
    if values is not None:
        value_loss = 0.5 * kl.masked_mean((values - returns) ** 2, mask)
    else:
        value_loss = torch.zeros((), device=logprobs.device)  # grpo, rloo: no critic
    entropy_bonus = kl.masked_mean(entropy, mask)
    kl_term = loss.kl_term(logprobs, mb.ref_logprobs, mb.weights, kl_per_token, selected, mask, loss.estimator)
    total = actor.loss + loss.vf_coef * value_loss - loss.ent_coef * entropy_bonus + loss.kl_coef * kl_term
    return LossTerms(total, actor.loss, value_loss, entropy_bonus, kl_term, kl.masked_mean(kl_per_token, mask),
                     actor.clip_fraction, selected)
