"""The critical tokens of a pre-trained model (docs/method.md section 6): where its certainty drops on
the template's decisive tokens, and what that looks like.

- `measure`: teacher-forced certainty along completions, table 1 (the certainty gap of critical
  tokens), where failures start, the discovery of critical positions, tracked probabilities;
- `pictures`: scratchpads shaded by certainty (HTML and PNG);
- `command`: the ``critical`` command, which runs `measure` and `pictures` on a run and writes its report.
"""
