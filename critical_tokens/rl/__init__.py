"""RL fine-tuning of a pre-trained model on N+1-digit additions, with no, the standard or the prioritized
KL penalty (docs/method.md sections 4 and 5), in modules that import one way:

- `config`: `RLConfig`, the ``rl`` command's options, and their validation; `Resolved`, the values
  derived from them once (group size, epochs, beta, the KL coefficient used...), saved in config.json;
- `calibration`: the values measured on the reference before RL (beta 'auto', the matched-weight coefficient);
- `a2c`: the value head and GAE (the paper's A2C);
- `policy_gradient`: PPO's clipped surrogate and the GRPO / RLOO group baselines;
- `batch`: `RolloutBatch`, one collect as a value, its terminal reward, the KL in the reward and the advantages;
- `loss`: `rl_loss` -> `LossTerms`, the loss as named terms, the method's actor loss chosen once per run;
- `endpoints`: the continuous endpoints of a run's final evaluation (the KL to the reference in and
  out of distribution, the likelihood of the right answer, the realized penalty ratio);
- `evaluation`: a run's training and held-out prompts, and the evaluation of the policy on the latter;
- `loop`: the RL loop itself (`loop.train`): setup, then numbered steps: rollout, reward, reference,
  KL weights, policy, advantages, loss, update, log.

The policy itself (the language model with its value head, per-token log-probs and entropies) is
`critical_tokens.policy`, shared with the critical-token analyses and the TRL trainers.
"""
