"""The TRL plug-ins. GRPO: prioritized_beta 0 gives exactly TRL's loss on the same batch; the weights are
c^beta computed by hand; the loss changes by beta * (w - 1) * k3 and nothing else; a short run moves the
policy and leaves the reference frozen; with LoRA the reference (and c) is the base model and only the
adapters train. RLOO: prioritized_beta 0 gives exactly TRL's rewards and loss; the weights change each
reward by -beta * sum (w - 1) k1; a short run moves the policy only. The reference pass, done in chunks of
positions, gives the numbers of the whole logits (GPT-2, Qwen2, Gemma2's soft-capped logits). The two example
scripts run. Two processes (accelerate launch, gloo) use one 'auto' beta, calibrated on both processes' tokens.
A micro model, 12-token completions, 4 per prompt: a few seconds each (the two-process ones about 15 s)."""

import math
import os

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("datasets")

from datasets import Dataset  # noqa: E402
from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer  # noqa: E402

from critical_tokens import addition, kl  # noqa: E402
from critical_tokens.kl_rules import entropy_quantile, ignore_tokens, prioritized, uniform  # noqa: E402
from critical_tokens.policy import entropy_from_logits  # noqa: E402
from critical_tokens.runs import UserError  # noqa: E402
from critical_tokens.model import load_pretrained  # noqa: E402
from critical_tokens.runs import UserError  # noqa: E402
from critical_tokens.trl import (  # noqa: E402
    PrioritizedGRPOConfig,
    PrioritizedGRPOTrainer,
    PrioritizedRLOOConfig,
    PrioritizedRLOOTrainer,
)

BETA = 0.1  # TRL's KL coefficient


def addition_reward(completions, a, b, **kwargs):
    return [1.0 if addition.is_correct(x, y, text) else -1.0 for x, y, text in zip(a, b, completions)]


def make_trainer(pretrained_run, tmp_path, trainer_class, config_class, peft_config=None, **options):
    """A trainer of ``trainer_class`` on the micro model (TRL's ``peft_config`` passed on when given); the
    config's options are the tests' common ones, plus ``options``."""
    model, tokenizer, n_digits = load_pretrained(pretrained_run)
    pairs = addition.rl_pairs(n_digits, 1, 4, seed=0)
    dataset = Dataset.from_dict({"prompt": [addition.prompt(a, b) for a, b in pairs], "a": [a for a, _ in pairs], "b": [b for _, b in pairs]})
    args = config_class(output_dir=str(tmp_path / config_class.__name__), per_device_train_batch_size=4, num_generations=4,
                        max_completion_length=12, temperature=1.0, beta=BETA, learning_rate=1e-2, max_steps=2, logging_steps=1,
                        save_strategy="no", report_to="none", use_cpu=True, bf16=False, seed=0, disable_tqdm=True,
                        dataloader_num_workers=0, **options)
    threads = torch.get_num_threads()
    extra = {} if peft_config is None else {"peft_config": peft_config}
    trainer = trainer_class(model=model, reward_funcs=addition_reward, args=args, train_dataset=dataset, processing_class=tokenizer, **extra)
    torch.set_num_threads(threads)  # the Trainer resets torch's thread count
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop; _compute_loss reads it
    return trainer, dataset


def perturb_policies(*trainers):
    """The same small change to each trainer's policy, so that the policy differs from the reference
    and the KL is not 0 (at step 0 they are the same model)."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for params in zip(*(t.model.parameters() for t in trainers)):
            noise = 0.05 * torch.randn(params[0].shape, generator=generator)
            for p in params:
                p.add_(noise)


@pytest.mark.parametrize("options", [{"prioritized_beta": 0.0}, {"kl_weights": uniform(1)}], ids=["beta0", "uniform1"])
def test_weights_one_give_exactly_trls_loss(pretrained_run, tmp_path, options):
    ours, dataset = make_trainer(pretrained_run, tmp_path, PrioritizedGRPOTrainer, PrioritizedGRPOConfig, **options)
    plain, _ = make_trainer(pretrained_run, tmp_path, GRPOTrainer, GRPOConfig)
    torch.manual_seed(0)
    inputs = ours._generate_and_score_completions([dataset[0]] * 4)
    assert torch.equal(inputs["kl_weights"], torch.ones_like(inputs["kl_weights"]))
    perturb_policies(ours, plain)
    assert torch.equal(ours._compute_loss(ours.model, inputs), plain._compute_loss(plain.model, inputs))

    # Our reference pass gives the log-probs TRL's fused one does (same model, same temperature).
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    T = inputs["completion_ids"].shape[1]
    trl_ref_logprobs = plain._get_per_token_logps_and_entropies(plain.ref_model, ids, mask, T)[0]
    done = inputs["completion_mask"].bool()
    torch.testing.assert_close(inputs["ref_per_token_logps"][done], trl_ref_logprobs[done], atol=1e-5, rtol=1e-5)
    if "kl_weights" in options:  # a rule that needs no certainty keeps TRL's own reference pass
        assert torch.equal(inputs["ref_per_token_logps"], trl_ref_logprobs) and ours._ref_certainty is None


def reference_by_hand(trainer, inputs, temperature=1.0):
    """The reference's certainty c = 1 + log(max_a softmax(z / 4)_a) / log|V| and entropy (at ``temperature``),
    (B, T) each, from its whole logits z at the completion positions."""
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    P = inputs["prompt_ids"].shape[1]
    with torch.no_grad():
        logits = trainer.ref_model(input_ids=ids, attention_mask=mask).logits[:, P - 1 : -1]  # (B, T, V)
    c = 1 + torch.log(torch.softmax(logits / 4.0, -1).max(-1).values) / math.log(logits.shape[-1])
    return c, entropy_from_logits(logits / temperature)


DIGITS = [str(d) for d in range(10)]


def test_a_product_of_rules_weights_the_kl_term(pretrained_run, tmp_path, tokenizer):
    """kl_weights = prioritized(2) * ignore_tokens(the digits): w = c^2 off the digits and 0 on them (c by
    hand); the loss is TRL's with beta * k3 replaced by beta * w * k3, and nothing else changes."""
    ours, dataset = make_trainer(pretrained_run, tmp_path, PrioritizedGRPOTrainer, PrioritizedGRPOConfig,
                                 kl_weights=prioritized(2) * ignore_tokens(DIGITS), loss_type="bnpo")
    plain, _ = make_trainer(pretrained_run, tmp_path, GRPOTrainer, GRPOConfig, loss_type="bnpo")
    torch.manual_seed(0)
    inputs = ours._generate_and_score_completions([dataset[0]] * 4)
    done = inputs["completion_mask"].bool()
    c, _ = reference_by_hand(ours, inputs)
    digit = torch.isin(inputs["completion_ids"], torch.tensor(tokenizer.convert_tokens_to_ids(DIGITS)))
    assert (digit & done).any() and (~digit & done).any()
    torch.testing.assert_close(inputs["kl_weights"][done], torch.where(digit, 0.0, c**2)[done])
    perturb_policies(ours, plain)
    d = inputs["ref_per_token_logps"] - ours._get_per_token_logps_and_entropies(
        ours.model, torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1),
        torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1), inputs["completion_ids"].shape[1])[0]
    expected = BETA * ((inputs["kl_weights"] - 1) * (torch.exp(d) - d - 1))[done].mean()
    torch.testing.assert_close(ours._compute_loss(ours.model, inputs) - plain._compute_loss(plain.model, inputs), expected, atol=1e-6, rtol=1e-4)


