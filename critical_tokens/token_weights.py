"""Token-level exploration methods side by side: what each one changes in the loss, per token.

Each method singles out a set of tokens, the set it frees or favours; `selection.SelectionCounts`
measures how well a set hits the template's critical tokens. Method (source): members -> its set.

    prioritized KL (arXiv 2502.06533): kl.prioritized_weights (or a kl_rules rule) -> the tokens of weight w < 0.5
    80/20 high entropy (arXiv 2506.01939): high_entropy_mask, masked_policy_gradient -> the selected
        tokens (only they get a policy gradient)
    Archer (arXiv 2507.15778): archer_high_entropy_set, archer_clip_ranges, clipped_surrogate_per_token,
        archer_kl -> the high-entropy set (wider clip, lighter KL)
    KL-Cov / Clip-Cov (arXiv 2505.22617): token_covariance, kl_cov_selection, kl_cov_loss,
        clip_cov_selection, clip_cov_loss -> the selected tokens (penalised, resp. without gradient,
        which keeps the entropy up)
    entropy bonus: entropy_bonus -> no set, every token
    helper: masked_quantile

Tensors are (B, T) with a bool or 0/1 float `completion_mask`. Per-token results are float32 (float64
when given float64); scalar losses are float32 token means over the valid tokens (kl.masked_mean).
Entropies are those of the current policy at the sampling temperature (policy.entropy_from_logits), as in
the sources. Statistics (quantiles, means, top-k) are over the tensors passed: in this project one
process's minibatch, where TRL gathers across processes and verl works per micro-batch.
"""

import torch

from .kl import masked_mean


def _real(x):  # float32, or float64 if it already is
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _flat_mask(indices, like):  # bool, shaped like `like`, True at these row-major flat indices
    flat = torch.zeros(like.numel(), dtype=torch.bool, device=like.device)
    flat[indices] = True
    return flat.view(like.shape)


def masked_quantile(values, mask, q):
    """The q-quantile of `values` over the positions where `mask` is set, with torch.quantile's linear
    interpolation: sorted v_0..v_{N-1}, position q (N - 1), interpolated between its two neighbours.

    values, mask: (...). q in [0, 1]. Returns a 0-d tensor; nan when the mask is empty (so a threshold
    compared with it selects nothing). torch.quantile takes at most 2^24 valid values.
    """
    valid = _real(values.detach())[mask.bool()]
    if valid.numel() == 0:
        return torch.tensor(float("nan"), dtype=valid.dtype, device=valid.device)
    return torch.quantile(valid, q)


def high_entropy_mask(entropy, completion_mask, rho=0.2):
    """The high-entropy minority of "Beyond the 80/20 Rule" (Wang et al., arXiv 2506.01939), by TRL's rule
    (huggingface/trl trl/trainer/grpo_trainer.py :: get_high_entropy_mask, rho = top_entropy_quantile):

        theta = quantile_{valid tokens of the batch}(H, 1 - rho),   E_t = (H_t >= theta) and m_t

    Ties at theta are all kept, so E can hold more than a rho share; rho = 0 keeps the maximum (and its
    ties). Defaults: paper rho = 0.2; TRL 1.0 (off). TRL gathers the valid tokens of all processes; here
    the batch is what is passed (one process). The authors' verl (Shenzhi-Wang/Beyond-the-80-20-Rule-RLVR
    verl/trainer/ppo/core_algos.py :: get_global_entropy_top_mask) takes the top
    k = max(1, int(rho N + 0.9999)) instead, which differs only on ties and rounding.

    entropy, completion_mask: (B, T). Returns (B, T) bool.
    """
    if not 0.0 <= rho <= 1.0:
        raise ValueError(f"rho must be in [0, 1], got {rho}")
    theta = masked_quantile(entropy, completion_mask, 1.0 - rho)
    return (_real(entropy.detach()) >= theta) & completion_mask.bool()


def masked_policy_gradient(per_token_pg_loss, selected, completion_mask, denominator="all"):
    """The 80/20 policy-gradient term, the per-token PG loss P_t kept on the selected tokens E only:

        "all"       sum P E m / sum m     TRL (grpo_trainer.py :: _compute_loss): shrinks by about rho
        "selected"  sum P E m / sum E m   the authors' verl (token mean over E)

    per_token_pg_loss, selected, completion_mask: (B, T). Returns a float32 scalar (0 if nothing is
    selected). Both sources keep any KL term on all tokens: add it separately.
    """
    keep = selected.bool() & completion_mask.bool()
    if denominator == "all":
        return masked_mean(torch.where(keep, per_token_pg_loss, 0.0), completion_mask)
    if denominator == "selected":
        return masked_mean(per_token_pg_loss, keep)
    raise ValueError(f"denominator must be 'all' or 'selected', got {denominator!r}")


