import math

import pytest
import torch

from critical_tokens.kl import kl_estimate
from critical_tokens.token_weights import (
    archer_clip_ranges,
    archer_high_entropy_set,
    archer_kl,
    clip_cov_loss,
    clip_cov_selection,
    clipped_surrogate_per_token,
    entropy_bonus,
    high_entropy_mask,
    kl_cov_loss,
    kl_cov_selection,
    masked_policy_gradient,
    masked_quantile,
    token_covariance,
)

F64 = torch.float64


def t(*rows):
    return torch.tensor(rows, dtype=F64)


def test_masked_quantile_linear_over_valid_tokens():
    values = t([0.1, 2.0, 0.5, 1.5, 100.0])
    mask = torch.tensor([[True, True, True, True, False]])  # 100 is padding: ignored
    # sorted valid [.1, .5, 1.5, 2.0]; q = .8 -> position .8 * 3 = 2.4 -> 1.5 + .4 * (2.0 - 1.5) = 1.7
    assert masked_quantile(values, mask, 0.8).item() == pytest.approx(1.7, abs=1e-12)
    assert masked_quantile(values, mask, 0.0).item() == pytest.approx(0.1)
    assert math.isnan(masked_quantile(values, torch.zeros_like(mask), 0.5).item())


def test_high_entropy_mask_and_policy_gradient_methods_example():
    H = t([0.1, 2.0, 0.5, 1.5])
    mask = torch.ones(1, 4, dtype=torch.bool)
    # theta = 0.8-quantile = 1.7 (as above): only token 1 (H = 2.0) is selected
    selected = high_entropy_mask(H, mask, rho=0.2)
    assert selected.tolist() == [[False, True, False, False]]
    # r = 1, A = 1: per-token PG loss -A r = -1 on every token
    pg = clipped_surrogate_per_token(torch.zeros(1, 4, dtype=F64), torch.zeros(1, 4, dtype=F64), t([1.0] * 4))
    # TRL divides by all 4 valid tokens: -1/4; the authors' verl by the 1 selected token: -1
    assert masked_policy_gradient(pg, selected, mask, "all").item() == pytest.approx(-0.25, abs=1e-6)
    assert masked_policy_gradient(pg, selected, mask, "selected").item() == pytest.approx(-1.0, abs=1e-6)
    with pytest.raises(ValueError):
        masked_policy_gradient(pg, selected, mask, "tokens")


def test_high_entropy_mask_keeps_ties_and_ignores_padding():
    mask = torch.tensor([[True, True, True, True, False]])
    # rho -> 0: theta = the maximum 3, both tokens at 3 are kept (padding at 9 is not)
    H = t([1.0, 3.0, 2.0, 3.0, 9.0])
    assert high_entropy_mask(H, mask, rho=0.0).tolist() == [[False, True, False, True, False]]
    # rho = .25: 0.75-quantile of [1, 2, 3, 3] = position 2.25 -> 3; the tie keeps 2 of 4 tokens (50% > rho)
    assert high_entropy_mask(H, mask, rho=0.25).sum() == 2
    # rho = 1: theta = the minimum, every valid token
    assert high_entropy_mask(H, mask, rho=1.0).tolist() == [mask[0].tolist()]
    with pytest.raises(ValueError):
        high_entropy_mask(H, mask, rho=1.5)


