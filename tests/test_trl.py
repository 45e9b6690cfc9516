"""The TRL plug-in: prioritized_beta 0 gives exactly TRL's loss on the same batch; the weights are c^beta
computed by hand; the loss changes by beta * (w - 1) * k3 and nothing else; a short run moves the policy
and leaves the reference frozen. A micro model, 12-token completions, 4 per prompt: a few seconds."""

import math

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("datasets")

from datasets import Dataset  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from critical_tokens import addition  # noqa: E402
from critical_tokens.model import load_pretrained  # noqa: E402
from critical_tokens.trl import PrioritizedGRPOConfig, PrioritizedGRPOTrainer  # noqa: E402

BETA = 0.1  # TRL's KL coefficient


def addition_reward(completions, a, b, **kwargs):
    return [1.0 if addition.is_correct(x, y, text) else -1.0 for x, y, text in zip(a, b, completions)]


def make_trainer(pretrained_run, tmp_path, trainer_class, config_class, **options):
    model, tokenizer, n_digits = load_pretrained(pretrained_run)
    pairs = addition.rl_pairs(n_digits, 1, 4, seed=0)
    dataset = Dataset.from_dict({"prompt": [addition.prompt(a, b) for a, b in pairs], "a": [a for a, _ in pairs], "b": [b for _, b in pairs]})
    args = config_class(output_dir=str(tmp_path / config_class.__name__), per_device_train_batch_size=4, num_generations=4,
                        max_completion_length=12, temperature=1.0, beta=BETA, learning_rate=1e-2, max_steps=2, logging_steps=1,
                        save_strategy="no", report_to="none", use_cpu=True, bf16=False, seed=0, disable_tqdm=True,
                        dataloader_num_workers=0, **options)
    threads = torch.get_num_threads()
    trainer = trainer_class(model=model, reward_funcs=addition_reward, args=args, train_dataset=dataset, processing_class=tokenizer)
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


def test_prioritized_beta_zero_gives_exactly_trls_loss(pretrained_run, tmp_path):
    ours, dataset = make_trainer(pretrained_run, tmp_path, PrioritizedGRPOTrainer, PrioritizedGRPOConfig, prioritized_beta=0.0)
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


def test_weights_are_c_to_the_beta_and_replace_trls_kl_term(pretrained_run, tmp_path):
    beta = 2.0  # a micro model is far from confident: c is about 0.1-0.3, so the paper's 150 would give w = 0
    ours, dataset = make_trainer(pretrained_run, tmp_path, PrioritizedGRPOTrainer, PrioritizedGRPOConfig,
                                 prioritized_beta=beta, loss_type="bnpo")
    plain, _ = make_trainer(pretrained_run, tmp_path, GRPOTrainer, GRPOConfig, loss_type="bnpo")
    torch.manual_seed(0)
    inputs = ours._generate_and_score_completions([dataset[0]] * 4)
    done = inputs["completion_mask"].bool()  # (B, T)

    # By hand: c = 1 + log(max_a softmax(z / 4)_a) / log|V| at the state before each completion token.
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    P = inputs["prompt_ids"].shape[1]
    with torch.no_grad():
        logits = ours.ref_model(input_ids=ids, attention_mask=mask).logits[:, P - 1 : -1]  # (B, T, V)
    c = 1 + torch.log(torch.softmax(logits / 4.0, -1).max(-1).values) / math.log(logits.shape[-1])
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


@pytest.mark.parametrize("options, message", [
    ({"prioritized_beta": -1}, "prioritized_beta"),
    ({"prioritized_beta": "big"}, "prioritized_beta"),
    ({"certainty": "entropy"}, "certainty"),
    ({"kl_estimator": "k4"}, "kl_estimator"),
    ({"loss_type": "unknown"}, "loss_type"),
])
def test_config_rejects_bad_options(tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        PrioritizedGRPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", **options)


def test_the_example_runs_from_another_directory(tmp_path):
    """examples/trl_grpo_prioritized.py on the shipped regime model, one step of 2 completions at learning
    rate 0: the model does not move, so its held-out accuracy after equals the one before (the script
    evaluates in evaluation mode, not in the training mode with gradient checkpointing TRL leaves)."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "examples" / "trl_grpo_prioritized.py"
    result = subprocess.run([sys.executable, str(script), "--max-steps", "1", "--num-generations", "2", "--eval-examples", "16",
                             "--lr", "0", "--out", "run"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "step 1: reward" in result.stdout and "mean weight" in result.stdout
    assert (tmp_path / "run" / "model" / "model.safetensors").exists()
    before, after = re.search(r"16 held-out 4-digit additions: ([\d.]+)% before, ([\d.]+)% after", result.stdout).groups()
    assert before == after and float(before) > 0  # the regime model gets some right


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
