"""Fine-tune the shipped regime model (N = 3) on (N+1)-digit additions with TRL's RLOO and the prioritized KL penalty.

    pip install -e ".[trl]"      # in a clone of this repository
    python examples/trl_rloo_prioritized.py --max-steps 2        # a minute or two on 2 CPU cores
    python examples/trl_rloo_prioritized.py --max-steps 200 --out runs/trl-rloo-prioritized

The reward is the project's grader (+1 if the result line is the true sum, else -1; docs/method.md section 4).
TRL's RLOO takes beta * (the KL summed over the completion's tokens) out of each completion's reward; here
each token's KL is weighted by w = c^prioritized_beta before the sum. The only change from a plain TRL
script is the config and the trainer class:

    RLOOConfig(beta=...)   ->  PrioritizedRLOOConfig(beta=..., prioritized_beta=10, kl_estimator="k2")
    RLOOTrainer(...)       ->  PrioritizedRLOOTrainer(...)

Each step samples --num-generations completions of one prompt (RLOO's group: each completion's baseline
is the mean reward of the others). One prompt per step also means no left
padding: TRL scores completions with positions 0..L-1, while `generate` counts positions from the
first real token, so with padding a GPT-2 (absolute positions) would be scored at shifted positions.
At the end the script prints the greedy accuracy on held-out (N+1)-digit additions before and after,
measured in evaluation mode (TRL leaves the model in training mode with gradient checkpointing on, and a
model generating that way is not the model it saved). The held-out additions are drawn from their own
random stream and never used for training. The default model, `tiny-n3-d1-lr3e-4`, gets about 19% of
the 4-digit additions right when sampled, so RLOO's groups have rewards of both signs from the first step.
The defaults (learning rate, KL coefficient) are starting points, not tuned values.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import torch
from datasets import Dataset
from transformers.utils import logging as hf_logging

import critical_tokens
from critical_tokens import addition
from critical_tokens.evaluate import accuracy_on
from critical_tokens.model import RL_SLACK, load_pretrained
from critical_tokens.seeding import stream_seed
from critical_tokens.trl import PrioritizedRLOOConfig, PrioritizedRLOOTrainer

SHIPPED = Path(critical_tokens.__file__).parent / "checkpoints" / "tiny-n3-d1-lr3e-4"


def addition_reward(completions, a, b, **kwargs):
    """TRL reward function: the dataset's columns a and b arrive as keyword arguments."""
    return [1.0 if addition.is_correct(x, y, text) else -1.0 for x, y, text in zip(a, b, completions)]


def held_out_accuracy(model, tokenizer, pairs) -> float | None:
    """Greedy accuracy on held-out additions, the model in evaluation mode without gradient checkpointing
    (as it is saved and reloaded); None without pairs."""
    if not pairs:
        return None
    model.eval()
    if getattr(model, "is_gradient_checkpointing", False):
        model.gradient_checkpointing_disable()
    return accuracy_on(model, tokenizer, pairs).mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pretrained", default=str(SHIPPED), help="pre-training run or model directory (default: the shipped regime model tiny-n3-d1-lr3e-4)")
    parser.add_argument("--out", default="runs/trl-rloo-prioritized", help="output directory (TRL's, and the fine-tuned model in OUT/model)")
    parser.add_argument("--max-steps", type=int, default=100, help="optimizer steps (one prompt each)")
    parser.add_argument("--num-generations", type=int, default=8, help="completions per prompt (RLOO's group)")
    parser.add_argument("--prioritized-beta", default="10", help="w = c^prioritized_beta, or 'auto' (the paper: 150, for a far more confident model)")
    parser.add_argument("--kl-coef", type=float, default=0.05, help="TRL's beta, the KL coefficient (TRL's RLOO default; the KL is "
                        "summed over the completion's tokens, up to ~390 here, not averaged as in GRPO)")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling and log-prob temperature (the cpu preset's 1.0)")
    parser.add_argument("--lr", type=float, default=2e-5, help="learning rate (RLOO's sequence-level ratio sums the tokens' "
                        "log-probs: the `rl` command's RLOO default, below the GRPO example's)")
    parser.add_argument("--eval-examples", type=int, default=64, help="held-out (N+1)-digit additions for the accuracy before and after (0: skip)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads on a CPU (a tiny model gains little from more, "
                        "and on a shared machine a descheduled thread stalls the others: 4 s per step with 1, a minute with 2 under load)")
    args = parser.parse_args()
    hf_logging.set_verbosity_error()
    if not torch.cuda.is_available():
        torch.set_num_threads(args.threads)

    model, tokenizer, n_digits = load_pretrained(args.pretrained)
    eval_pairs = addition.rl_pairs(n_digits, 1, args.eval_examples, seed=stream_seed(args.seed, "eval_prompts"))
    pairs = addition.rl_pairs(n_digits, 1, args.max_steps, seed=stream_seed(args.seed, "train_prompts"),
                              exclude=set(eval_pairs))  # one prompt per step, none of them held out
    dataset = Dataset.from_dict({"prompt": [addition.prompt(a, b) for a, b in pairs],
                                 "a": [a for a, _ in pairs], "b": [b for _, b in pairs]})
    before = held_out_accuracy(model, tokenizer, eval_pairs)

    config = PrioritizedRLOOConfig(
        output_dir=args.out,
        # TRL's own options
        beta=args.kl_coef, temperature=args.temperature, learning_rate=args.lr, max_steps=args.max_steps, seed=args.seed,
        num_generations=args.num_generations, per_device_train_batch_size=args.num_generations,
        max_completion_length=addition.max_completion_length(n_digits + 1) + RL_SLACK,  # docs/method.md section 4
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=not torch.cuda.is_available(), bf16=False,
        # the prioritized KL penalty (the paper's estimator k2; certainty: eq. 2 at temperature 4)
        prioritized_beta=args.prioritized_beta, kl_estimator="k2", certainty="max_prob", certainty_temperature=4.0,
    )
    trainer = PrioritizedRLOOTrainer(model=model, reward_funcs=addition_reward, args=config, train_dataset=dataset,
                                     processing_class=tokenizer)
    if not torch.cuda.is_available():
        torch.set_num_threads(args.threads)  # the Trainer sets its own
    print(f"RLOO with the prioritized KL from {args.pretrained} (N = {n_digits}) on {n_digits + 1}-digit additions: "
          f"{args.max_steps} steps of {args.num_generations} completions, beta {args.kl_coef}, prioritized_beta {args.prioritized_beta}")
    trainer.train()
    for entry in trainer.state.log_history:
        if "reward" in entry:
            print(f"step {entry['step']}: reward {entry['reward']:+.3f}, kl {entry.get('kl_unweighted', float('nan')):.4f}, "
                  f"weighted kl {entry.get('kl', float('nan')):.4f}, mean weight {entry.get('kl_weight/mean', float('nan')):.3f}")

    trainer.save_model(str(Path(args.out) / "model"))
    tokenizer.save_pretrained(str(Path(args.out) / "model"))
    if eval_pairs:
        after = held_out_accuracy(trainer.model, tokenizer, eval_pairs)
        print(f"greedy accuracy on {len(eval_pairs)} held-out {n_digits + 1}-digit additions: {100 * before:.1f}% before, {100 * after:.1f}% after")
    print(f"fine-tuned model: {Path(args.out) / 'model'}")


if __name__ == "__main__":
    main()