def test_archer_methods_example():
    H = t([0.1, 0.3, 2.0, 0.5])
    mask = torch.ones(1, 4, dtype=torch.bool)
    # per response: sorted [.1, .3, .5, 2.0], q = .8 -> position 2.4 -> .5 + .4 * 1.5 = 1.1; H > 1.1 -> {t2}
    high = archer_high_entropy_set(H, mask, 0.8)
    assert high.tolist() == [[False, False, True, False]]
    A = t([1.0, 1.0, -1.0, -1.0])
    logprobs, old = torch.log(t([1.3, 1.1, 0.6, 0.7])), torch.zeros(1, 4, dtype=F64)
    eps_low, eps_high = archer_clip_ranges(high)  # 0.5/0.5 on t2, 0.2/0.2 elsewhere
    # t0: max(-1.3, -1.2) = -1.2; t1: -1.1 (inside); t2: clip(.6, .5, 1.5) = .6 -> .6; t3: max(.7, .8) = .8
    per_token = clipped_surrogate_per_token(logprobs, old, A, eps_low, eps_high, clip_ratio_c=10.0)
    torch.testing.assert_close(per_token, t([-1.2, -1.1, 0.6, 0.8]))
    pg = per_token.mean()  # (-1.2 - 1.1 + .6 + .8) / 4 = -0.225
    assert pg.item() == pytest.approx(-0.225, abs=1e-6)
    # all tokens at 0.2: t2 becomes max(.6, .8) = .8 -> (-1.2 - 1.1 + .8 + .8) / 4 = -0.175
    all_at_02 = clipped_surrogate_per_token(logprobs, old, A, 0.2, 0.2)
    assert all_at_02.mean().item() == pytest.approx(-0.175, abs=1e-6)
    # d = l_ref - l = [0, .1, -.5, .2] -> k3 = e^d - 1 - d = [0, .005171, .106531, .021403]
    l = torch.zeros(1, 4, dtype=F64)
    k3 = kl_estimate(l, t([0.0, 0.1, -0.5, 0.2]), "k3")
    torch.testing.assert_close(k3, torch.tensor([[0.0, 0.005171, 0.106531, 0.021403]]), atol=1e-6, rtol=0)
    # TM_low = (0 + .005171 + .021403) / 3 = .008858; TM_high = .106531 (the high set alone)
    assert archer_kl(k3, high, mask, 1.0, 0.0).item() == pytest.approx(0.008858, abs=1e-6)
    assert archer_kl(k3, high, mask, 0.0, 1.0).item() == pytest.approx(0.106531, abs=1e-6)
    # script coefficients: kl_loss_coef .001, high coef 0: -0.225 + .001 * .008858 = -0.2249911
    assert (pg + archer_kl(k3, high, mask, 0.001, 0.0)).item() == pytest.approx(-0.2249911, abs=1e-6)


def test_archer_set_is_per_response_and_dual_clip():
    # row 0 as above -> {t2}; row 1 has 2 valid tokens [4, 5]: q = 4 + .8 = 4.8 -> {t1}, padding ignored
    H = t([0.1, 0.3, 2.0, 0.5], [4.0, 5.0, 0.0, 0.0])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    expected = [[False, False, True, False], [False, True, False, False]]
    assert archer_high_entropy_set(H, mask).tolist() == expected
    assert not archer_high_entropy_set(H, torch.zeros_like(mask)).any()  # no valid token: empty set
    # dual clip: A = -1, r = 20: P = max(20, 1.2) = 20, capped at -A C = 10
    P = clipped_surrogate_per_token(torch.log(t([20.0])), t([0.0]), t([-1.0]), clip_ratio_c=10.0)
    assert P.item() == pytest.approx(10.0)