def archer_high_entropy_set(entropy, completion_mask, quantile=0.8):
    """Archer's high-entropy tokens (Wang et al., arXiv 2507.15778; wizard-III/ArcherCodeR
    verl/workers/actor/dp_actor.py :: update_policy), per response i:

        q_i = nanquantile(H_i over its valid tokens, quantile) (linear),   Hi_t = (H_t > q_i) and m_t

    The source names this set `low_entropy_mask` (its names are swapped); the rest of the valid tokens
    are the low set. Default quantile 0.8. A row with no valid token has an empty set.

    entropy, completion_mask: (B, T). Returns (B, T) bool.
    """
    mask = completion_mask.bool()
    masked = torch.where(mask, _real(entropy.detach()), float("nan"))  # (B, T)
    q = torch.nanquantile(masked, quantile, dim=-1, keepdim=True)  # (B, 1)
    return (masked > q) & mask


def archer_clip_ranges(high_set, low=(0.2, 0.2), high=(0.5, 0.5)):
    """Per-token clip ranges (eps_low, eps_high) of Archer: `high` on the high-entropy set, `low`
    elsewhere (scripts/train/run_archer_qwen2.5_1.5b_code.sh: 0.2/0.2 and 0.5/0.5).

    high_set: (B, T) bool. Returns two (B, T) float32 tensors, for clipped_surrogate_per_token.
    """
    eps_low = torch.where(high_set, high[0], low[0]).float()
    eps_high = torch.where(high_set, high[1], low[1]).float()
    return eps_low, eps_high


def clipped_surrogate_per_token(logprobs, old_logprobs, advantages, eps_low=0.2, eps_high=0.2,
                                clip_ratio_c=None):
    """Per-token PPO loss (Schulman et al., arXiv 1707.06347) with per-token clip ranges and verl's
    dual clip (volcengine/verl verl/trainer/ppo/core_algos.py :: compute_policy_loss):

        r_t = exp(logprobs_t - old_logprobs_t)
        P_t = max(-A_t r_t, -A_t clip(r_t, 1 - eps_low_t, 1 + eps_high_t))
        dual clip (clip_ratio_c = C > 1):  P_t = min(P_t, -A_t C) where A_t < 0

    Archer uses C = 10 (its script); Clip-Cov and KL-Cov none. eps_low, eps_high: floats or (B, T).
    logprobs (with gradient), old_logprobs, advantages: (B, T). Returns (B, T). The project's one PPO
    clip: policy_gradient.clipped_surrogate is its token mean.
    """
    logprobs = _real(logprobs)
    ratio = torch.exp(logprobs - old_logprobs.to(logprobs.dtype))  # (B, T)
    lo, hi = 1.0 - eps_low, 1.0 + eps_high  # floats, or (B, T) tensors (Archer's)
    if torch.is_tensor(lo):
        lo, hi = lo.to(ratio), hi.to(ratio)
    clipped = ratio.clamp(lo, hi)
    loss = torch.maximum(-advantages * ratio, -advantages * clipped)  # (B, T)
    if clip_ratio_c is not None:
        if clip_ratio_c <= 1.0:
            raise ValueError(f"clip_ratio_c must be > 1, got {clip_ratio_c}")
        loss = torch.where(advantages < 0, torch.minimum(loss, -advantages * clip_ratio_c), loss)
    return loss


def archer_kl(kl_per_token, high_set, completion_mask, low_coef=0.001, high_coef=0.0):
    """Archer's KL term: each entropy group normalised by its own token count,

        low_coef * TM_low(k) + high_coef * TM_high(k),   TM_S(k) = sum_S k / |S|

    k: a per-token KL estimate (kl.kl_estimate; Archer's script: k3, "low_var_kl"). Defaults: the
    script's kl_loss_coef 0.001 and high_entropy_kl_loss_scale_coef 0.0 (no KL on the high set).
    kl_per_token, high_set, completion_mask: (B, T). Returns a float32 scalar.
    """
    mask = completion_mask.bool()
    high = high_set.bool() & mask
    return low_coef * masked_mean(kl_per_token, mask & ~high) + high_coef * masked_mean(kl_per_token, high)


