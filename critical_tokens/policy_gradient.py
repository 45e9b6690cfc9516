"""PPO, GRPO and RLOO pieces (the RL loop's ``--algorithm``): the clipped surrogate loss and the
group baselines, and the episode's terminal reward (+1 / -1) that the RL loop and the criteria command
both use. Pure functions on tensors, as in :mod:`critical_tokens.rl.a2c`; the KL penalty, standard or
prioritized, is added to every algorithm's loss the same way (:func:`critical_tokens.kl.kl_penalty`).

    a2c   actor = -A_t log pi(a_t|s_t),                  A_t by GAE on a critic (a2c.gae)
    ppo   actor = clipped_surrogate(...),                A_t by GAE on the critic's values at collect time
    grpo  actor = clipped_surrogate(...),                A_i = group_advantages(R): no critic
    rloo  actor = clipped_surrogate(...),                A_i = leave_one_out_advantages(R): no critic

GRPO and RLOO sample ``G`` episodes per prompt; ``returns`` below holds one total reward per episode,
the ``G`` episodes of a prompt next to each other: ``(n_prompts * G,)``.
"""

import torch

from . import addition
from .kl import masked_mean
from .token_weights import clipped_surrogate_per_token


def clipped_surrogate(logprobs, old_logprobs, advantages, completion_mask, clip_range=0.2):
    """PPO's clipped surrogate objective, as a loss to minimise (Schulman et al. 2017, "Proximal Policy
    Optimization Algorithms", arXiv:1707.06347, eq. 7), averaged over the completion tokens:

        ratio_t = pi(a_t|s_t) / pi_old(a_t|s_t) = exp(logprobs_t - old_logprobs_t)
        loss    = mean_t max(-A_t * ratio_t, -A_t * clip(ratio_t, 1 - eps, 1 + eps))

    With ratio = 1 (the first pass over a fresh collect) its gradient is A2C's -A_t grad log pi.
    The per-token loss is token_weights.clipped_surrogate_per_token (the project's one PPO clip).

    logprobs (with gradient), old_logprobs, advantages, completion_mask: (B, T).
    Returns (loss, clip_fraction): float32 scalars, clip_fraction the share of tokens whose ratio was clipped.
    """
    loss = clipped_surrogate_per_token(logprobs.float(), old_logprobs.float(), advantages, clip_range, clip_range)  # (B, T)
    ratio = torch.exp(logprobs.detach().float() - old_logprobs.float())  # (B, T)
    clip_fraction = masked_mean(((ratio - 1.0).abs() > clip_range).float(), completion_mask)
    return masked_mean(loss, completion_mask), clip_fraction


@torch.no_grad()
def group_advantages(returns, group_size, eps=1e-4):
    """GRPO's outcome advantages (Shao et al. 2024, "DeepSeekMath", arXiv:2402.03300, sec. 4.1.2): each
    episode's return normalised within the group of episodes of the same prompt,

        A_i = (R_i - mean_group(R)) / (std_group(R) + eps)

    with the sample standard deviation and eps = 1e-4, as TRL's GRPOTrainer. A group whose episodes all
    have the same return gets advantage 0: nothing to learn from it.

    returns: (n_prompts * G,). Returns (n_prompts * G,) float32.
    """
    groups = returns.float().view(-1, group_size)  # (n_prompts, G)
    mean, std = groups.mean(-1, keepdim=True), groups.std(-1, keepdim=True)
    return ((groups - mean) / (std + eps)).flatten()


@torch.no_grad()
def leave_one_out_advantages(returns, group_size):
    """RLOO's advantages (Kool et al. 2019, "Buy 4 REINFORCE samples, get a baseline for free!";
    Ahmadian et al. 2024, "Back to Basics", arXiv:2402.14740): each episode's return minus the mean
    return of the other G - 1 episodes of its prompt,

        A_i = R_i - 1/(G-1) sum_{j != i} R_j   ( = G/(G-1) (R_i - mean_group(R)) )

    returns: (n_prompts * G,) with G >= 2. Returns (n_prompts * G,) float32.
    """
    groups = returns.float().view(-1, group_size)  # (n_prompts, G)
    others = (groups.sum(-1, keepdim=True) - groups) / (group_size - 1)
    return (groups - others).flatten()


def terminal_rewards(pairs, texts, finished, completion_mask, wrong: float = -1.0) -> torch.Tensor:
    """(B, T): 0 everywhere, +1 / ``wrong`` on each episode's last token (docs/method.md section 4)."""
    correct = torch.tensor([addition.is_correct(a, b, t) for (a, b), t in zip(pairs, texts)])
    correct &= finished.cpu()  # an episode that hit the length limit is wrong
    final = torch.where(correct, 1.0, wrong)
    rewards = torch.zeros(completion_mask.shape)
    last = completion_mask.long().sum(-1) - 1  # (B,)
    rewards[torch.arange(len(pairs)), last] = final
    return rewards.to(completion_mask.device)
