import math

import torch

from critical_tokens.policy import entropy_from_logits, token_logprobs, token_logprobs_and_entropy
from critical_tokens.rl.a2c import ValueHead, gae


def test_gae_three_steps_by_hand():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.6, 0.7]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    # gamma = 1, lam = 0.95, value after the last step = 0:
    #   delta_2 = 1 + 0   - 0.7 = 0.3     A_2 = 0.3
    #   delta_1 = 0 + 0.7 - 0.6 = 0.1     A_1 = 0.1 + 0.95 * 0.3   = 0.385
    #   delta_0 = 0 + 0.6 - 0.5 = 0.1     A_0 = 0.1 + 0.95 * 0.385 = 0.46575
    # returns = A + V = 0.96575, 0.985, 1.0
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    torch.testing.assert_close(advantages, torch.tensor([[0.46575, 0.385, 0.3]]))
    torch.testing.assert_close(returns, torch.tensor([[0.96575, 0.985, 1.0]]))


def test_gae_rows_of_different_lengths():
    # row 0: the episode above, on steps 0-2, then padding; row 1: a prompt position, then a
    # 2-step episode ending with reward -1. 9s are garbage at masked positions and must not leak.
    rewards = torch.tensor([[0.0, 0.0, 1.0, 9.0], [9.0, 0.0, -1.0, 9.0]])
    values = torch.tensor([[0.5, 0.6, 0.7, 9.0], [9.0, 0.2, 0.4, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [0.0, 1.0, 1.0, 0.0]])
    # row 1: delta_2 = -1 + 0 - 0.4 = -1.4          A_2 = -1.4
    #        delta_1 = 0 + 0.4 - 0.2 = 0.2          A_1 = 0.2 + 0.95 * -1.4 = -1.13
    #        returns = A + V = -0.93, -1.0
    advantages, returns = gae(rewards, values, mask)
    torch.testing.assert_close(
        advantages, torch.tensor([[0.46575, 0.385, 0.3, 0.0], [0.0, -1.13, -1.4, 0.0]])
    )
    torch.testing.assert_close(returns, torch.tensor([[0.96575, 0.985, 1.0, 0.0], [0.0, -0.93, -1.0, 0.0]]))


def test_gae_gives_no_gradient():
    values = torch.rand(2, 3, requires_grad=True)
    advantages, returns = gae(torch.zeros(2, 3), values, torch.ones(2, 3))
    assert not advantages.requires_grad and not returns.requires_grad


def test_value_head_shape_and_bf16_hidden_states():
    head = ValueHead(d_model=16)
    assert [m.out_features for m in head.modules() if isinstance(m, torch.nn.Linear)] == [128, 128, 1]
    assert head(torch.randn(2, 5, 16)).shape == (2, 5)
    assert head(torch.randn(2, 5, 16, dtype=torch.bfloat16)).shape == (2, 5)


def test_entropy_from_logits():
    # uniform over 4 tokens: log 4; one-hot: 0; -inf logits count as probability 0, not nan
    inf = float("inf")
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1000.0, 0.0, 0.0, 0.0], [0.0, 0.0, -inf, -inf]])
    torch.testing.assert_close(entropy_from_logits(logits), torch.tensor([math.log(4), 0.0, math.log(2)]))


def test_token_logprobs():
    # p = (1/2, 1/4, 1/4) at both positions; the tokens taken are 0 then 2
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25]])).expand(2, 3).bfloat16()
    out = token_logprobs(logits, torch.tensor([0, 2]))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.log(torch.tensor([0.5, 0.25])), atol=1e-2, rtol=1e-2)


def test_token_logprobs_and_entropy_from_one_log_softmax_are_the_two_functions_numbers():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [50.0, -50.0, 0.0, float("-inf")], [1.0, 1.0, float("-inf"), float("-inf")]])
    tokens = torch.tensor([1, 0, 3])
    taken, entropy = token_logprobs_and_entropy(logits, tokens)
    assert torch.equal(taken, token_logprobs(logits, tokens)) and torch.equal(entropy, entropy_from_logits(logits))
    torch.testing.assert_close(entropy, torch.tensor([math.log(4), 0.0, math.log(2)]))
    assert taken[2] == float("-inf")  # a token of probability 0
