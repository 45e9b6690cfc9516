"""The continuous endpoints of an RL run's final evaluation (critical_tokens/rl/endpoints.py)."""

import math

import torch

from critical_tokens import addition
from critical_tokens.model import build_model, load_pretrained
from critical_tokens.rl.endpoints import mean_kl, penalty_ratio, right_completion_logprob
from critical_tokens.tokenizer import encode

MODEL = "critical_tokens/checkpoints/tiny-n3-d1-lr3e-4"
PAIRS = [(12, 7), (345, 99), (5, 5)]


def test_the_kl_of_a_model_to_itself_is_zero_and_to_another_model_is_the_exact_sum():
    lm, tok, _ = load_pretrained(MODEL)
    other = build_model("micro", tok, n_digits=3).eval()
    texts = [addition.completion(a, b) for a, b in PAIRS]
    assert abs(mean_kl(lm, lm, tok, PAIRS, texts, 1.0)) < 1e-7
    # by hand, one sequence at a time: sum over tokens of sum_v p (log p - log q), divided by the tokens
    total, count = 0.0, 0
    with torch.no_grad():
        for (a, b), text in zip(PAIRS, texts):
            ids = torch.tensor([encode(tok, addition.prompt(a, b)) + encode(tok, text)])
            P = len(encode(tok, addition.prompt(a, b)))
            logp = torch.log_softmax(lm(ids).logits[0, P - 1 : -1] / 2.0, -1)
            logq = torch.log_softmax(other(ids).logits[0, P - 1 : -1] / 2.0, -1)
            total += float((logp.exp() * (logp - logq)).sum())
            count += ids.shape[1] - P
    assert math.isclose(mean_kl(lm, other, tok, PAIRS, texts, 2.0), total / count, rel_tol=1e-4)
    assert total > 0


def test_the_right_completions_log_probability_is_the_mean_of_its_tokens():
    lm, tok, _ = load_pretrained(MODEL)
    total, count = 0.0, 0
    with torch.no_grad():
        for a, b in PAIRS:
            prompt, target = encode(tok, addition.prompt(a, b)), encode(tok, addition.completion(a, b))
            logp = torch.log_softmax(lm(torch.tensor([prompt + target])).logits[0, len(prompt) - 1 : -1], -1)
            total += float(logp.gather(-1, torch.tensor(target)[:, None]).sum())
            count += len(target)
    got = right_completion_logprob(lm, tok, PAIRS, 1.0)
    assert math.isclose(got, total / count, rel_tol=1e-4) and got < 0


def test_the_penalty_ratio_is_the_median_over_collects():
    records = [{"step": 0}, {"kl": 2.0, "kl_term": 0.2}, {"kl": 1.0, "kl_term": 0.3}, {"kl": 4.0, "kl_term": 0.2}, {"kl": 0.0, "kl_term": 0.0}]
    assert math.isclose(penalty_ratio(records), 0.1)  # median of 0.1, 0.3, 0.05; the collect without KL is left out
    assert penalty_ratio([{"step": 0}]) is None