def test_cov_methods_example():
    A = t([1.0, 1.0, -1.0, -1.0])
    l = t([-0.2, -3.0, -0.4, -2.4])
    mask = torch.ones(1, 4, dtype=torch.bool)
    # mean A = 0, mean l = -1.5: Cov = A * (l + 1.5) = [1.3, -1.5, -1.1, .9]
    cov = token_covariance(A, l, mask)
    torch.testing.assert_close(cov, t([1.3, -1.5, -1.1, 0.9]))
    # Clip-Cov, r = 1 (nothing clipped), lb 1 < Cov < ub 5: only t0; n = max(int(2e-4 * 4), 1) = 1
    g = torch.Generator().manual_seed(0)
    selected = clip_cov_selection(cov, torch.ones(1, 4, dtype=F64), A, mask, generator=g)
    assert selected.tolist() == [[True, False, False, False]]
    # per-token [0 (zeroed), -1, 1, 1], still over 4 tokens: 0.25
    assert clip_cov_loss(l, l, A, selected, mask).item() == pytest.approx(0.25, abs=1e-6)
    # KL-Cov: k = max(1, int(2e-4 * 4)) = 1 -> the largest Cov, t0
    top = kl_cov_selection(cov, mask)
    assert top.tolist() == [[True, False, False, False]]
    # log r = [.1, 0, 0, -.2]: L = [-e^.1 + kappa * .1, -1, 1, e^-.2]; mean of -A r alone = -0.071610
    old = l - t([0.1, 0.0, 0.0, -0.2])
    assert kl_cov_loss(l, old, A, top, mask, kappa=1.0).item() == pytest.approx(-0.046610, abs=1e-6)
    assert kl_cov_loss(l, old, A, top, mask, kappa=0.1).item() == pytest.approx(-0.069110, abs=1e-6)
    assert kl_cov_loss(l, old, A, top, mask, kappa=0.0).item() == pytest.approx(-0.071610, abs=1e-6)


def test_clip_cov_random_pick_reproducible_and_only_eligible():
    g = torch.Generator().manual_seed(0)
    B, T = 4, 50
    cov = 6 * torch.rand(B, T, generator=g)  # about 2/3 of the tokens inside (1, 5)
    r = 0.6 + 0.8 * torch.rand(B, T, generator=g)  # some ratios outside [0.8, 1.2]
    A = torch.randn(B, T, generator=g)
    mask = torch.rand(B, T, generator=g) < 0.8
    already = -A * r.clamp(0.8, 1.2) > -A * r
    eligible = mask & ~already & (cov > 1) & (cov < 5)
    picks = [
        clip_cov_selection(cov, r, A, mask, ratio=0.1, generator=torch.Generator().manual_seed(seed))
        for seed in (1, 1, 2)
    ]
    assert torch.equal(picks[0], picks[1])  # same generator state, same pick
    assert not torch.equal(picks[0], picks[2])
    n = max(int(0.1 * int(mask.sum())), 1)
    for pick in picks:
        assert not (pick & ~eligible).any()
        assert pick.sum() == min(n, int(eligible.sum()))
    # more to pick than eligible: all eligible, nothing else
    assert torch.equal(clip_cov_selection(cov, r, A, mask, ratio=1.0), eligible)


def test_cov_selection_empty_mask_and_padding():
    cov = t([9.0, 2.0, 3.0])
    mask = torch.tensor([[False, True, True]])  # t0 has the largest Cov but is padding
    assert kl_cov_selection(cov, mask, ratio=0.5).tolist() == [[False, False, True]]
    assert not kl_cov_selection(cov, torch.zeros_like(mask)).any()
    assert not clip_cov_selection(cov, torch.ones(1, 3), t([1.0, 1.0, 1.0]), torch.zeros_like(mask)).any()


def test_losses_are_differentiable():
    logprobs = torch.log(t([1.3, 1.1, 0.6, 0.7])).requires_grad_()
    A, old, mask = t([1.0, 1.0, -1.0, -1.0]), torch.zeros(1, 4, dtype=F64), torch.ones(1, 4)
    sel = torch.tensor([[True, False, False, False]])
    loss = kl_cov_loss(logprobs, old, A, sel, mask) + clip_cov_loss(logprobs, old, A, sel, mask)
    loss.backward()
    assert torch.isfinite(logprobs.grad).all() and logprobs.grad.abs().sum() > 0


def test_entropy_bonus():
    # mean H = (.1 + 2 + .5 + 1.5) / 4 = 1.025 -> -.01 * 1.025 = -0.01025
    H = t([0.1, 2.0, 0.5, 1.5])
    assert entropy_bonus(H, torch.ones(1, 4), 0.01).item() == pytest.approx(-0.01025, abs=1e-6)

