"""The RL loop: one update moves the policy and the value head but never the reference; an end-to-end
micro run writes its metrics; same seed, same numbers; --resume equals an uninterrupted run; bad input."""

import dataclasses
import json
import math
import statistics
import shutil

import pytest
import torch

from critical_tokens import cli
from critical_tokens.rl import loop as rl
from critical_tokens.rl.a2c import ValueHead
from critical_tokens.pretrain import load_pretrained
from critical_tokens.policy import Policy
from critical_tokens.rl import calibration
from critical_tokens.rl.config import RLConfig, derive
from critical_tokens.rl.loss import actor_loss

# A micro RL run: 2 iterations of 8 episodes, evaluation at the end only, on 3-digit additions.
MICRO_RL_ARGS = ["--episodes", "16", "--batch-size", "8", "--minibatch-size", "4", "--eval-every", "16",
                 "--eval-episodes", "4", "--eval-comfort-episodes", "2", "--probe-examples", "2",
                 "--final-eval-episodes", "4", "--final-eval-comfort-episodes", "2", "--final-probe-examples", "2", "--lr", "1e-3"]


def run_rl(pretrained_run, out, *extra):
    return cli.main(["rl", str(pretrained_run), "--out", str(out), *MICRO_RL_ARGS, *extra])


def metric_lines(run_dir):
    """metrics.jsonl without the wall-clock fields (they differ between runs by nature)."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if not k.startswith("time/")} for line in lines]


def test_one_update_moves_policy_and_value_head_not_reference(pretrained_run, monkeypatch):
    """Spy on the models and the value head that train() creates, run one iteration, compare."""
    ref, tokenizer, n = load_pretrained(pretrained_run)
    ref_before = {k: v.clone() for k, v in ref.state_dict().items()}
    seen = {}
    real_load = rl.load_pretrained

    def spy_load(path, n_digits=None, **kwargs):
        model, tok, n_ = real_load(path, n_digits, **kwargs)
        seen.setdefault("models", []).append(model)
        return model, tok, n_

    class SpyValueHead(ValueHead):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen["head_before"] = {k: v.clone() for k, v in self.state_dict().items()}

    monkeypatch.setattr(rl, "load_pretrained", spy_load)
    monkeypatch.setattr(rl, "ValueHead", SpyValueHead)
    out = pretrained_run.parent / "rl-update"
    shutil.rmtree(out, ignore_errors=True)
    config = rl.RLConfig(pretrained=str(pretrained_run), out=str(out), episodes=8, batch_size=8, minibatch_size=8,
                         eval_every=1000, eval_episodes=2, eval_comfort_episodes=2, probe_examples=2, lr=1e-3, kl="standard")
    rl.train(config)
    head_before = seen["head_before"]
    reference, policy_lm = seen["models"]
    for k, v in reference.state_dict().items():
        assert torch.equal(v, ref_before[k]), f"reference parameter {k} changed"
    assert all(not p.requires_grad for p in reference.parameters())
    moved = [k for k, v in policy_lm.state_dict().items() if not torch.equal(v, ref_before[k])]
    assert moved, "no policy parameter moved"
    from safetensors.torch import load_file

    head_after = load_file(str(out / "model" / "value_head.safetensors"))
    assert any(not torch.equal(head_after[k], head_before[k]) for k in head_before), "value head did not move"


def test_end_to_end_writes_metrics_and_checkpoint(pretrained_run, tmp_path):
    assert run_rl(pretrained_run, tmp_path / "run", "--kl", "prioritized", "--beta", "10") == 0
    lines = metric_lines(tmp_path / "run")
    assert lines[0]["episodes"] == 0 and "eval/accuracy_greedy" in lines[0]
    train_lines = lines[1:]
    assert [line["episodes"] for line in train_lines] == [8, 16]
    for key in ("reward", "accuracy", "loss", "actor_loss", "value_loss", "entropy", "kl_term", "kl", "grad_norm",
                "weight_mean", "weight_q05", "weight_q50"):
        assert all(key in line for line in train_lines), key
    assert all(-1 <= line["reward"] <= 1 and 0 <= line["weight_mean"] <= 1 for line in train_lines)
    assert "eval/accuracy_sampled" in train_lines[-1]
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["beta"] == 10 and config["config"]["kl"] == "prioritized"
    assert (tmp_path / "run" / "model" / "value_head.safetensors").exists()
    load_pretrained(tmp_path / "run")  # the checkpoint is a loadable Hugging Face model


@pytest.mark.parametrize("kl", ["none", "standard"])
def test_same_seed_same_numbers(pretrained_run, tmp_path, kl):
    assert run_rl(pretrained_run, tmp_path / "a", "--kl", kl, "--seed", "3") == 0
    assert run_rl(pretrained_run, tmp_path / "b", "--kl", kl, "--seed", "3") == 0
    assert metric_lines(tmp_path / "a") == metric_lines(tmp_path / "b")


def test_resume_gives_the_numbers_of_an_uninterrupted_run(pretrained_run, tmp_path, monkeypatch):
    assert run_rl(pretrained_run, tmp_path / "full", "--eval-every", "8") == 0

    # Interrupt the second run right after its first checkpoint (episode 8).
    real_save = rl.save_checkpoint

    def save_then_crash(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(rl, "save_checkpoint", save_then_crash)
    assert run_rl(pretrained_run, tmp_path / "cut", "--eval-every", "8") == 130
    monkeypatch.setattr(rl, "save_checkpoint", real_save)
    assert cli.main(["rl", str(pretrained_run), "--out", str(tmp_path / "cut"), "--resume"]) == 0
    assert metric_lines(tmp_path / "cut") == metric_lines(tmp_path / "full")


def test_auto_beta_is_calibrated_and_saved(pretrained_run, tmp_path):
    assert run_rl(pretrained_run, tmp_path / "auto", "--beta", "auto") == 0
    config = json.loads((tmp_path / "auto" / "config.json").read_text())
    assert config["beta"] > 0 and "c_q05" in config["beta_calibration"]


@pytest.mark.parametrize("flags, message", [
    (["--beta", "-1"], "--beta"),
    (["--beta", "abc"], "--beta"),
    (["--kl-coef", "-0.5"], "--kl-coef"),
    (["--temperature", "0"], "--temperature"),
    (["--certainty-temperature", "-1"], "--certainty-temperature"),
    (["--minibatch-size", "16"], "--minibatch-size"),  # more than the 8 episodes of a collect
    (["--gamma", "1.5"], "--gamma"),
    (["--lr", "nan"], "--lr"),
    (["--n-digits", "0"], "--n-digits"),
    (["--n-digits", "31"], "--n-digits"),
    (["--device", "gpu"], "--device"),
    (["--kl-weights", "priority:2"], "unknown rule 'priority'"),  # --kl-weights: a rule of critical_tokens/kl_rules.py
    (["--kl-weights", "uniform:-1"], "uniform: the scale must be in"),
    (["--kl", "none", "--kl-weights", "uniform:1"], "needs --kl prioritized or standard"),
    (["--beta", "2", "--kl-weights", "uniform:1"], "not both"),
    (["--kl-weights", "ignore:xyz"], "no token of the tokenizer reads 'xyz'"),
])
def test_bad_input_is_one_line_and_writes_nothing(pretrained_run, tmp_path, capsys, flags, message):
    assert run_rl(pretrained_run, tmp_path / "bad", *flags) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "bad").exists()


def test_unknown_estimator_and_missing_run(tmp_path, capsys, pretrained_run):
    with pytest.raises(SystemExit) as e:
        run_rl(pretrained_run, tmp_path / "x", "--estimator", "k4")
    assert e.value.code == 2
    assert cli.main(["rl", str(tmp_path / "nope"), "--out", str(tmp_path / "y")]) == 2
    assert "does not exist" in capsys.readouterr().err
    not_a_model = tmp_path / "empty"
    not_a_model.mkdir()
    assert cli.main(["rl", str(not_a_model), "--out", str(tmp_path / "z")]) == 2


def test_rl_config_defaults_are_the_papers_where_not_retuned():
    config = rl.RLConfig()
    paper = {"kl_coef": 5.0, "estimator": "k2", "certainty": "max_prob", "certainty_temperature": 4.0, "temperature": 2.0,
             "vf_coef": 0.1, "ent_coef": 0.001, "gamma": 1.0, "gae_lambda": 0.95, "beta": "150"}
    assert {k: getattr(config, k) for k in paper} == paper
    assert dataclasses.fields(config)  # frozen dataclass: one source of truth


def test_kl_as_reward_moves_the_penalty_into_the_rewards(pretrained_run, tmp_path):
    """With --kl-as-reward the loss has no KL term (it is in the per-token rewards instead)."""
    assert run_rl(pretrained_run, tmp_path / "r", "--kl", "standard", "--kl-as-reward") == 0
    lines = metric_lines(tmp_path / "r")[1:]
    assert all(line["kl_term"] == 0 and line["kl"] != 0 for line in lines)


@pytest.mark.parametrize("algorithm", ["ppo", "grpo", "rloo"])
def test_each_algorithm_runs_and_moves_the_policy(pretrained_run, tmp_path, algorithm):
    """One collect of 8 episodes (grpo, rloo: 2 prompts x 4) with the prioritized KL: the metrics are
    written, the policy moved, and only the algorithms with a critic save a value head."""
    out = tmp_path / algorithm
    assert run_rl(pretrained_run, out, "--algorithm", algorithm, "--group-size", "4", "--episodes", "8",
                  "--eval-every", "8", "--eval-episodes", "2", "--kl", "prioritized", "--beta", "10") == 0
    line = metric_lines(out)[-1]
    assert line["episodes"] == 8 and 0 <= line["clip_fraction"] <= 1 and "kl_term" in line and "weight_mean" in line
    config = json.loads((out / "config.json").read_text())
    assert config["config"]["algorithm"] == algorithm
    assert config["update_epochs"] == (4 if algorithm == "ppo" else 1)
    assert config["prompts_per_collect"] == (8 if algorithm == "ppo" else 2)
    assert (out / "model" / "value_head.safetensors").exists() == (algorithm == "ppo")
    before, _, _ = load_pretrained(pretrained_run)
    after, _, _ = load_pretrained(out)
    assert any(not torch.equal(a, b) for a, b in zip(after.state_dict().values(), before.state_dict().values())), "policy did not move"


def test_group_algorithms_need_whole_groups(pretrained_run, tmp_path, capsys):
    assert run_rl(pretrained_run, tmp_path / "bad", "--algorithm", "grpo", "--group-size", "3") == 2
    assert "--group-size" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_detach_critic_keeps_value_gradients_out_of_the_language_model(pretrained_run):
    """The value loss alone: shared (the paper's), its gradients reach the transformer; detached,
    only the value head gets any, and the logits and values are the same either way."""
    seen = {}
    for detach in (False, True):
        lm, tokenizer, n = load_pretrained(pretrained_run)
        sequences = torch.randint(0, lm.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
        torch.manual_seed(0)
        policy = Policy(lm, ValueHead(lm.config.n_embd), detach_critic=detach)
        logits, values = policy(sequences, torch.ones_like(sequences), prompt_length=4, temperature=1.0)
        values.pow(2).sum().backward()
        lm_grads = [p.grad for p in lm.parameters() if p.grad is not None and p.grad.abs().sum() > 0]
        head_grads = [p.grad for p in policy.value_head.parameters() if p.grad is not None and p.grad.abs().sum() > 0]
        assert head_grads, "the value head got no gradient"
        assert bool(lm_grads) == (not detach)
        assert logits.shape == (2, 8, lm.config.vocab_size) and values.shape == (2, 8)
        seen[detach] = logits.detach(), values.detach()
    assert torch.equal(seen[False][0], seen[True][0]) and torch.equal(seen[False][1], seen[True][1])


def test_detach_critic_needs_a_critic(pretrained_run, tmp_path, capsys):
    assert run_rl(pretrained_run, tmp_path / "bad", "--algorithm", "rloo", "--group-size", "4", "--detach-critic") == 2
    assert "--detach-critic" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_matched_weight_control_scales_the_uniform_penalty_by_the_mean_prioritized_weight(pretrained_run, tmp_path):
    """--match-weight-beta B: alpha_used = alpha x E[c^B] over the reference's own rollouts, stored in
    config.json; B = 0 gives E[c^0] = 1, the standard penalty itself."""
    assert run_rl(pretrained_run, tmp_path / "m8", "--kl", "standard", "--match-weight-beta", "8") == 0
    saved = json.loads((tmp_path / "m8" / "config.json").read_text())
    ref, tokenizer, n_digits = load_pretrained(pretrained_run / "model")
    config = rl.RLConfig(pretrained=str(pretrained_run), kl="standard", match_weight_beta=8.0)
    c = calibration.certainty_on_own_rollouts(ref, tokenizer, derive(config, n_digits, None), config,
                                              calibration.MATCH_CALIBRATION_PROMPTS, calibration.MATCH_CALIBRATION_SEED)
    expected = float((c ** 8).mean())
    assert 0 < expected < 1
    assert saved["kl_calibration"]["mean_weight"] == pytest.approx(expected, rel=1e-5)
    assert saved["kl_coef_used"] == pytest.approx(5.0 * expected, rel=1e-5)
    assert run_rl(pretrained_run, tmp_path / "m0", "--kl", "standard", "--match-weight-beta", "0") == 0
    assert json.loads((tmp_path / "m0" / "config.json").read_text())["kl_coef_used"] == pytest.approx(5.0)
    assert run_rl(pretrained_run, tmp_path / "m0-std", "--kl", "standard") == 0  # same penalty, same numbers
    assert metric_lines(tmp_path / "m0") == metric_lines(tmp_path / "m0-std")


def test_match_weight_beta_needs_the_standard_penalty(pretrained_run, tmp_path, capsys):
    assert run_rl(pretrained_run, tmp_path / "bad", "--match-weight-beta", "8") == 2
    assert "--match-weight-beta" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_the_final_evaluation_uses_the_larger_held_out_sets_and_is_saved(pretrained_run, tmp_path):
    assert run_rl(pretrained_run, tmp_path / "f", "--final-eval-episodes", "10", "--final-eval-comfort-episodes", "5",
                  "--final-probe-examples", "3") == 0
    lines = metric_lines(tmp_path / "f")
    final = json.loads((tmp_path / "f" / "final_eval.json").read_text())
    assert final["prompts"] == {"task": 10, "comfort": 5, "probe": 3} and final["episodes"] == 16
    assert all(not any(k.startswith("final/") for k in line) for line in lines[:-1])
    for key in ("final/accuracy_sampled", "final/accuracy_greedy", "final/comfort_accuracy_greedy", "final/p_correct/critical_mean"):
        assert lines[-1][key] == final[key]
        assert 0 <= final[key] <= 1
    assert final["final/accuracy_greedy"] * 10 == pytest.approx(round(final["final/accuracy_greedy"] * 10))  # 10 episodes
    # the continuous endpoints (rl/endpoints.py): a KL is >= 0, a log-probability <= 0, and the realized
    # penalty ratio is the median of kl_term / kl over the run's collects
    assert final["final/comfort_kl"] >= 0 and final["final/n_plus_1_kl"] >= 0 and final["final/comfort_logprob"] <= 0
    assert final["final/comfort_kl_log10"] == pytest.approx(math.log10(max(final["final/comfort_kl"], 1e-12)))
    ratios = sorted(line["kl_term"] / line["kl"] for line in lines if line.get("kl"))
    assert final["final/penalty_ratio"] == pytest.approx(statistics.median(ratios))
    assert final["final/effective_kl_coef"] == pytest.approx(json.loads((tmp_path / "f" / "config.json").read_text())["kl_coef_used"] * final["final/penalty_ratio"])


def test_the_curves_last_point_comes_from_the_final_evaluations_first_prompts(pretrained_run, tmp_path, monkeypatch):
    """At the end, one evaluation: the final sets hold the intermediate ones (their first prompts), so
    the last metrics line's "eval/" keys are scored on the final completions of those prompts (the
    greedy ones are the completions an intermediate call would give); with smaller final sets, an
    intermediate evaluation runs as well."""
    from critical_tokens.evaluate import right_answers
    from critical_tokens.rl import evaluation

    calls, texts = [], {}
    real = evaluation.completions_together

    def recording(model, tokenizer, sets, **kwargs):
        out = real(model, tokenizer, sets, **kwargs)
        calls.append([len(pairs) for pairs, _ in sets])
        texts[len(calls)] = [list(zip(pairs, t)) for (pairs, _), t in zip(sets, out)]
        return out

    monkeypatch.setattr(evaluation, "completions_together", recording)
    assert run_rl(pretrained_run, tmp_path / "f", "--final-eval-episodes", "10", "--final-eval-comfort-episodes", "5",
                  "--final-probe-examples", "3") == 0
    assert calls == [[4, 2, 4], [10, 5, 10]]  # step 0, then the final evaluation alone
    last = metric_lines(tmp_path / "f")[-1]
    (greedy, comfort, sampled) = texts[2]
    assert last["eval/accuracy_greedy"] == right_answers(*zip(*greedy[:4])).mean().item()
    assert last["eval/accuracy_sampled"] == right_answers(*zip(*sampled[:4])).mean().item()
    assert last["eval/comfort_accuracy_greedy"] == right_answers(*zip(*comfort[:2])).mean().item()
    assert "p_correct/critical_mean" in last and "final/p_correct/critical_mean" in last
    assert not any(k.startswith("eval/") for k in json.loads((tmp_path / "f" / "final_eval.json").read_text()))

    calls.clear()
    assert run_rl(pretrained_run, tmp_path / "g", "--final-eval-episodes", "3") == 0  # fewer than the 4 of --eval-episodes
    assert calls == [[4, 2, 4], [3, 2, 3], [4, 2, 4]]
    assert "eval/accuracy_greedy" in metric_lines(tmp_path / "g")[-1]


@pytest.mark.parametrize("method", ["entropy80", "archer", "kl_cov", "clip_cov"])
def test_each_token_method_runs_moves_the_policy_and_logs_its_selection(pretrained_run, tmp_path, method):
    """GRPO, 2 epochs per collect (so that the ratio moves off 1), each --method: the policy moved, the
    method is in config.json and its selected tokens' precision and recall against the template's
    critical tokens are logged (in [0, 1], or None when undefined)."""
    out = tmp_path / method
    wide = ["--clip-cov-low", "-100", "--clip-cov-high", "100"] if method == "clip_cov" else []  # the micro model's covariances are small
    share = ["--cov-ratio", "0.2"] if method in ("kl_cov", "clip_cov") else []  # another method's option is refused
    assert run_rl(pretrained_run, out, "--algorithm", "grpo", "--group-size", "4", "--update-epochs", "2", "--method", method,
                  "--kl", "standard", *share, *wide) == 0
    lines = metric_lines(out)[1:]
    assert json.loads((out / "config.json").read_text())["config"]["method"] == method
    for line in lines:
        assert 0 < line["selection/share"] <= 1
        assert all(line[k] is None or 0 <= line[k] <= 1 for k in ("selection/precision", "selection/recall"))
    before, _, _ = load_pretrained(pretrained_run)
    after, _, _ = load_pretrained(out)
    assert any(not torch.equal(a, b) for a, b in zip(after.state_dict().values(), before.state_dict().values())), "policy did not move"


@pytest.mark.parametrize("method", ["entropy80", "archer", "kl_cov", "clip_cov"])
def test_each_token_method_s_actor_loss_has_a_gradient_through_the_log_probs(method):
    """The actor loss of every --method is differentiable in the policy's log-probs: a gradient
    reaches the tokens the method keeps (all but Clip-Cov's gradient stop), so the method moves the
    policy by itself and not only through the KL and entropy terms beside it."""
    generator = torch.Generator().manual_seed(0)
    logprobs = torch.log(torch.rand(4, 6, generator=generator) * 0.9 + 0.05).requires_grad_(True)
    old = (logprobs.detach() + 0.1 * torch.randn(4, 6, generator=generator))
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])[:, None].expand(4, 6)
    entropy = torch.rand(4, 6, generator=generator)
    mask = torch.ones(4, 6, dtype=torch.bool)
    config = RLConfig(pretrained="x", algorithm="grpo", group_size=4, method=method, cov_ratio=0.2, clip_cov_low=-100, clip_cov_high=100)
    terms = actor_loss(config)(logprobs, old, advantages, entropy, mask, generator)
    terms.loss.backward()
    selected = terms.selected
    assert selected.shape == (4, 6) and selected.any()
    assert logprobs.grad is not None and logprobs.grad.abs().sum() > 0


def test_the_prioritized_penalty_logs_the_selection_of_its_freed_tokens_and_standard_does_not(pretrained_run, tmp_path):
    assert run_rl(pretrained_run, tmp_path / "p", "--kl", "prioritized", "--beta", "10") == 0
    assert all("selection/share" in line for line in metric_lines(tmp_path / "p")[1:])
    assert run_rl(pretrained_run, tmp_path / "s", "--kl", "standard") == 0
    assert not any("selection/share" in line for line in metric_lines(tmp_path / "s"))


@pytest.mark.parametrize("flags, message", [
    (["--method", "archer"], "--method archer acts through the importance ratio"),  # a2c: no ratio
    (["--algorithm", "grpo", "--group-size", "4", "--method", "entropy80", "--entropy-quantile", "0"], "--entropy-quantile"),
    (["--algorithm", "grpo", "--group-size", "4", "--method", "clip_cov", "--clip-cov-low", "6"], "--clip-cov-low must be below"),
    (["--algorithm", "grpo", "--group-size", "4", "--method", "kl_cov", "--kl-cov-coef", "nan"], "--kl-cov-coef"),
])
def test_a_bad_method_value_is_one_line(pretrained_run, tmp_path, capsys, flags, message):
    assert run_rl(pretrained_run, tmp_path / "bad", *flags) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and not (tmp_path / "bad").exists()


# --- --kl-weights: the per-token KL weights by a rule (critical_tokens/kl_rules.py) ----------------------
@pytest.mark.parametrize("flags, rule_flags", [(["--beta", "2"], ["--kl-weights", "prioritized:2"]),
                                               (["--kl", "standard"], ["--kl", "standard", "--kl-weights", "uniform:1"])])
def test_kl_weights_rules_give_the_numbers_of_kl_and_beta(pretrained_run, tmp_path, flags, rule_flags):
    """--kl-weights prioritized:2 is --beta 2, --kl-weights uniform:1 is --kl standard: the same numbers."""
    assert run_rl(pretrained_run, tmp_path / "flags", *flags) == 0
    assert run_rl(pretrained_run, tmp_path / "rule", *rule_flags) == 0
    assert metric_lines(tmp_path / "flags") == metric_lines(tmp_path / "rule")
    saved = [json.loads((tmp_path / name / "config.json").read_text())["kl_weights_rule"] for name in ("flags", "rule")]
    assert saved[0] == saved[1] == rule_flags[-1]


def test_kl_weights_a_product_with_auto_beta_is_calibrated_and_recorded(pretrained_run, tmp_path):
    """prioritized:auto*entropy_quantile:0.25*ignore:\\x20: the beta calibrated as --beta auto's and saved in
    the recorded rule; the space and the collect's top quarter of reference entropy get weight 0."""
    assert run_rl(pretrained_run, tmp_path / "run", "--kl-weights", r"prioritized:auto*entropy_quantile:0.25*ignore:\x20") == 0
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["beta"] > 0 and "c_q05" in config["beta_calibration"]
    assert config["kl_weights_rule"] == f"prioritized:{config['beta']!r}*entropy_quantile:0.25*ignore:\\x20"
    lines = metric_lines(tmp_path / "run")[1:]
    assert len(lines) == 2 and all(line["weight_q05"] == 0 and 0 < line["weight_mean"] < 0.75 for line in lines)
