"""A2C pieces (docs/method.md section 4): advantages by GAE and the critic's value head.

The per-token log-probs and entropies are the policy's (critical_tokens/policy.py); the loss that
uses them all is rl/loss.py's:
    loss = actor_loss + vf_coef * value_loss - ent_coef * entropy + kl_coef * kl_term
"""

import torch
from torch import nn


@torch.no_grad()
def gae(rewards, values, completion_mask, gamma=1.0, lam=0.95):
    """Generalized advantage estimation (Schulman et al. 2016, "High-Dimensional Continuous Control
    Using Generalized Advantage Estimation", arXiv:1506.02438), backwards over the steps:

        delta_t = r_t + gamma * V(s_{t+1}) - V(s_t)
        A_t     = delta_t + gamma * lam * A_{t+1}
        R_t     = A_t + V(s_t)           (the value target)

    Each row is one episode: its valid action steps are where `completion_mask` is set, contiguous
    from the first completion token; rows end at different steps. Every episode ends (correct, wrong,
    end-of-text or maximum length), so the value after its last valid step is 0.

    rewards, values, completion_mask: (B, T); the mask is bool or 0/1 float.
    Returns (advantages, returns), each (B, T) float32, 0 at masked positions, without gradient.
    """
    mask = completion_mask.float()
    rewards = rewards.float() * mask
    values = values.float() * mask  # so that V(s_{t+1}) = 0 after the last valid step
    advantages = torch.zeros_like(values)  # (B, T)
    next_value = torch.zeros_like(values[:, 0])  # (B,)
    next_advantage = torch.zeros_like(values[:, 0])  # (B,)
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        advantages[:, t] = next_advantage
        next_value = values[:, t]
    returns = advantages + values
    return advantages, returns


class ValueHead(nn.Module):
    """The critic: an MLP on the language model's last-layer hidden state at each position.

    Linear(d_model, 128) - Tanh - Linear(128, 128) - Tanh - Linear(128, 1) (docs/method.md section 4). It
    shares the transformer with the policy: the hidden states are not detached, so value gradients
    flow into the language model (``rl --detach-critic`` detaches them, beyond the paper).
    """

    def __init__(self, d_model, hidden=(128, 128)):
        super().__init__()
        layers, width = [], d_model
        for size in hidden:
            layers += [nn.Linear(width, size), nn.Tanh()]
            width = size
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)

    def forward(self, hidden_states):
        """hidden_states: (B, T, D) -> values (B, T)."""
        # The language model may run in bfloat16 while the head stays in its own dtype.
        hidden_states = hidden_states.to(self.mlp[0].weight.dtype)
        return self.mlp(hidden_states).squeeze(-1)
