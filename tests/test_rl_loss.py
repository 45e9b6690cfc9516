"""The RL step's pure pieces on hand-made tensors: rl_loss's named terms and gradient, the KL in the reward,
a minibatch of a RolloutBatch, and the resolved config's round trip through config.json."""

import dataclasses
import json
import math

import pytest
import torch

from critical_tokens import kl_rules
from critical_tokens.rl.batch import RolloutBatch, kl_in_reward, minibatch_advantages
from critical_tokens.rl.config import Resolved, RLConfig, derive, kl_weight_rule
from critical_tokens.rl.loss import actor_loss, loss_of, no_kl_term, rl_loss

# One episode of two tokens: pi(a_t) = 0.5, 0.25; A = +1, -1; log r = ref - logprobs = 0.2, -0.4.
LOGPROBS = [math.log(0.5), math.log(0.25)]
REF = [LOGPROBS[0] + 0.2, LOGPROBS[1] - 0.4]


def episode(weights=(1.0, 0.25), **fields):
    P = 2
    return RolloutBatch(sequences=torch.tensor([[5, 6, 7, 8]]), attention_mask=torch.ones(1, 4, dtype=torch.long), prompt_length=P,
                        completion_mask=torch.ones(1, 2, dtype=torch.bool), old_logprobs=torch.tensor([LOGPROBS]),
                        ref_logprobs=torch.tensor([REF]), rewards=torch.tensor([[0.0, 1.0]]),
                        weights=None if weights is None else torch.tensor([weights]), **fields)


def a2c_config(**options):
    return RLConfig(pretrained="x", algorithm="a2c", kl="prioritized", beta="2", estimator="k2", kl_coef=5.0, vf_coef=0.1, ent_coef=0.001, **options)


def test_rl_loss_names_each_term_and_sums_them_as_the_formula_says():
    """a2c with the prioritized penalty, every term by hand:
    actor  = -mean(A log pi) = -(log 0.5 - log 0.25) / 2 = -log(2) / 2
    value  = 0.5 mean((V - R)^2) = 0.5 (0.25 + 1) / 2 = 0.3125
    entropy = mean(1, 2) = 1.5
    k2 = (log r)^2 / 2 = 0.02, 0.08: kl = 0.05; kl_term = mean(w k) = (1 * 0.02 + 0.25 * 0.08) / 2 = 0.02
    total = actor + 0.1 value - 0.001 entropy + 5 kl_term."""
    logprobs = torch.tensor([LOGPROBS], requires_grad=True)
    values, returns = torch.tensor([[0.5, 0.0]]), torch.tensor([[1.0, 1.0]])
    terms = rl_loss(loss_of(a2c_config(), 5.0), episode(), logprobs, torch.tensor([[1.0, 2.0]]), values,
                    torch.tensor([[1.0, -1.0]]), returns)
    expected = {"actor_loss": -math.log(2) / 2, "value_loss": 0.3125, "entropy": 1.5, "kl_term": 0.02, "kl": 0.05}
    expected["loss"] = expected["actor_loss"] + 0.1 * 0.3125 - 0.001 * 1.5 + 5 * 0.02
    logged = {k: v.item() for k, v in terms.logged().items()}
    assert list(logged) == ["loss", "actor_loss", "value_loss", "entropy", "kl_term", "kl"]  # no clip: a2c
    assert logged == pytest.approx(expected, abs=1e-6)
    assert terms.selected.tolist() == [[False, True]]  # the prioritized penalty frees the tokens of weight < 0.5
    # d total / d logprobs = -A / 2 + 5 w (logprobs - ref) / 2 = (-0.5 - 0.5, 0.5 + 0.25)
    terms.total.backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-1.0, 0.75]]))


def test_the_kl_as_reward_leaves_no_kl_term_in_the_loss_and_the_clip_is_logged():
    config = RLConfig(pretrained="x", algorithm="rloo", group_size=2, kl="standard", kl_as_reward=True)
    loss = loss_of(config, 5.0)
    assert loss.kl_term is no_kl_term and not loss.penalized and not loss.tracks_selection
    logprobs = torch.tensor([LOGPROBS], requires_grad=True)
    terms = rl_loss(loss, episode(weights=(1.0, 1.0)), logprobs, torch.zeros(1, 2), None, torch.tensor([[1.0, 1.0]]), None)
    assert terms.kl_term.item() == 0 and terms.value.item() == 0 and terms.kl.item() == pytest.approx(0.05)
    assert list(terms.logged())[0] == "clip_fraction" and terms.clip_fraction.item() == 0  # ratio 1: nothing clipped


def test_each_method_is_a_function_chosen_once():
    assert actor_loss(a2c_config()).__name__ == "a2c_actor"
    for method in ("kl", "entropy80", "archer", "kl_cov", "clip_cov"):
        actor = actor_loss(RLConfig(pretrained="x", algorithm="grpo", group_size=2, method=method))
        assert actor.func.__name__ == {"kl": "ppo_actor"}.get(method, f"{method}_actor")
    archer = loss_of(RLConfig(pretrained="x", algorithm="ppo", method="archer", archer_high_kl_scale=0.5), 5.0)
    assert archer.kl_term.keywords == {"high_scale": 0.5} and archer.tracks_selection