@torch.no_grad()
def token_covariance(advantages, logprobs, completion_mask):
    """Per-token covariance term of Clip-Cov / KL-Cov (Cui et al., arXiv 2505.22617; volcengine/verl
    verl/trainer/ppo/core_algos.py :: compute_policy_loss_clip_cov, compute_policy_loss_kl_cov):

        Cov_t = (A_t - mean_m A) (l_t - mean_m l),   means over the valid tokens, detached

    advantages, logprobs (current policy), completion_mask: (B, T). Returns (B, T), 0 off the mask.
    """
    mask = completion_mask.bool()
    a, lp = _real(advantages), _real(logprobs)
    cov = (a - masked_mean(a, mask).to(a.dtype)) * (lp - masked_mean(lp, mask).to(lp.dtype))
    return torch.where(mask, cov, 0.0)


def kl_cov_selection(cov, completion_mask, ratio=2e-4):
    """KL-Cov's tokens: the k valid tokens of largest Cov_t, k = max(1, int(ratio * N_valid)) (topk;
    ties broken by torch.topk). Default kl_cov_ratio 2e-4 (verl config/actor/actor.yaml).

    cov, completion_mask: (B, T). Returns (B, T) bool, empty if no token is valid.
    """
    mask = completion_mask.bool()
    n_valid = int(mask.sum())
    if n_valid == 0:
        return torch.zeros_like(mask)
    top = torch.where(mask, cov, float("-inf")).flatten().topk(max(1, int(ratio * n_valid))).indices
    return _flat_mask(top, mask)


def kl_cov_loss(logprobs, old_logprobs, advantages, selected, completion_mask, kappa=1.0):
    """KL-Cov's policy loss (verl core_algos.py :: compute_policy_loss_kl_cov), the token mean of

        L_t = -A_t r_t + kappa |log r_t|  on the selected tokens,   -A_t r_t elsewhere

    with no ratio clipping, as the source. kappa = ppo_kl_coef: 1 in the code fallback and the recipes
    (recipe/entropy), 0.1 in actor.yaml. logprobs (with gradient), old_logprobs, advantages, selected,
    completion_mask: (B, T). Returns a float32 scalar.
    """
    log_ratio = _real(logprobs) - old_logprobs.to(_real(logprobs).dtype)  # (B, T)
    loss = -advantages * torch.exp(log_ratio)
    loss = torch.where(selected.bool(), loss + kappa * log_ratio.abs(), loss)
    return masked_mean(loss, completion_mask)


@torch.no_grad()
def clip_cov_selection(cov, ratio_tokens, advantages, completion_mask, clip_low=0.2, clip_high=0.2,
                       lb=1.0, ub=5.0, ratio=2e-4, generator=None):
    """Clip-Cov's tokens, drawn at random (torch.randperm, as the source; not top-k) among the eligible:

        eligible_t = m_t and not already clipped (-A clip(r) > -A r, strict) and lb < Cov_t < ub
        pick min(n, #eligible), n = max(int(ratio * N_valid), 1)

    Defaults: clip_cov_ratio 2e-4, lb 1, ub 5 (actor.yaml); the recipes clip at clip_low = clip_high = 1.
    cov, ratio_tokens (r_t), advantages, completion_mask: (B, T). generator: a CPU torch.Generator.
    Returns (B, T) bool.
    """
    mask = completion_mask.bool()
    r = _real(ratio_tokens)
    already = -advantages * r.clamp(1.0 - clip_low, 1.0 + clip_high) > -advantages * r
    eligible = mask & ~already & (cov > lb) & (cov < ub)
    candidates = eligible.flatten().nonzero().squeeze(-1)
    n = min(max(int(ratio * int(mask.sum())), 1), candidates.numel())
    pick = candidates[torch.randperm(candidates.numel(), generator=generator)[:n].to(candidates.device)]
    return _flat_mask(pick, mask)


def clip_cov_loss(logprobs, old_logprobs, advantages, selected, completion_mask, clip_low=0.2,
                  clip_high=0.2):
    """Clip-Cov's policy loss (verl core_algos.py :: compute_policy_loss_clip_cov): the clipped surrogate
    (no dual clip) with the selected tokens' loss set to 0, token mean over all valid tokens (the zeroed
    ones stay in the denominator). Clip ranges: verl's 0.2 by default, 1/1 in the recipe.

    logprobs (with gradient), old_logprobs, advantages, selected, completion_mask: (B, T).
    Returns a float32 scalar.
    """
    loss = clipped_surrogate_per_token(logprobs, old_logprobs, advantages, clip_low, clip_high)
    return masked_mean(torch.where(selected.bool(), 0.0, loss), completion_mask)


def entropy_bonus(entropy, completion_mask, coef):
    """Entropy bonus as a loss term: -coef * mean_m H (verl entropy_coeff, default 0; the prioritized-KL
    reference A2C ent_coef 0.001). entropy (with gradient), completion_mask: (B, T).
    Returns a float32 scalar.
    """
    return -coef * masked_mean(entropy, completion_mask)
