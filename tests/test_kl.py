import math

import pytest
import torch

from critical_tokens.kl import (
    calibrate_beta,
    certainty,
    kl_estimate,
    kl_penalty,
    masked_mean,
    prioritized_weights,
)

LOG2 = math.log(2.0)


def test_kl_estimates_by_hand():
    # token 0: pi = 1/2, pi_ref = 1/4 -> r = 1/2;  token 1: pi = 1/4, pi_ref = 1/2 -> r = 2
    logprobs = torch.log(torch.tensor([0.5, 0.25]))
    ref_logprobs = torch.log(torch.tensor([0.25, 0.5]))
    # k1 = log pi - log pi_ref = +log 2, -log 2
    torch.testing.assert_close(kl_estimate(logprobs, ref_logprobs, "k1"), torch.tensor([LOG2, -LOG2]))
    # k2 = 1/2 (log r)^2 = 1/2 (log 2)^2 for both (~0.2402)
    torch.testing.assert_close(kl_estimate(logprobs, ref_logprobs, "k2"), torch.tensor([0.5 * LOG2**2] * 2))
    # k3 = (r - 1) - log r: (1/2 - 1) + log 2 ~ 0.1931, (2 - 1) - log 2 ~ 0.3069
    torch.testing.assert_close(
        kl_estimate(logprobs, ref_logprobs, "k3"), torch.tensor([-0.5 + LOG2, 1.0 - LOG2])
    )


def test_k2_k3_nonnegative_and_all_zero_when_policy_is_reference():
    g = torch.Generator().manual_seed(0)
    logprobs = -5 * torch.rand(4, 7, generator=g)
    ref_logprobs = -5 * torch.rand(4, 7, generator=g)
    for estimator in ("k2", "k3"):
        assert (kl_estimate(logprobs, ref_logprobs, estimator) >= 0).all()
    for estimator in ("k1", "k2", "k3"):
        assert (kl_estimate(logprobs, logprobs, estimator) == 0).all()


def test_kl_estimate_bf16_returns_float32():
    logprobs = torch.log(torch.tensor([0.5, 0.25])).bfloat16()
    out = kl_estimate(logprobs, logprobs.flip(0), "k3")
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([-0.5 + LOG2, 1.0 - LOG2]), atol=1e-2, rtol=1e-2)


def test_unknown_estimator():
    with pytest.raises(ValueError, match="k1, k2, k3"):
        kl_estimate(torch.zeros(1), torch.zeros(1), "k4")


@pytest.mark.parametrize("method", ["max_prob", "negentropy"])
def test_certainty_uniform_is_0_one_hot_is_1(method):
    logits = torch.tensor([[0.0, 0.0, 0.0], [1000.0, 0.0, 0.0]])
    torch.testing.assert_close(certainty(logits, method), torch.tensor([0.0, 1.0]))


def test_certainty_by_hand():
    # p = (1/2, 1/4, 1/4), |V| = 3
    logits = torch.log(torch.tensor([0.5, 0.25, 0.25]))
    # eq. 2: 1 + log(1/2) / log 3 = 1 - 0.6931 / 1.0986 ~ 0.3691
    torch.testing.assert_close(certainty(logits, "max_prob"), torch.tensor(1 - LOG2 / math.log(3)))
    # eq. 1: H = 1/2 log 2 + 2 * 1/4 log 4 = 1.5 log 2 ~ 1.0397, so 1 - 1.0397 / 1.0986 ~ 0.0536
    torch.testing.assert_close(certainty(logits, "negentropy"), torch.tensor(1 - 1.5 * LOG2 / math.log(3)))


@pytest.mark.parametrize("method", ["max_prob", "negentropy"])
def test_certainty_in_unit_interval_and_flattened_by_temperature(method):
    logits = 5 * torch.randn(8, 10, 11, generator=torch.Generator().manual_seed(0))
    c = certainty(logits, method)
    assert c.shape == (8, 10)
    assert ((c >= 0) & (c <= 1 + 1e-6)).all()
    # a higher temperature flattens the distribution, so every state is less certain
    assert (certainty(logits, method, temperature=4.0) < c).all()


@pytest.mark.parametrize("method", ["max_prob", "negentropy"])
def test_certainty_bf16_and_minus_inf_logits(method):
    logits = torch.tensor([[2.0, 0.5, -1.0, float("-inf")]])
    c = certainty(logits.bfloat16(), method)
    assert c.dtype == torch.float32 and torch.isfinite(c).all()
    torch.testing.assert_close(c, certainty(logits, method), atol=1e-2, rtol=1e-2)


def test_certainty_validation():
    with pytest.raises(ValueError):
        certainty(torch.zeros(3), temperature=0.0)
    with pytest.raises(ValueError):
        certainty(torch.zeros(3), method="entropy")


def test_prioritized_weights():
    c = torch.tensor([0.0, 0.5, 0.9, 1.0, 1.2])  # 1.2: rounding above 1, clamped to 1
    # beta = 0 is the standard KL penalty: every weight is 1 (0^0 = 1 included)
    assert (prioritized_weights(c, 0.0) == 1).all()
    # beta = 2: c^2 = 0, 0.25, 0.81, 1, 1
    torch.testing.assert_close(prioritized_weights(c, 2.0), torch.tensor([0.0, 0.25, 0.81, 1.0, 1.0]))
    w = prioritized_weights(torch.linspace(0, 1, 11), 150.0)
    assert (w.diff() >= 0).all() and w[-1] == 1
    with pytest.raises(ValueError):
        prioritized_weights(c, -1.0)


def test_masked_mean_and_kl_penalty_ignore_masked_tokens():
    # tokens 0, 1 as in test_kl_estimates_by_hand; token 2 is padding with a -inf reference log-prob
    logprobs = torch.log(torch.tensor([[0.5, 0.25, 0.5]]))
    ref_logprobs = torch.tensor([[math.log(0.25), math.log(0.5), float("-inf")]])
    mask = torch.tensor([[True, True, False]])
    # k2 = 1/2 (log 2)^2 on both valid tokens
    torch.testing.assert_close(kl_penalty(logprobs, ref_logprobs, mask), torch.tensor(0.5 * LOG2**2))
    # k1 = log 2, -log 2 with weights 1, 1/2: (log 2 - 1/2 log 2) / 2 = 1/4 log 2
    weights = torch.tensor([[1.0, 0.5, 7.0]])
    torch.testing.assert_close(
        kl_penalty(logprobs, ref_logprobs, mask.float(), "k1", weights=weights), torch.tensor(0.25 * LOG2)
    )
    assert masked_mean(torch.ones(2, 3), torch.zeros(2, 3)) == 0


def test_calibrate_beta():
    # 10% of tokens at certainty 0.8 (the tail), 90% at 0.99: the 5% quantile is 0.8
    certainties = torch.tensor([0.8] * 10 + [0.99] * 90)
    beta = calibrate_beta(certainties, quantile=0.05, weight_at_quantile=0.5)
    assert beta == pytest.approx(math.log(0.5) / math.log(0.8))  # ~3.106
    torch.testing.assert_close(prioritized_weights(torch.tensor(0.8), beta), torch.tensor(0.5))
    # the median token gets 0.5^(log 0.99 / log 0.8) ~ 0.969: close to 1 thanks to the tail
    assert prioritized_weights(torch.tensor(0.99), beta).item() == pytest.approx(0.969, abs=1e-3)
    with pytest.raises(ValueError):
        calibrate_beta(torch.ones(10))
    with pytest.raises(ValueError):
        calibrate_beta(torch.zeros(10))
