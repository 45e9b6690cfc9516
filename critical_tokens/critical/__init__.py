"""The critical tokens of a pre-trained model (docs/method.md section 6): where its certainty drops on
the template's decisive tokens, what that looks like, and which tokens a method frees.

- `selection`: the tokens a method frees, against the template's critical tokens (precision,
  recall and share; the RL loop logs them);
- `measure`: teacher-forced certainty along completions, table 1 (the certainty gap of critical
  tokens), where failures start, the discovery of critical positions, tracked probabilities;
- `pictures`: scratchpads shaded by certainty (HTML and PNG);
- `command`: the ``critical`` command, which runs `measure` and `pictures` on a run and writes its report;
- `criteria`: the ``criteria`` command, which criterion (certainty, entropy, covariance) best
  separates the critical tokens on a model's own N+1 rollouts (it rolls out a policy: it reads `rl`);
- `inspect`: the ``inspect`` command, before RL, on any Hugging Face causal LM and your prompts: which
  tokens the prioritized KL penalty would free, and what beta means.
"""
