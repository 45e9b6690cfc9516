"""The random streams of an RL run (seeding.py): independent by purpose, seed and iteration, and no
evaluation or probe prompt is ever a training prompt."""

import dataclasses

import pytest

from critical_tokens import addition
from critical_tokens.rl import evaluation as rl
from critical_tokens.rl.config import RLConfig, derive
from critical_tokens.seeding import PURPOSES, stream_seed


def test_streams_differ_by_purpose_seed_and_iteration_and_repeat_exactly():
    seeds = {(p, s, i): stream_seed(s, p, i) for p in PURPOSES for s in range(20) for i in range(20)}
    assert len(set(seeds.values())) == len(seeds)  # 2,800 streams, no two alike
    assert all(0 <= v < 2**63 for v in seeds.values())
    assert stream_seed(3, "sampling", 7) == stream_seed(3, "sampling", 7)
    # The collision of the earlier scheme: training seed * 1_000_003 + iteration equalled the
    # evaluation's seed + 1_000_003 at seed 1, iteration 1.
    assert stream_seed(1, "train_prompts", 1) != stream_seed(1, "eval_prompts")
    with pytest.raises(ValueError):
        stream_seed(-1, "sampling")


def test_rl_pairs_never_returns_an_excluded_pair_and_is_unchanged_without_one():
    free = addition.rl_pairs(2, 1, 500, seed=4)
    banned = frozenset(free[:50])
    drawn = addition.rl_pairs(2, 1, 500, seed=4, exclude=banned)
    assert len(drawn) == 500 and not banned & set(drawn)
    assert addition.rl_pairs(2, 1, 500, seed=4, exclude=frozenset()) == free


@pytest.mark.parametrize("algorithm, batch_size", [("a2c", 64), ("rloo", 32)])
def test_no_evaluation_or_probe_prompt_is_a_training_prompt(algorithm, batch_size):
    """Seeds 0..99, every iteration of a 2,000-episode run (a2c: 64 prompts per collect; rloo: 4
    prompts of 8 episodes), N = 3 on N+1 digits: the held-out sets at their final sizes (200 task,
    100 probe prompts) never meet the training prompts. Independent streams alone would not ensure
    it (two streams can draw the same addition); the exclusion does."""
    base = RLConfig(pretrained="x", algorithm=algorithm, batch_size=batch_size, episodes=2000)
    iterations = -(-base.episodes // base.batch_size)
    for seed in range(100):
        config = dataclasses.replace(base, seed=seed)
        resolved = derive(config, 3, None)
        held_out = rl.held_out_prompts(resolved, config)
        assert len(held_out.task) >= 200 and len(held_out.probe) >= 100
        training = {pair for i in range(iterations) for pair in rl.training_prompts(resolved, config, i, held_out)}
        assert not training & held_out.exclude, f"seed {seed}"
