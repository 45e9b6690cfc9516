"""critical-tokens: RL fine-tuning with a prioritized KL penalty, and the study of critical tokens.

Reproduces and packages Vassoyan, Beau & Plaud, "Ignore the KL Penalty! Boosting Exploration on
Critical Tokens to Enhance RL Fine-Tuning" (NAACL Findings 2025).

The method itself lives in :mod:`critical_tokens.kl`; the task in :mod:`critical_tokens.addition`.
"""

__version__ = "0.1.0"
