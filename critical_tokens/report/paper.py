"""The paper's numbers and claims (docs/method.md sections 2, 6 and 7), and the rules that judge ours against them.

Each section of the report puts one of `PAPER_CLAIMS` beside our number and a verdict computed by
the rule `VERDICT_RULES` states for it; REPORT.md ends with those rules, word for word.
"""

# Tables 4 and 5 (GPT-2 85M, greedy decoding, 1,000 examples per cell): N -> accuracy in % for
# N, N+1, N+2, N+3 digits, and the half-widths of the 95% intervals.
PAPER_TABLE4 = {7: (98.9, 48.8, 0.0, 0.0), 9: (96.4, 78.9, 0.5, 0.0), 11: (91.2, 75.1, 30.7, 0.2), 13: (93.0, 88.9, 67.7, 20.4)}
PAPER_TABLE4_CI = {7: (0.7, 3.0, 0.0, 0.0), 9: (0.6, 2.4, 0.5, 0.0), 11: (1.3, 2.7, 2.4, 0.3), 13: (1.6, 2.1, 3.1, 2.4)}
PAPER_TABLE5 = {7: (100.0, 69.0, 0.0, 0.0), 9: (97.0, 89.4, 6.9, 0.0), 11: (94.4, 87.0, 53.7, 7.3), 13: (95.6, 92.5, 84.7, 51.8)}
PAPER_TABLE5_CI = {7: (0.0, 2.4, 0.0, 0.0), 9: (0.6, 1.8, 1.3, 0.0), 11: (1.4, 2.1, 3.2, 1.6), 13: (1.4, 1.9, 2.4, 3.2)}
# Table 1, three pre-training levels (the text extraction lost which N): Δ on critical tokens
# (mean, ±) and the minimum over non-critical tokens (mean, ±).
PAPER_TABLE1 = ((-0.33, 0.01, 0.0012, 0.0001), (-0.21, 0.18, 0.0002, 0.0001), (-0.13, 0.04, 0.0004, 0.0001))

PAPER_CLAIMS = {
    "levels_drop": "Accuracy falls beyond the N digits of pre-training: N = 7 gets 98.9% on 7 digits, 48.8% on 8 and 0% on 9 (identical digits, table 4).",
    "levels_more": "Models pre-trained on more digits generalise further: on N+2 digits 0.0%, 0.5%, 30.7%, 67.7% for N = 7, 9, 11, 13 (table 4; figure 2).",
    "table1": "The pre-trained model is much less certain on critical tokens than on the rest of the output: Δ = -0.33, -0.21, -0.13 on critical tokens against +0.0012, +0.0002, +0.0004 for the least certain non-critical tokens (table 1).",
    "rl_levels": "RL on N+2 digits from models pre-trained on N = 9, 11, 13: the models pre-trained on more digits start higher but plateau, the less pre-trained ones improve more (figure 3).",
    "kl_comparison": "From the N = 7 model, RL on N+1 digits (10 seeds): the prioritized KL penalty (beta = 150) significantly outperforms the standard KL penalty (figure 4).",
    "beta_sweep": "Prioritized KL beats the standard KL penalty (beta = 0) for beta from 10 to 500, best at 150, declining from 500 and collapsing at 1000 (figure 6).",
    "tracked_tokens": "With prioritized KL the probability of the right token at the critical tokens rises and stays high; with standard KL it keeps falling back towards its pre-trained level (figures 4 right and 7).",
    "kl_by_model": "Not studied in the paper (one starting model, N = 7, 48.8% / 69.0% greedy at N+1). Beyond it: the comparison of figure 4 from models that start RL with different N+1 competence.",
}

VERDICT_METRIC = "eval/accuracy_sampled"
# The paper's test episodes sample from the policy (the reference sets deterministic_eval=False), so
# the RL verdicts use the sampled accuracy on the RL task; the greedy one is shown beside it.

VERDICT_RULES = f"""\
Every verdict is computed from the numbers above by these rules (95% intervals: for RL results over
seeds, the Wilson interval at the seeds' effective sample size for accuracies and probabilities
(inside [0, 1], with Student's t for z and at most the episodes behind them) and Student's t for
gains; the percentile bootstrap over examples for the evaluation tables and table 1).
"A clearly above B" means A's interval lies entirely above B's; "A above B" compares the means.
"Final" is a run's last evaluation, "initial" its evaluation before any update (episode 0); RL
results use `{VERDICT_METRIC}` (sampled at the policy temperature, as the paper's test episodes).

- **Accuracy drops beyond N** (tables 4-5): reproduced if, for every model, identical-digit accuracy
  at N+1 is clearly below N; partly if below for every model; not reproduced otherwise.
- **More pre-training digits generalise further** (figure 2): the consecutive models (by N) are
  compared at N+1 and N+2, identical and varying. Reproduced if no comparison has the model with
  more digits clearly below and at least half have it clearly above; partly if none clearly below
  and at least one above; not reproduced otherwise. Needs two models.
- **Table 1** (Δ by the paper's certainty, eq. 2): per model, reproduced if Δ on critical tokens is
  clearly below 0 and below the mean of each output's lowest non-critical Δ (the critical tokens
  are the least certain ones); partly if only clearly below 0. Overall: reproduced if every model
  is, partly if any model is at least partly.
- **Figure 3**: (a) "start higher": initial accuracy above for the model with more digits, (b)
  "improve less": the gain (final - initial, per seed) below for the model with more digits, over
  consecutive models. Reproduced if (a) and (b) hold in the means for every pair and each is clear
  for at least one pair; partly if (a) or (b) holds in the means for every pair.
- **Figure 4**: per prioritized arm against the standard arm: reproduced if its final accuracy is
  clearly above, partly if above, not reproduced otherwise.
- **Figure 6**: the fixed beta > 0 against beta = 0 (standard KL): reproduced if most are above and
  at least one clearly above; partly if at least one is above; not reproduced otherwise. "auto" is
  reported beside it.
- **KL by starting model** (beyond the paper): the figure-4 rule, per model; overall reproduced if
  it holds clearly for every model, partly if it holds in the means for at least one.
- **Figure 7**: the first prioritized arm against the standard arm, final probability of the right
  token at each tracked critical token: reproduced if above at every token and clearly above at
  half of them; partly if above at most of them; not reproduced otherwise.
- **Pre-registered study** (`confirm`): not a verdict but the decision of the rule its pre-registration
  fixed: per hypothesis a one-sided paired t-test over the (instance, seed) units both arms finished,
  Holm's correction over the study's hypotheses; "confirmed" when the primary and every control
  reject and every safety hypothesis holds; "beats standard, explained by strength" when the primary
  rejects but a control does not; "beats standard and its controls, but loses the comfort zone" when
  only a safety hypothesis fails; "not confirmed" when the primary does not reject.
- "not run": the experiment is not in the preset or none of its runs has finished.
"""
