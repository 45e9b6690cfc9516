"""PPO's clipped surrogate and the GRPO / RLOO group baselines on tensors small enough to check by hand."""

import math

import pytest
import torch

from critical_tokens.policy_gradient import clipped_surrogate, group_advantages, leave_one_out_advantages


def test_clipped_surrogate_by_hand():
    # ratios 1.5, 0.5, 1.0 (and a masked 4th token holding garbage); advantages 1, 1, -2; eps 0.2.
    old_logprobs = torch.zeros(1, 4)
    logprobs = torch.log(torch.tensor([[1.5, 0.5, 1.0, 7.0]])).requires_grad_()
    advantages = torch.tensor([[1.0, 1.0, -2.0, 100.0]])
    mask = torch.tensor([[True, True, True, False]])
    loss, clip_fraction = clipped_surrogate(logprobs, old_logprobs, advantages, mask, clip_range=0.2)
    # token 1: max(-1 * 1.5, -1 * 1.2) = -1.2 (the clipped side: no incentive to push the ratio further)
    # token 2: max(-1 * 0.5, -1 * 0.8) = -0.5 (the unclipped side: the pessimistic bound)
    # token 3: max(2 * 1.0, 2 * 1.0)   = 2
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 2.0) / 3)
    assert clip_fraction.item() == pytest.approx(2 / 3)  # tokens 1 and 2 are outside [0.8, 1.2]
    loss.backward()
    # d/dlogp of -A * ratio is -A * ratio on the unclipped side, 0 on the clipped one; / 3 tokens.
    assert torch.allclose(logprobs.grad, torch.tensor([[0.0, -0.5 / 3, 2.0 / 3, 0.0]]))


def test_clipped_surrogate_at_ratio_one_is_the_policy_gradient():
    """On a fresh collect (ratio 1) its gradient is A2C's: -A grad log pi, averaged over tokens."""
    logprobs = torch.tensor([[-0.3, -1.2], [-2.0, -0.1]], requires_grad=True)
    advantages = torch.tensor([[0.5, -1.0], [2.0, 0.0]])
    loss, _ = clipped_surrogate(logprobs, logprobs.detach(), advantages, torch.ones(2, 2, dtype=torch.bool))
    loss.backward()
    assert torch.allclose(logprobs.grad, -advantages / 4)


def test_group_advantages_by_hand():
    # Group 1: one success among 4, mean -0.5, sample std sqrt((1.5^2 + 3 * 0.5^2) / 3) = 1.
    # Group 2: all equal: advantage 0 (nothing to learn).
    returns = torch.tensor([1.0, -1.0, -1.0, -1.0, 1.0, 1.0, 1.0, 1.0])
    expected = torch.tensor([1.5, -0.5, -0.5, -0.5, 0.0, 0.0, 0.0, 0.0]) / (1 + 1e-4)
    assert torch.allclose(group_advantages(returns, group_size=4), expected)


def test_leave_one_out_advantages_by_hand():
    # R_1 - mean(R_2..R_4) = 1 - (-1) = 2; R_2 - mean(1, -1, -1) = -1 + 1/3 = -2/3.
    returns = torch.tensor([1.0, -1.0, -1.0, -1.0, 0.5, 0.5, -0.5, 2.5])
    got = leave_one_out_advantages(returns, group_size=4)
    assert torch.allclose(got[:4], torch.tensor([2.0, -2 / 3, -2 / 3, -2 / 3]))
    # The identity of the docstring: G / (G - 1) * (R_i - mean_group R).
    assert torch.allclose(got[4:], 4 / 3 * (returns[4:] - returns[4:].mean()))
    assert math.isclose(got[:4].sum().item(), 0.0, abs_tol=1e-6)  # RLOO advantages sum to 0 in a group