def test_entropy_quantile_frees_the_reference_s_most_uncertain_tokens(pretrained_run, tmp_path):
    """kl_weights = entropy_quantile(0.25): w = 0 where the reference's entropy at TRL's temperature (0.7
    here; by hand) is at or above the 0.75-quantile of the batch's completion tokens, 1 elsewhere."""
    ours, dataset = make_trainer(pretrained_run, tmp_path, PrioritizedGRPOTrainer, PrioritizedGRPOConfig, kl_weights="entropy_quantile:0.25")
    ours.temperature = 0.7
    torch.manual_seed(0)
    inputs = ours._generate_and_score_completions([dataset[0]] * 4)
    done = inputs["completion_mask"].bool()
    _, entropy = reference_by_hand(ours, inputs, temperature=0.7)
    theta = torch.quantile(entropy[done], 0.75)
    torch.testing.assert_close(inputs["kl_weights"][done], (entropy < theta).float()[done])
    assert 0.15 < (inputs["kl_weights"][done] == 0).float().mean() < 0.35
    logged = ours._metrics["train" if ours.model.training else "eval"]
    assert logged["kl_weight/mean"][-1] == pytest.approx(inputs["kl_weights"][done].mean().item()) and "prioritized_beta" not in logged


def test_a_rule_s_bad_weights_stop_the_step_in_one_line(pretrained_run, tmp_path):
    def negative(stats, token_ids, completion_mask):
        return -stats.certainty

    trainer, dataset = make_trainer(pretrained_run, tmp_path, PrioritizedGRPOTrainer, PrioritizedGRPOConfig, kl_weights=negative)
    with pytest.raises(UserError, match="custom:.*negative weight"):
        trainer._generate_and_score_completions([dataset[0]] * 4)


def test_weights_are_c_to_the_beta_and_replace_trls_kl_term(pretrained_run, tmp_path):
    beta = 2.0  # a micro model is far from confident: c is about 0.1-0.3, so the paper's 150 would give w = 0
    ours, dataset = make_trainer(pretrained_run, tmp_path, PrioritizedGRPOTrainer, PrioritizedGRPOConfig,
                                 prioritized_beta=beta, loss_type="bnpo")
    plain, _ = make_trainer(pretrained_run, tmp_path, GRPOTrainer, GRPOConfig, loss_type="bnpo")
    torch.manual_seed(0)
    inputs = ours._generate_and_score_completions([dataset[0]] * 4)
    done = inputs["completion_mask"].bool()  # (B, T)

    # By hand: c = 1 + log(max_a softmax(z / 4)_a) / log|V| at the state before each completion token.
    c, _ = reference_by_hand(ours, inputs)
    torch.testing.assert_close(inputs["kl_weights"][done], (c**beta)[done])
    assert 0 < inputs["kl_weights"][done].min() < inputs["kl_weights"][done].max() < 1

    # The loss is TRL's with beta * k3 replaced by beta * w * k3 (bnpo: a mean over the tokens).
    perturb_policies(ours, plain)
    ours_loss, plain_loss = ours._compute_loss(ours.model, inputs), plain._compute_loss(plain.model, inputs)
    d = inputs["ref_per_token_logps"] - ours._policy_logprobs.detach()
    k3 = torch.exp(d) - d - 1
    expected = BETA * ((inputs["kl_weights"] - 1) * k3)[done].mean()
    assert expected.abs() > 1e-5
    torch.testing.assert_close(ours_loss - plain_loss, expected, atol=1e-6, rtol=1e-4)


