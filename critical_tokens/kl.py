"""The KL penalty, standard and prioritized (docs/method.md section 5).

The paper's method (Vassoyan, Beau, Plaud, "Ignore the KL Penalty! Boosting Exploration on Critical
Tokens to Enhance RL Fine-Tuning", NAACL Findings 2025) is one line of the RL loss:

    kl_term = kl_penalty(logprobs, ref_logprobs, completion_mask, "k2",
                         weights=prioritized_weights(certainty(ref_logits, "max_prob", 4.0), beta))

with `weights=None` for the standard KL penalty. Every function computes in float32 (inputs may be
bfloat16) and works on any leading shape `(...)`, on CPU or GPU.
"""

import math

import torch
import torch.nn.functional as F

ESTIMATORS = ("k1", "k2", "k3")
CERTAINTY_METHODS = ("max_prob", "negentropy")


def kl_estimate(logprobs, ref_logprobs, estimator="k2"):
    """Per-token estimate of KL(pi || pi_ref) from the log-probs of the sampled tokens.

    Schulman (2020), "Approximating KL divergence" (http://joschu.net/blog/kl-approx.html), with
    r = pi_ref(a|s) / pi(a|s) = exp(ref_logprobs - logprobs) and a ~ pi:

        k1 = log pi(a|s) - log pi_ref(a|s)             unbiased, high variance, can be < 0
        k2 = 1/2 (log pi_ref(a|s) - log pi(a|s))^2     biased, low variance, >= 0 (the paper's choice)
        k3 = (r - 1) - log r                           unbiased, low variance, >= 0

    logprobs, ref_logprobs: (...) log-probs of the sampled tokens under the policy and the reference.
    Returns (...) float32.
    """
    log_ratio = ref_logprobs.float() - logprobs.float()  # log r
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        return torch.expm1(log_ratio) - log_ratio  # expm1: exact near r = 1, where k3 ~ 0
    raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {', '.join(ESTIMATORS)}")


def certainty(ref_logits, method="max_prob", temperature=1.0):
    """Certainty c(s) in [0, 1] of the pre-trained model in each state, from its logits.

    With p = softmax(z / T) over the vocabulary V (|V| = ref_logits.shape[-1]):

        "max_prob"   (the paper's eq. 2, what it uses):  c = 1 + log(max_a p(a)) / log|V|
        "negentropy" (the paper's eq. 1, normalized negentropy, Brillouin 1953):  c = 1 - H(p) / log|V|

    Both are 0 for the uniform distribution and 1 for a one-hot one. The paper computes eq. 2 at a
    temperature T = 4, higher than the policy's 2 (reference implementation), which spreads the
    extremely confident pre-trained distribution so that certainties are not all ~1.

    ref_logits: (..., V). Returns (...) float32.
    """
    if temperature <= 0:
        raise ValueError(f"certainty temperature must be > 0, got {temperature}")
    if method not in CERTAINTY_METHODS:
        valid = ", ".join(CERTAINTY_METHODS)
        raise ValueError(f"unknown certainty method {method!r}; expected one of {valid}")
    vocab_size = ref_logits.shape[-1]
    if vocab_size < 2:
        raise ValueError(f"certainty needs a vocabulary of at least 2 tokens, got {vocab_size}")
    logp = F.log_softmax(ref_logits.float() / temperature, dim=-1)  # (..., V)
    if method == "max_prob":
        return 1.0 + logp.amax(dim=-1) / math.log(vocab_size)
    # Clamp -inf log-probs (from -inf logits) so that 0 * log 0 gives 0, not nan.
    entropy = -(logp.exp() * logp.clamp_min(torch.finfo(logp.dtype).min)).sum(dim=-1)
    return 1.0 - entropy / math.log(vocab_size)


def prioritized_weights(certainty, beta):
    """Per-token weights w(s) = c(s)^beta of the prioritized KL penalty (the paper's eq. 1).

    w is ~1 where the pre-trained model is confident and ~0 on uncertain ("critical") tokens, so the
    policy may explore there. beta = 0 gives all ones, i.e. the standard KL penalty; the paper's best is
    beta = 150 (10..500 all beat standard KL, 1000 collapses).

    certainty: (...) values in [0, 1] (clamped, to absorb rounding). beta: float >= 0.
    Returns (...) float32.
    """
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    return certainty.float().clamp(0.0, 1.0) ** beta


def masked_mean(values, mask):
    """Mean of `values` over the positions where `mask` is set; 0 when the mask is empty.

    values: (...). mask: (...) bool or 0/1 float. Returns a float32 scalar. Masked positions may hold
    anything, inf and nan included (e.g. log-probs of padding): they are selected out, not multiplied.
    """
    mask = mask.bool()
    total = torch.where(mask, values.float(), 0.0).sum()
    return total / mask.sum().clamp_min(1)


def kl_penalty(logprobs, ref_logprobs, completion_mask, estimator="k2", weights=None):
    """KL term of the loss: mean over completion tokens of w_t * k_t (the paper's eq. 1).

    k_t = kl_estimate(logprobs, ref_logprobs, estimator); weights=None means w_t = 1 (standard KL),
    weights=prioritized_weights(...) gives the prioritized KL penalty.

    logprobs, ref_logprobs, completion_mask, weights: (...). Returns a float32 scalar.
    """
    kl = kl_estimate(logprobs, ref_logprobs, estimator)  # (...)
    if weights is not None:
        kl = weights.float() * kl
    return masked_mean(kl, completion_mask)


def calibrate_beta(certainties, quantile=0.05, weight_at_quantile=0.5):
    """The beta that gives weight `weight_at_quantile` at the `quantile` of the certainty distribution.

    beta = log(w) / log(c_q), so that c_q^beta = w, where c_q is the `quantile` of `certainties`:
    the reference model's certainties at the completion tokens of the RL prompts. This is the
    project's `--beta auto`: the paper notes that its good range of beta (10-500) "might be quite
    different in another problem", since it depends on how confident the pre-trained model is.

    A token of certainty c then gets weight w^(log c / log c_q). Typical tokens (median certainty)
    get a weight close to 1 only if the distribution has a tail, i.e. if log c_median is much closer
    to 0 than log c_q; on a narrow distribution they are down-weighted almost as much as the tail.

    certainties: 1-D tensor of values in [0, 1]. Returns a Python float.
    """
    if certainties.numel() == 0:
        raise ValueError("calibrate_beta needs at least one certainty")
    if not (0.0 <= quantile <= 1.0 and 0.0 < weight_at_quantile < 1.0):
        raise ValueError(
            "need 0 <= quantile <= 1 and 0 < weight_at_quantile < 1, "
            f"got {quantile} and {weight_at_quantile}"
        )
    c_q = torch.quantile(certainties.float().flatten(), quantile).item()
    if not 0.0 < c_q < 1.0:
        raise ValueError(
            f"certainty at quantile {quantile} is {c_q}, outside (0, 1): no beta gives weight "
            f"{weight_at_quantile} there (every token as certain, or as uncertain, as possible)"
        )
    return math.log(weight_at_quantile) / math.log(c_q)
