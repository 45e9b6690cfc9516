"""What the two TRL examples share: the addition task as a TRL dataset and reward, the options both take,
and the held-out accuracy before and after (in evaluation mode). Imported by trl_grpo_prioritized.py and
trl_rloo_prioritized.py, which sit next to it; each of them is the part that differs (config, trainer).
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
import numpy as np

from critical_tokens import addition
from critical_tokens.critical.measure import teacher_forced
from critical_tokens.evaluate import accuracy_on
from critical_tokens.model import RL_SLACK, load_pretrained
from critical_tokens.seeding import stream_seed

SHIPPED = Path(critical_tokens.__file__).parent / "checkpoints" / "tiny-n3-d1-lr3e-4"


def addition_reward(completions, a, b, **kwargs):
    """TRL reward function: the dataset's columns a and b arrive as keyword arguments."""
    return [1.0 if addition.is_correct(x, y, text) else -1.0 for x, y, text in zip(a, b, completions)]


def held_out_accuracy(model, tokenizer, pairs) -> float | None:
    """Greedy accuracy on held-out additions, the model in evaluation mode without gradient checkpointing
    (as it is saved and reloaded; TRL leaves it in training mode with checkpointing on); None without pairs."""
    if not pairs:
        return None
    model.eval()
    if getattr(model, "is_gradient_checkpointing", False):
        model.gradient_checkpointing_disable()
    return accuracy_on(model, tokenizer, pairs).mean().item()


def parser(description: str, algorithm: str, kl_coef: float, kl_help: str, lr: float, lr_help: str) -> argparse.ArgumentParser:
    """The options of both examples; the KL coefficient and the learning rate differ by algorithm."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--pretrained", default=str(SHIPPED), help="pre-training run or model directory (default: the shipped regime model tiny-n3-d1-lr3e-4)")
    p.add_argument("--out", default=f"runs/trl-{algorithm}-prioritized", help="output directory (TRL's, and the fine-tuned model in OUT/model)")
    p.add_argument("--max-steps", type=int, default=100, help="optimizer steps (one prompt each)")
    p.add_argument("--num-generations", type=int, default=8, help=f"completions per prompt ({algorithm.upper()}'s group)")
    p.add_argument("--prioritized-beta", default="10", help="w = c^prioritized_beta, or 'auto' (the paper: 150, for a far more confident model)")
    p.add_argument("--kl-coef", type=float, default=kl_coef, help=kl_help)
    p.add_argument("--temperature", type=float, default=1.0, help="sampling and log-prob temperature (the cpu preset's 1.0)")
    p.add_argument("--lr", type=float, default=lr, help=lr_help)
    p.add_argument("--eval-examples", type=int, default=64, help="held-out (N+1)-digit additions for the accuracy before and after (0: skip)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads on a CPU (a tiny model gains little from more, "
                   "and on a shared machine a descheduled thread stalls the others: 4 s per step with 1, a minute with 2 under load)")
    return p


def prepare(args) -> dict:
    """The model, its tokenizer and N; the training dataset (one prompt per step) and the held-out
    additions, each from its own random stream, none of them a training prompt; the accuracy before;
    and the TRL options both configs share."""
    hf_logging.set_verbosity_error()
    if not torch.cuda.is_available():
        torch.set_num_threads(args.threads)
    model, tokenizer, n_digits = load_pretrained(args.pretrained)
    eval_pairs = addition.rl_pairs(n_digits, 1, args.eval_examples, seed=stream_seed(args.seed, "eval_prompts"))
    pairs = addition.rl_pairs(n_digits, 1, args.max_steps, seed=stream_seed(args.seed, "train_prompts"), exclude=set(eval_pairs))
    dataset = Dataset.from_dict({"prompt": [addition.prompt(a, b) for a, b in pairs], "a": [a for a, _ in pairs], "b": [b for _, b in pairs]})
    options = dict(
        output_dir=args.out,
        # TRL's own options
        beta=args.kl_coef, temperature=args.temperature, learning_rate=args.lr, max_steps=args.max_steps, seed=args.seed,
        num_generations=args.num_generations, per_device_train_batch_size=args.num_generations,
        max_completion_length=addition.max_completion_length(n_digits + 1) + RL_SLACK,  # docs/method.md section 4
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=not torch.cuda.is_available(), bf16=False,
        # the prioritized KL penalty (the paper's estimator k2; certainty: eq. 2 at temperature 4)
        prioritized_beta=args.prioritized_beta, kl_estimator="k2", certainty="max_prob", certainty_temperature=4.0,
    )
    certainty = [scores.max_prob for scores in teacher_forced(model, tokenizer, eval_pairs)] if eval_pairs else []  # the reference's, T = 4
    return {"model": model, "tokenizer": tokenizer, "n_digits": n_digits, "dataset": dataset, "eval_pairs": eval_pairs,
            "before": held_out_accuracy(model, tokenizer, eval_pairs), "certainty": certainty, "options": options}


def weights_on_critical_tokens(run: dict, beta: float) -> tuple[float, float]:
    """The mean prioritized weight c^beta that the reference gives the critical tokens of the held-out
    additions' right completions, and the other tokens (docs/method.md section 6)."""
    critical, other = [], []
    for (a, b), c in zip(run["eval_pairs"], run["certainty"]):
        marked = np.zeros(len(c), dtype=bool)
        marked[[t.offset for t in addition.critical_tokens(a, b, run["n_digits"]) if t.offset < len(c)]] = True
        critical.append(c[marked] ** beta)
        other.append(c[~marked] ** beta)
    return float(np.concatenate(critical).mean()), float(np.concatenate(other).mean())


def train_and_report(trainer, run: dict, args, algorithm: str, kl_key: str, weighted_kl_key: str) -> None:
    """Trains, prints each step's reward, KL (plain and weighted) and mean weight, saves the model, and
    prints the held-out accuracy before and after."""
    if not torch.cuda.is_available():
        torch.set_num_threads(args.threads)  # the Trainer sets its own
    n = run["n_digits"]
    print(f"{algorithm} with the prioritized KL from {args.pretrained} (N = {n}) on {n + 1}-digit additions: "
          f"{args.max_steps} steps of {args.num_generations} completions, beta {args.kl_coef}, prioritized_beta {args.prioritized_beta}")
    trainer.train()
    for entry in trainer.state.log_history:
        if "reward" in entry:
            print(f"step {entry['step']}: reward {entry['reward']:+.3f}, kl {entry.get(kl_key, float('nan')):.4f}, "
                  f"weighted kl {entry.get(weighted_kl_key, float('nan')):.4f}, mean weight {entry.get('kl_weight/mean', float('nan')):.3f}")
    out = Path(args.out) / "model"
    trainer.save_model(str(out))
    run["tokenizer"].save_pretrained(str(out))
    if run["eval_pairs"]:
        after = held_out_accuracy(trainer.model, run["tokenizer"], run["eval_pairs"])
        print(f"greedy accuracy on {len(run['eval_pairs'])} held-out {n + 1}-digit additions: "
              f"{100 * run['before']:.1f}% before, {100 * after:.1f}% after")
        if trainer.prioritized_beta is not None:  # the beta used ('auto': calibrated on the first batch)
            on_critical, elsewhere = weights_on_critical_tokens(run, trainer.prioritized_beta)
            print(f"mean KL weight c^{trainer.prioritized_beta:.3g} of the reference on those additions' critical tokens: "
                  f"{on_critical:.3f}, on the other tokens: {elsewhere:.3f}")
    print(f"fine-tuned model: {out}")