def test_the_reference_pass_in_chunks_of_positions_equals_the_whole_logits(pretrained_run, tmp_path):
    """The reference pass never holds the (B, T, V) logits: it applies the LM head, the temperature, the
    log-softmax and the certainty to chunks of positions. In chunks of a size below T that does not divide
    it (and 3 sequences at a time out of 4), it gives the log-probs, the certainty and the entropy of one chunk, and
    those of the model's whole logits."""
    from critical_tokens.policy import entropy_from_logits, token_logprobs
    from critical_tokens.trl import REFERENCE_CHUNK_ELEMENTS

    trainer, dataset = make_trainer(pretrained_run, tmp_path, PrioritizedGRPOTrainer, PrioritizedGRPOConfig, prioritized_beta=2.0)
    torch.manual_seed(0)
    inputs = trainer._generate_and_score_completions([dataset[0]] * 4)
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    P, T = inputs["prompt_ids"].shape[1], inputs["completion_ids"].shape[1]
    V = trainer.ref_model.get_output_embeddings().weight.shape[0]
    assert T >= 3 and REFERENCE_CHUNK_ELEMENTS // (4 * V) >= T  # by default, one chunk here
    trainer.temperature = 0.7  # TRL's sampling temperature, which its reference log-probs use
    both = {"certainty", "entropy"}
    whole = trainer._reference_logprobs_and_stats(trainer.ref_model, ids, mask, T, needs=both)
    trainer.reference_chunk_size = T // 2 + 1  # < T, and does not divide T
    assert T % trainer.reference_chunk_size != 0
    chunked = trainer._reference_logprobs_and_stats(trainer.ref_model, ids, mask, T, batch_size=3, needs=both)
    for a, b in zip((chunked[0], chunked[1].certainty, chunked[1].entropy), (whole[0], whole[1].certainty, whole[1].entropy)):
        assert a.shape == b.shape == (4, T)
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    with torch.no_grad():  # the whole logits, as the model's forward gives them
        logits = trainer.ref_model(input_ids=ids, attention_mask=mask).logits[:, P - 1 : -1]  # (B, T, V)
    torch.testing.assert_close(chunked[0], token_logprobs(logits / 0.7, inputs["completion_ids"]), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(chunked[1].certainty, kl.certainty(logits, "max_prob", 4.0), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(chunked[1].entropy, entropy_from_logits(logits / 0.7), atol=1e-5, rtol=1e-5)  # at TRL's temperature


@pytest.mark.parametrize("family, cast_lm_head_to_fp32", [("qwen2", False), ("qwen2", True), ("gemma2", False)])
def test_the_chunked_reference_pass_gives_the_models_own_logits(family, cast_lm_head_to_fp32):
    """Other model families, built small with random weights: Qwen2 (tied embeddings; also with TRL's
    cast_lm_head_to_fp32) and Gemma2, whose forward soft-caps its logits (a cap of 0.5 here, so that it
    matters). The reference pass, which applies the LM head itself (and the cap, found as TRL finds it), in
    chunks of 3 of 7 positions, gives the log-probs and certainty of the model's own logits."""
    from types import SimpleNamespace

    import transformers
    from accelerate import Accelerator

    from critical_tokens.policy import token_logprobs
    from critical_tokens.trl import _PrioritizedKLMixin

    torch.manual_seed(0)
    small = dict(vocab_size=503, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=8, max_position_embeddings=64)
    if family == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**small, tie_word_embeddings=True))
    else:
        model = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**small, final_logit_softcapping=0.5, sliding_window=16))
    model.eval()
    with torch.no_grad():  # larger logits than the initialization's, so that the cap and the temperatures matter
        model.get_output_embeddings().weight.mul_(20.0)
    ids = torch.randint(0, 503, (3, 12))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # a left-padded prompt
    T = 7
    trainer = SimpleNamespace(accelerator=Accelerator(cpu=True), temperature=0.7, reference_chunk_size=3,
                              args=SimpleNamespace(certainty="negentropy", certainty_temperature=4.0, cast_lm_head_to_fp32=cast_lm_head_to_fp32))
    logprobs, stats = _PrioritizedKLMixin._reference_logprobs_and_stats(trainer, model, ids, mask, T, batch_size=2)
    certainty = stats.certainty
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits[:, -T - 1 : -1]  # (B, T, V)
    if family == "gemma2":
        assert logits.abs().max() <= 0.5  # capped
    torch.testing.assert_close(logprobs, token_logprobs(logits / 0.7, ids[:, -T:]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(certainty, kl.certainty(logits, "negentropy", 4.0), atol=1e-5, rtol=1e-5)


def test_a_short_run_moves_the_policy_not_the_reference(pretrained_run, tmp_path):
    trainer, _ = make_trainer(pretrained_run, tmp_path, PrioritizedGRPOTrainer, PrioritizedGRPOConfig, prioritized_beta="auto")
    policy_before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    ref_before = {k: v.clone() for k, v in trainer.ref_model.state_dict().items()}
    trainer.train()
    assert any(not torch.equal(v, policy_before[k]) for k, v in trainer.model.state_dict().items()), "the policy did not move"
    for k, v in trainer.ref_model.state_dict().items():
        assert torch.equal(v, ref_before[k]), f"reference parameter {k} changed"
    logged = [entry for entry in trainer.state.log_history if "kl_weight/mean" in entry]
    assert len(logged) == 2 and all(0 <= e["kl_weight/mean"] <= 1 and e["prioritized_beta"] > 0 for e in logged)


def test_config_takes_a_rule_or_its_text_and_saves_its_text(tmp_path):
    import json

    def config(**options):
        return PrioritizedGRPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", **options)

    assert config().kl_weights == prioritized(150) and config(prioritized_beta="auto").kl_weights == prioritized("auto")
    rule = config(kl_weights="prioritized:8*ignore:=,+").kl_weights
    assert rule == prioritized(8) * ignore_tokens(["=", "+"])
    assert json.loads(config(kl_weights=rule).to_json_string())["kl_weights"] == "prioritized:8*ignore:=,+"
    with pytest.raises(ValueError, match="not both"):
        config(kl_weights=uniform(1), prioritized_beta=8)
    with pytest.raises(UserError, match="unknown rule 'priority'"):
        config(kl_weights="priority:8")
    from transformers import HfArgumentParser  # TRL's command line: the rule as text

    (parsed,) = HfArgumentParser(PrioritizedGRPOConfig).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--use_cpu", "true", "--report_to", "none", "--kl_weights", "uniform:0.5*ignore_ids:3"])
    assert parsed.kl_weights == uniform(0.5) * ignore_tokens([3])


@pytest.mark.parametrize("options, message", [
    ({"prioritized_beta": -1}, "prioritized_beta"),
    ({"prioritized_beta": "big"}, "prioritized_beta"),
    ({"prioritized_beta": float("inf")}, "prioritized_beta"),  # weight 0 wherever c < 1: no KL at all
    ({"prioritized_beta": "nan"}, "prioritized_beta"),
    ({"beta": float("nan")}, "beta must be a finite number"),  # TRL's KL coefficient: NaN made every weight NaN
    ({"beta": -1.0}, "beta must be >= 0"),
    ({"kl_coef": -1.0}, "kl_coef must be >= 0"),
    ({"kl_coef": 0.5, "beta": 0.2}, "give the KL coefficient once"),
    ({"certainty_temperature": float("nan")}, "certainty_temperature"),
    ({"auto_beta_quantile": 1.0}, "auto_beta_quantile"),
    ({"certainty": "entropy"}, "certainty"),
    ({"kl_estimator": "k4"}, "kl_estimator"),
    ({"loss_type": "unknown"}, "loss_type"),
])
def test_config_rejects_bad_options(tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        PrioritizedGRPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", **options)


@pytest.mark.parametrize("config_class", [PrioritizedGRPOConfig, PrioritizedRLOOConfig])
def test_kl_coef_is_the_kl_coefficient_handed_to_trl_as_beta(tmp_path, config_class):
    """The project names TRL's KL coefficient kl_coef; TRL's trainers read args.beta, and TRL's name still works."""
    def config(**options):
        return config_class(output_dir=str(tmp_path), use_cpu=True, report_to="none", **options)

    assert (config(kl_coef=0.3).beta, config(kl_coef=0.3).kl_coef) == (0.3, 0.3)
    assert (config(beta=0.3).beta, config(beta=0.3).kl_coef) == (0.3, 0.3)
    default = config()
    assert default.kl_coef == default.beta == config_class.beta  # TRL's default (GRPO 0, RLOO 0.05)
    assert config(kl_coef=0.0).beta == 0.0  # 0 disables the KL, as TRL's beta=0


@pytest.mark.parametrize("beta", ["0", "8", "150", "auto", "-1", "inf", "nan", "x", "1e400"])
def test_the_trl_config_and_the_rl_command_agree_on_beta(tmp_path, beta):
    """One check of beta (checks.parse_beta) behind both: a value one takes, the other takes."""
    from critical_tokens.rl.config import RLConfig, validate

    def accepted(make) -> bool:
        try:
            make()
            return True
        except (ValueError, UserError):
            return False

    trl_takes = accepted(lambda: PrioritizedGRPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", prioritized_beta=beta))
    rl_takes = accepted(lambda: validate(RLConfig(pretrained="run", beta=beta)))
    assert trl_takes == rl_takes == (beta in ("0", "8", "150", "auto"))


@pytest.mark.parametrize("example", ["trl_grpo_prioritized.py", "trl_rloo_prioritized.py"])
def test_the_example_runs_from_another_directory(tmp_path, example):
    """examples/trl_grpo_prioritized.py and trl_rloo_prioritized.py on the shipped regime model, one step of
    2 completions at learning rate 0: the model does not move, so its held-out accuracy after equals the one
    before (the script evaluates in evaluation mode, not in the training mode with gradient checkpointing TRL
    leaves), greedy and sampled (the same random numbers before and after); the run writes them to
    result.json and TRL's metrics to metrics.jsonl."""
    import json
    import re
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "examples" / example
    result = subprocess.run([sys.executable, str(script), "--max-steps", "1", "--num-generations", "2", "--eval-examples", "16",
                             "--lr", "0", "--out", "run"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "step 1/1: reward" in result.stdout and "mean weight" in result.stdout
    assert (tmp_path / "run" / "model" / "model.safetensors").exists()
    greedy_before, greedy_after, sampled_before, sampled_after = re.search(
        r"16 held-out 4-digit additions, before -> after: greedy ([\d.]+)% -> ([\d.]+)%, sampled .*\) ([\d.]+)% -> ([\d.]+)%", result.stdout).groups()
    assert greedy_before == greedy_after and float(greedy_before) > 0  # the regime model gets some right
    assert sampled_before == sampled_after  # the same random numbers, the same model
    result_json = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result_json["before"] == result_json["after"] and result_json["after"]["greedy"] == pytest.approx(float(greedy_after) / 100, abs=5e-4)
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2  # step 1's metrics, then the Trainer's summary
    on_critical, elsewhere = map(float, re.search(r"critical tokens: ([\d.]+), on the other tokens: ([\d.]+)", result.stdout).groups())
    assert on_critical < elsewhere  # the reference is less certain on the critical tokens: the penalty is lighter there


def test_the_kl_weights_example_runs_both_rules(tmp_path):
    """examples/trl_kl_weights.py at tiny size (one step of 2 completions per rule, learning rate 0): both runs
    train and report; the per-class table gives the ignored separators weight 0 (and so no charged KL), the
    digits weight 1, and under prioritized(8) the critical tokens a lighter weight than the rest; the policy
    did not move, so its KL to the reference is 0 in every class."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "examples" / "trl_kl_weights.py"
    result = subprocess.run([sys.executable, str(script), "--max-steps", "1", "--num-generations", "2", "--eval-examples", "8",
                             "--lr", "0", "--out", "run"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("step 1/1: reward") == 2 and result.stdout.count("per token class") == 2
    tables = json.loads((tmp_path / "run" / "kl_by_class.json").read_text())["rules"]
    assert list(tables) == [r"ignore:\x20,\,,\n", "prioritized:8"]
    ignored, weighted = tables.values()
    assert ignored["separator"]["weight"] == 0 and ignored["separator"]["weighted_kl"] == 0 and ignored["digit"]["weight"] == 1
    assert ignored["separator"]["share"] > 0 and sum(row["share"] for row in ignored.values()) == pytest.approx(1)
    assert weighted["critical"]["weight"] < min(weighted[name]["weight"] for name in ("digit", "separator", "other"))
    assert all(abs(row["kl"]) < 1e-6 for table in tables.values() for row in table.values())
    assert all((tmp_path / "run" / arm / "model" / "model.safetensors").exists() for arm in ("ignore", "prioritized"))


@pytest.mark.parametrize("options, message", [(["--pretrained", "no-such-run"], "does not exist"),
                                              (["--prioritized-beta", "abc"], "--prioritized-beta must be"),
                                              (["--kl-coef", "nan"], "--kl-coef must be a finite number")])
def test_the_example_refuses_bad_input_in_one_line(tmp_path, options, message):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "examples" / "trl_grpo_prioritized.py"
    result = subprocess.run([sys.executable, str(script), "--eval-examples", "0", *options], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: ") and message in result.stderr


def test_the_prioritized_penalty_combines_with_trls_high_entropy_mask(pretrained_run, tmp_path):
    """TRL's top_entropy_quantile (the 80/20 rule) masks the policy-gradient term to the high-entropy
    tokens and leaves its KL term on every token. With it on in both trainers, our loss still differs
    from TRL's by exactly beta * mean((w - 1) k3) over all the completion tokens (bnpo): the entropy
    mask acts on the PG term alone, the prioritized weights on the KL term alone."""
    options = dict(loss_type="bnpo", top_entropy_quantile=0.25)
    ours, dataset = make_trainer(pretrained_run, tmp_path, PrioritizedGRPOTrainer, PrioritizedGRPOConfig, prioritized_beta=2.0, **options)
    plain, _ = make_trainer(pretrained_run, tmp_path, GRPOTrainer, GRPOConfig, **options)
    torch.manual_seed(0)
    inputs = ours._generate_and_score_completions([dataset[0]] * 4)
    done = inputs["completion_mask"].bool()
    perturb_policies(ours, plain)
    ours_loss, plain_loss = ours._compute_loss(ours.model, inputs), plain._compute_loss(plain.model, inputs)
    d = inputs["ref_per_token_logps"] - ours._policy_logprobs.detach()
    expected = BETA * ((inputs["kl_weights"] - 1) * (torch.exp(d) - d - 1))[done].mean()
    assert expected.abs() > 1e-5
    torch.testing.assert_close(ours_loss - plain_loss, expected, atol=1e-6, rtol=1e-4)


def test_lora_the_reference_is_the_base_model_and_only_the_adapters_train(pretrained_run, tmp_path):
    """With a LoRA adapter (TRL's peft_config) TRL keeps no reference model: its reference is the policy
    with the adapters disabled. The prioritized reference pass runs in that state: with the adapters moved
    away from 0 (so that the policy is not the base model), the reference log-probs and the weights the
    trainer computed are the base model's, not the policy's. Then two training steps move the adapters and
    leave the base weights as they were."""
    peft = pytest.importorskip("peft")
    beta = 2.0
    lora = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["c_attn"], fan_in_fan_out=True)  # GPT-2's Conv1D
    trainer, dataset = make_trainer(pretrained_run, tmp_path, PrioritizedGRPOTrainer, PrioritizedGRPOConfig, peft_config=lora,
                                    prioritized_beta=beta, loss_type="bnpo")
    assert trainer.ref_model is None and trainer._tuner_layers
    base, _, _ = load_pretrained(pretrained_run)  # the base model, separately
    base.eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # LoRA's B starts at 0, where the policy is the base model; move it
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=generator))
    torch.manual_seed(0)
    inputs = trainer._generate_and_score_completions([dataset[0]] * 4)
    done = inputs["completion_mask"].bool()
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    P = inputs["prompt_ids"].shape[1]

    def logits_and_logprobs(model):
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits[:, P - 1 : -1]  # (B, T, V)
        return logits, torch.log_softmax(logits, -1).gather(-1, inputs["completion_ids"].unsqueeze(-1)).squeeze(-1)

    base_logits, base_logprobs = logits_and_logprobs(base)
    _, policy_logprobs = logits_and_logprobs(trainer.model)
    assert (policy_logprobs - base_logprobs)[done].abs().max() > 1e-2  # the adapters change the model
    torch.testing.assert_close(inputs["ref_per_token_logps"][done], base_logprobs[done], atol=1e-5, rtol=1e-5)
    c = 1 + torch.log(torch.softmax(base_logits / 4.0, -1).max(-1).values) / math.log(base_logits.shape[-1])
    torch.testing.assert_close(inputs["kl_weights"][done], (c**beta)[done])
    assert trainer.model.active_adapter == "default" and not any(layer.disable_adapters for layer in trainer._tuner_layers)

    # The loss is TRL's with beta * k3 replaced by beta * w * k3, against the base model (bnpo: a mean).
    loss = trainer._compute_loss(trainer.model, inputs)
    d = inputs["ref_per_token_logps"] - trainer._policy_logprobs.detach()
    assert (d[done].abs() > 1e-3).any()
    with torch.no_grad():
        plain = GRPOTrainer._compute_loss(trainer, trainer.model, inputs)
    expected = BETA * ((inputs["kl_weights"] - 1) * (torch.exp(d) - d - 1))[done].mean()
    torch.testing.assert_close(loss.detach() - plain, expected, atol=1e-6, rtol=1e-4)

    # Two steps: the adapters move, the base weights do not.
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    after = trainer.model.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all("lora_" in k for k in moved), sorted(moved)[:5]
    assert any("lora_A" in k for k in moved) and any("lora_B" in k for k in moved)
    logged = [entry for entry in trainer.state.log_history if "kl_weight/mean" in entry]
    assert len(logged) == 2 and all(0 < e["kl_weight/mean"] < 1 for e in logged)


def test_lora_a_given_peft_model_is_its_own_reference(pretrained_run, tmp_path):
    """A PeftModel passed as the model (a pre-trained adapter): TRL copies its adapter into an adapter
    "ref" and takes the policy with that one active as the reference. The prioritized reference pass
    runs with it: at the start the reference log-probs are the policy's, not the base model's."""
    peft = pytest.importorskip("peft")
    from trl.trainer.utils import use_adapter

    model, tokenizer, n_digits = load_pretrained(pretrained_run)
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["c_attn"], fan_in_fan_out=True))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a "pre-trained" adapter: not the base model
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=generator))
    pairs = addition.rl_pairs(n_digits, 1, 4, seed=0)
    dataset = Dataset.from_dict({"prompt": [addition.prompt(a, b) for a, b in pairs], "a": [a for a, _ in pairs], "b": [b for _, b in pairs]})
    args = PrioritizedGRPOConfig(output_dir=str(tmp_path / "peft"), per_device_train_batch_size=4, num_generations=4, max_completion_length=12,
                                 beta=BETA, max_steps=1, save_strategy="no", report_to="none", use_cpu=True, bf16=False, seed=0,
                                 disable_tqdm=True, prioritized_beta=2.0)
    threads = torch.get_num_threads()
    trainer = PrioritizedGRPOTrainer(model=model, reward_funcs=addition_reward, args=args, train_dataset=dataset, processing_class=tokenizer)
    torch.set_num_threads(threads)
    assert "ref" in trainer.model.peft_config and trainer.ref_model is None
    torch.manual_seed(0)
    inputs = trainer._generate_and_score_completions([dataset[0]] * 4)
    done = inputs["completion_mask"].bool()
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    T = inputs["completion_ids"].shape[1]
    policy = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, T)[0]
    with use_adapter(trainer.model, adapter_name=None):  # adapters disabled: the base model
        base = GRPOTrainer._get_per_token_logps_and_entropies(trainer, trainer.model, ids, mask, T)[0]
    torch.testing.assert_close(inputs["ref_per_token_logps"][done], policy[done], atol=1e-5, rtol=1e-5)
    assert (inputs["ref_per_token_logps"] - base)[done].abs().max() > 1e-2
    assert trainer.model.active_adapter == "default"



def launch_two_processes(script, arguments, cwd):
    """`accelerate launch --multi_gpu --num_processes 2 SCRIPT ARGUMENTS` on the CPU (torchrun and gloo;
    `--cpu`, or no GPU, would start a single process), one thread each, on a free port."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port), str(script), *arguments]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("algorithm, rule", [("grpo", None), ("rloo", None), ("grpo", "prioritized:auto*entropy_quantile:0.25")])
def test_two_processes_calibrate_one_beta_on_the_tokens_of_both(pretrained_run, tmp_path, algorithm, rule):
    """Two processes (launch_two_processes), 2 steps of prioritized_beta='auto' (tests/trl_two_processes.py):
    each process samples its own prompts, yet both use the same beta, calibrated on the certainties of both
    processes' first batches together, which neither process's own certainties give; the logged weight
    statistics are the same on both. With the rule prioritized('auto') * entropy_quantile(0.25), the entropy
    threshold is also over both processes' tokens: w = c^beta below it, 0 at or above it, on each."""
    import json
    from pathlib import Path

    from critical_tokens.kl import calibrate_beta

    helper = Path(__file__).parent / "trl_two_processes.py"
    result = launch_two_processes(helper, ["--pretrained", str(pretrained_run), "--out", str(tmp_path), "--trainer", algorithm, "--steps", "2",
                                           *(["--kl-weights", rule] if rule else [])], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert ranks[0]["beta"] == ranks[1]["beta"] > 0
    both = torch.tensor(ranks[0]["first_certainty"] + ranks[1]["first_certainty"])
    assert ranks[0]["beta"] == pytest.approx(calibrate_beta(both, 0.05, 0.5), rel=1e-6)
    own = [calibrate_beta(torch.tensor(r["first_certainty"]), 0.05, 0.5) for r in ranks]
    assert abs(own[0] - own[1]) > 1e-3  # the processes' batches differ: each alone would calibrate another beta
    assert len(ranks[0]["logged"]) == 2 and ranks[0]["logged"] == ranks[1]["logged"]
    assert all(entry["prioritized_beta"] == ranks[0]["beta"] for entry in ranks[0]["logged"])
    if rule:
        theta = torch.quantile(torch.tensor(ranks[0]["first_entropy"] + ranks[1]["first_entropy"]), 0.75)
        for r in ranks:
            c, h = torch.tensor(r["first_certainty"]), torch.tensor(r["first_entropy"])
            torch.testing.assert_close(torch.tensor(r["first_weights"]), torch.where(h < theta, c ** r["beta"], 0.0))
        own = [torch.quantile(torch.tensor(r["first_entropy"]), 0.75) for r in ranks]
        assert own[0] != own[1]  # each process alone would free other tokens


def test_the_example_under_two_processes_prints_and_saves_once(tmp_path):
    """examples/trl_grpo_prioritized.py under 2 processes (launch_two_processes), one step at learning rate 0:
    both train, the main one alone prints, saves the model and its tokenizer, and evaluates; the accuracy is
    unchanged."""
    import re
    from pathlib import Path

    script = Path(__file__).parents[1] / "examples" / "trl_grpo_prioritized.py"
    result = launch_two_processes(script, ["--max-steps", "1", "--num-generations", "2", "--eval-examples", "8", "--lr", "0", "--out", "run"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("2 process(es)") == 1 and result.stdout.count("step 1/1: reward") == 1
    greedy_before, greedy_after = re.search(r"before -> after: greedy ([\d.]+)% -> ([\d.]+)%", result.stdout).groups()
    assert result.stdout.count("before -> after") == 1 and greedy_before == greedy_after
    assert (tmp_path / "run" / "model" / "model.safetensors").exists() and (tmp_path / "run" / "model" / "tokenizer.json").exists()


# --- RLOO: the weighted KL in the reward ---------------------------------------------------------------
def rloo_pair(pretrained_run, tmp_path, **options):
    """Our RLOO trainer with ``options`` and TRL's, on the same micro model, their policies perturbed alike;
    each scores the same 4 completions of one prompt (same seed, same model: the same samples)."""
    ours, dataset = make_trainer(pretrained_run, tmp_path, PrioritizedRLOOTrainer, PrioritizedRLOOConfig, **options)
    plain, _ = make_trainer(pretrained_run, tmp_path, RLOOTrainer, RLOOConfig)
    perturb_policies(ours, plain)
    outputs = []
    for trainer in (ours, plain):
        torch.manual_seed(0)
        outputs.append(trainer._generate_and_score_completions([dataset[0]] * 4))
    assert torch.equal(outputs[0]["completion_ids"], outputs[1]["completion_ids"])
    return ours, plain, *outputs


@pytest.mark.parametrize("options", [{"prioritized_beta": 0.0}, {"kl_weights": uniform(1)}], ids=["beta0", "uniform1"])
def test_rloo_weights_one_give_exactly_trls_rewards_and_loss(pretrained_run, tmp_path, options):
    ours, plain, inputs, plain_inputs = rloo_pair(pretrained_run, tmp_path, **options)
    mode = "train" if ours.model.training else "eval"
    assert ours._metrics[mode]["kl"] == plain._metrics[mode]["kl"] and abs(plain._metrics[mode]["kl"][0]) > 1e-4
    assert ours._metrics[mode]["kl_unweighted"] == plain._metrics[mode]["kl"]
    assert torch.equal(inputs["advantages"], plain_inputs["advantages"])
    assert torch.equal(inputs["old_logps"], plain_inputs["old_logps"])
    assert torch.equal(ours._compute_loss(ours.model, inputs), plain._compute_loss(plain.model, plain_inputs))


@pytest.mark.parametrize("digits_ignored", [False, True])
def test_rloo_the_weights_reach_the_reward(pretrained_run, tmp_path, tokenizer, digits_ignored):
    """prioritized_beta 2 (or kl_weights = prioritized(2) * ignore_tokens(the digits)): each completion's
    reward changes by -beta * sum_t (w_t - 1) k1_t (w = c^2 by hand from the reference's logits, 0 on the
    digits), and so its leave-one-out advantage by that change minus the mean of the others' changes."""
    beta = 2.0
    options = {"kl_weights": prioritized(beta) * ignore_tokens(DIGITS)} if digits_ignored else {"prioritized_beta": beta}
    ours, plain, inputs, plain_inputs = rloo_pair(pretrained_run, tmp_path, **options)
    done = inputs["completion_mask"].bool()  # (B, T)
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    P, T = inputs["prompt_ids"].shape[1], inputs["completion_ids"].shape[1]
    with torch.no_grad():
        logits = plain.ref_model(input_ids=ids, attention_mask=mask).logits[:, P - 1 : -1]  # (B, T, V)
        ref = RLOOTrainer._get_per_token_logps_and_entropies(plain, plain.ref_model, ids, mask, T)[0]  # TRL's
        old = RLOOTrainer._get_per_token_logps_and_entropies(plain, plain.model, ids, mask, T)[0]
    w = (1 + torch.log(torch.softmax(logits / 4.0, -1).max(-1).values) / math.log(logits.shape[-1])) ** beta
    assert 0 < w[done].min() < w[done].max() < 1
    if digits_ignored:
        digit = torch.isin(inputs["completion_ids"], torch.tensor(tokenizer.convert_tokens_to_ids(DIGITS)))
        assert (digit & done).any()
        w = torch.where(digit, 0.0, w)
    change = -BETA * ((w - 1) * (old - ref) * done).sum(-1)  # (B,): our reward minus TRL's
    assert change.abs().max() > 1e-4
    expected = change - (change.sum() - change) / (len(change) - 1)  # leave-one-out: one group of 4
    torch.testing.assert_close(inputs["advantages"] - plain_inputs["advantages"], expected, atol=1e-5, rtol=1e-4)
    mode = "train" if ours.model.training else "eval"  # TRL's kl metric is the weighted one, kl_unweighted is TRL's
    torch.testing.assert_close(ours._metrics[mode]["kl_unweighted"][0], plain._metrics[mode]["kl"][0], atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(ours._metrics[mode]["kl"][0], ((w * (old - ref))[done].mean()).item(), atol=1e-6, rtol=1e-4)


def test_rloo_a_short_run_moves_the_policy_not_the_reference(pretrained_run, tmp_path):
    trainer, _ = make_trainer(pretrained_run, tmp_path, PrioritizedRLOOTrainer, PrioritizedRLOOConfig, prioritized_beta="auto",
                              kl_estimator="k2")
    perturb_policies(trainer)  # at step 0 the micro model gets every addition wrong: the KL gives the rewards their spread
    policy_before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    ref_before = {k: v.clone() for k, v in trainer.ref_model.state_dict().items()}
    trainer.train()
    assert any(not torch.equal(v, policy_before[k]) for k, v in trainer.model.state_dict().items()), "the policy did not move"
    for k, v in trainer.ref_model.state_dict().items():
        assert torch.equal(v, ref_before[k]), f"reference parameter {k} changed"
    logged = [entry for entry in trainer.state.log_history if "kl_weight/mean" in entry]
    assert len(logged) == 2 and all(0 <= e["kl_weight/mean"] <= 1 and e["prioritized_beta"] > 0 and "kl_unweighted" in e for e in logged)


@pytest.mark.parametrize("options", [{"prioritized_beta": -1}, {"certainty": "entropy"}, {"kl_estimator": "k4"}, {"beta": float("nan")}])
def test_rloo_config_rejects_bad_options(tmp_path, options):
    with pytest.raises(ValueError, match=next(iter(options))):
        PrioritizedRLOOConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", **options)
    assert PrioritizedRLOOConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none").kl_estimator == "k1"  # TRL's RLOO


def test_rloo_with_lora_takes_the_kl_to_the_base_model(pretrained_run, tmp_path):
    """RLOO with a LoRA adapter (peft_config): the certainty and the KL in the reward are against the
    base model (the policy with its adapters disabled, TRL's reference), not against the policy."""
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["c_attn"], fan_in_fan_out=True)
    trainer, dataset = make_trainer(pretrained_run, tmp_path, PrioritizedRLOOTrainer, PrioritizedRLOOConfig, peft_config=lora,
                                    prioritized_beta=2.0)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # move LoRA's B away from 0, so that the policy is not the base model
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=generator))
    torch.manual_seed(0)
    inputs = trainer._generate_and_score_completions([dataset[0]] * 4)
    done = inputs["completion_mask"].bool()
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    P = inputs["prompt_ids"].shape[1]
    base, _, _ = load_pretrained(pretrained_run)
    with torch.no_grad():
        logits = base.eval()(input_ids=ids, attention_mask=mask).logits[:, P - 1 : -1]  # (B, T, V)
    base_logprobs = torch.log_softmax(logits, -1).gather(-1, inputs["completion_ids"].unsqueeze(-1)).squeeze(-1)
    c = 1 + torch.log(torch.softmax(logits / 4.0, -1).max(-1).values) / math.log(logits.shape[-1])
    torch.testing.assert_close(trainer._ref_certainty[done], c[done])
    k1 = trainer._policy_logprobs - base_logprobs  # the policy pass TRL ran just before the reference pass
    assert k1[done].abs().max() > 1e-2
    mode = "train" if trainer.model.training else "eval"
    torch.testing.assert_close(trainer._metrics[mode]["kl_unweighted"][0], k1[done].mean().item(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(trainer._metrics[mode]["kl"][0], (c**2 * k1)[done].mean().item(), atol=1e-5, rtol=1e-4)


def test_another_trl_version_is_refused_at_import_with_the_fix(monkeypatch):
    """The plug-in overrides TRL's reference pass: under a TRL it was not tested with, importing it
    fails at once with the version found and the pip command, not deep inside a training step."""
    import importlib
    import sys

    import trl as trl_package

    monkeypatch.setattr(trl_package, "__version__", "1.20.0")
    monkeypatch.delitem(sys.modules, "critical_tokens.trl")
    with pytest.raises(ImportError, match=r"found TRL 1\.20\.0: pip install 'trl>=1\.16,<1\.17'"):
        importlib.import_module("critical_tokens.trl")
