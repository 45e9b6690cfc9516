"""Independent random streams for an RL run: one per purpose, seed and iteration.

A run draws random numbers for several purposes: the training prompts and the sampling of each
iteration, the held-out evaluation prompts, the probe prompts of the critical-token probabilities,
the sampling of its evaluations, the calibration of beta or of a matched penalty (and, outside a run,
the rollouts of ``critical-tokens criteria``). Each purpose gets
its own stream, ``numpy.random.SeedSequence(seed, spawn_key=(purpose, iteration))``: streams of
different purposes, seeds or iterations are independent by construction (NumPy's SeedSequence
hashes the whole key), where adding offsets to one integer seed can make two of them coincide
(``seed * 1_000_003 + iteration`` for training and ``seed + 1_000_003`` for evaluation are equal at
seed 1, iteration 1).

Independent streams can still draw the same addition by chance; the evaluation and probe prompts
are therefore also *excluded* from the training prompts (`addition.rl_pairs`'s ``exclude``), so
that no run is evaluated on a prompt it trained on.
"""

from __future__ import annotations

import numpy as np

# One spawn-key entry per purpose. Never renumber: a number names a stream of every past run.
PURPOSES = {"train_prompts": 0, "sampling": 1, "eval_prompts": 2, "comfort_prompts": 3, "probe_prompts": 4,
            "eval_sampling": 5, "calibration": 6, "criteria": 7}


def stream_seed(seed: int, purpose: str, iteration: int = 0) -> int:
    """A 63-bit integer seed for ``random.Random`` or ``torch.Generator.manual_seed``, from the
    stream of ``purpose`` at ``iteration`` of run seed ``seed`` (all >= 0)."""
    if seed < 0 or iteration < 0:
        raise ValueError(f"seed and iteration must be >= 0, got {seed} and {iteration}")
    words = np.random.SeedSequence(seed, spawn_key=(PURPOSES[purpose], iteration)).generate_state(2, np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])  # < 2**63: a valid torch seed
