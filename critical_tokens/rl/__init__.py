"""RL fine-tuning of a pre-trained model on N+1-digit additions, with no, the standard or the prioritized
KL penalty (docs/method.md sections 4 and 5), in six modules that import one way:

- `config`: `RLConfig`, the ``rl`` command's options, and their validation;
- `a2c`: the value head, GAE and per-token log-probs and entropies (the paper's A2C);
- `policy_gradient`: PPO's clipped surrogate and the GRPO / RLOO group baselines;
- `endpoints`: the continuous endpoints of a run's final evaluation (the KL to the reference in and
  out of distribution, the likelihood of the right answer, the realized penalty ratio);
- `evaluation`: a run's training and held-out prompts, and the evaluation of the policy on the latter;
- `loop`: the RL loop itself (`loop.train`), as numbered steps: rollouts, reward, reference,
  penalty, update, evaluation.
"""