def test_kl_in_reward_by_hand():
    """r' = r - kl_coef * w * k2 on the completion tokens: k2 = 0.125, 0, 0.5 for log r = -0.5, 0, 1;
    the third token is masked out and keeps its reward."""
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    logprobs = torch.tensor([[-1.0, -2.0, -3.0]])
    ref = torch.tensor([[-1.5, -2.0, -2.0]])
    weights = torch.tensor([[1.0, 0.5, 0.25]])
    mask = torch.tensor([[True, True, False]])
    torch.testing.assert_close(kl_in_reward(rewards, logprobs, ref, weights, mask, 2.0, "k2"), torch.tensor([[-0.25, 0.0, 1.0]]))


def test_a2c_minibatch_advantages_take_the_kl_out_of_the_rewards():
    """a2c: GAE on the rewards minus the weighted KL at the current log-probs (gamma 1, lambda 1, V = 0:
    the advantages are the rewards to go)."""
    config = a2c_config(kl_as_reward=True, gamma=1.0, gae_lambda=1.0)
    mb = episode()
    advantages, returns = minibatch_advantages(mb, torch.zeros(1, 2), torch.tensor([LOGPROBS]), config, 5.0)
    shaped = torch.tensor([[0.0 - 5 * 0.02, 1.0 - 5 * 0.25 * 0.08]])  # r - kl_coef w k2
    torch.testing.assert_close(advantages, torch.tensor([[shaped.sum(), shaped[0, 1]]]))
    torch.testing.assert_close(returns, advantages)
    fixed = dataclasses.replace(mb, advantages=torch.ones(1, 2))  # ppo, grpo, rloo: those of the collect
    assert minibatch_advantages(fixed, None, None, config, 5.0)[0] is fixed.advantages


def test_a_minibatch_is_cut_to_its_longest_completion():
    """Three episodes of 1, 3 and 2 completion tokens: rows 0 and 2 keep 2 completion positions."""
    mask = torch.tensor([[1, 0, 0], [1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    B, P, T = 3, 2, 3
    batch = RolloutBatch(sequences=torch.arange(B * (P + T)).view(B, P + T), attention_mask=torch.ones(B, P + T), prompt_length=P,
                         completion_mask=mask, old_logprobs=torch.zeros(B, T), ref_logprobs=torch.zeros(B, T), rewards=torch.zeros(B, T))
    mb = batch.minibatch(torch.tensor([2, 0]))
    assert mb.sequences.tolist() == [[10, 11, 12, 13], [0, 1, 2, 3]] and mb.actions.tolist() == [[12, 13], [2, 3]]
    assert mb.completion_mask.shape == mb.rewards.shape == (2, 2) and mb.weights is None and mb.prompt_length == P


def test_the_resolved_config_is_derived_once_and_read_back_from_config_json():
    config = RLConfig(pretrained="x", algorithm="rloo", group_size=4, batch_size=32, episodes=70, task="plus2", beta="8")
    resolved = derive(config, 3, kl_weight_rule(config))
    assert (resolved.n_digits, resolved.plus, resolved.group_size, resolved.prompts_per_collect) == (3, 2, 4, 8)
    assert (resolved.update_epochs, resolved.iterations, resolved.beta, resolved.kl_weights_rule) == (1, 3, 8.0, "prioritized:8")
    assert resolved.kl_coef_used == config.kl_coef and dataclasses.is_dataclass(resolved)
    with pytest.raises(dataclasses.FrozenInstanceError):
        resolved.beta = 1.0
    # Saved as config.json's top-level keys; on --resume read back as they were saved (a calibrated beta stays).
    calibrated = dataclasses.replace(resolved, beta=2.5, beta_calibration={"c_q05": 0.75}, kl_coef_used=1.25)
    saved = json.loads(json.dumps({"config": dataclasses.asdict(config), **calibrated.record(), "n_params": 1}))
    assert Resolved.read(saved, resolved) == calibrated
    older = {k: v for k, v in saved.items() if k not in ("plus", "group_size")}  # a run saved before these keys
    assert Resolved.read(older, resolved) == calibrated
    # The algorithms without groups take one episode per prompt; ppo four epochs; 'auto' waits for calibration.
    ppo = RLConfig(pretrained="x", algorithm="ppo", beta="auto", kl="standard")
    assert (derive(ppo, 3, None).group_size, derive(ppo, 3, None).update_epochs, derive(ppo, 3, None).beta) == (1, 4, 0.0)
    assert derive(RLConfig(pretrained="x", beta="auto"), 3, kl_rules.prioritized("auto")).kl_weights_rule == "prioritized:auto"
