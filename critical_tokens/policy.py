"""The policy as the RL loop and the critical-token analyses see it: a language model (with, for a2c
and ppo, a value head on its hidden states) read teacher-forced over prompt + completion, and the two
per-token numbers taken from its logits, the log-prob of the token taken and the entropy.

Shared by ``rl/`` (the loop's step 5, ppo's values at collect time), ``criteria.py`` (the entropy and
log-probs of a model's own rollouts) and ``trl.py`` (the reference pass): each reaches it here, none
through another's module.
"""

import torch
import torch.nn.functional as F


class Policy(torch.nn.Module):
    """The language model and the critic's value head, sharing the transformer (docs/method.md section 4).
    grpo and rloo have no critic: ``value_head`` None, and the values None. ``detach_critic``: the
    head reads the hidden states detached, so the value loss trains the head alone."""

    def __init__(self, lm, value_head: torch.nn.Module | None, detach_critic: bool = False):
        super().__init__()
        self.lm = lm
        self.value_head = value_head
        self.detach_critic = detach_critic

    def forward(self, sequences, attention_mask, prompt_length: int, temperature: float):
        """Teacher-forced pass over prompt + completion; returns the action logits at the policy
        temperature (B, T, V) and the values of the states the actions were taken in (B, T)."""
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        critic = self.value_head is not None
        with torch.autocast(sequences.device.type, dtype=torch.bfloat16, enabled=sequences.is_cuda):  # GPU: bf16 matmuls
            out = self.lm(input_ids=sequences, attention_mask=attention_mask, position_ids=position_ids, output_hidden_states=critic)
        states = slice(prompt_length - 1, sequences.shape[1] - 1)  # state t predicts completion token t
        logits = out.logits[:, states].float() / temperature  # (B, T, V)
        if critic:
            hidden = out.hidden_states[-1][:, states]  # (B, T, D)
            values = self.value_head((hidden.detach() if self.detach_critic else hidden).float())  # (B, T)
        else:
            values = None
        return logits, values


def _entropy(logp):
    """-sum_a p(a) log p(a) over the last axis of log-probabilities (..., V)."""
    # Clamp -inf log-probs (from -inf logits) so that 0 * log 0 gives 0, not nan.
    return -(logp.exp() * logp.clamp_min(torch.finfo(logp.dtype).min)).sum(dim=-1)


def _taken(logp, tokens):
    """logp[..., token] at each position: (..., V) and (...) ids -> (...)."""
    return logp.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits):
    """Entropy H(softmax(z)) = -sum_a p(a) log p(a) at each position.

    logits: (..., V), already divided by the policy temperature. Returns (...) float32.
    """
    return _entropy(F.log_softmax(logits.float(), dim=-1))


def token_logprobs(logits, tokens):
    """log softmax(z)[token] at each position.

    logits: (..., V), already divided by the policy temperature; tokens: (...) integer ids.
    Returns (...) float32.
    """
    return _taken(F.log_softmax(logits.float(), dim=-1), tokens)


def token_logprobs_and_entropy(logits, tokens):
    """`token_logprobs` and `entropy_from_logits` of the same logits from one log-softmax over the
    vocabulary instead of two (the same numbers). Returns ((...), (...)) float32."""
    logp = F.log_softmax(logits.float(), dim=-1)  # (..., V)
    return _taken(logp, tokens), _entropy(logp)
