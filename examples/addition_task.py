"""What the TRL examples share: the addition task as a TRL dataset and reward, the options they take,
and the held-out accuracy before and after (in evaluation mode). Imported by trl_grpo_prioritized.py,
trl_rloo_prioritized.py and trl_kl_weights.py, which sit next to it; each of them is the part that differs
(config, trainer, rule).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
warnings.filterwarnings("ignore", message=".*gradient_checkpointing.* is deprecated", category=FutureWarning)  # transformers 5.2x renames it; TRL sets it

import torch
from datasets import Dataset
from transformers import PrinterCallback, ProgressCallback, TrainerCallback
from transformers.utils import logging as hf_logging

import critical_tokens
import numpy as np

from critical_tokens import addition, checks, kl
from critical_tokens.config import MAX_SEED
from critical_tokens.critical.measure import teacher_forced
from critical_tokens.evaluate import accuracy_on
from critical_tokens.model import RL_SLACK, load_pretrained
from critical_tokens.runs import USER_OS_ERRORS, UserError, atomic_write_text, check_output, write_json
from critical_tokens.seeding import stream_seed

SHIPPED = Path(critical_tokens.__file__).parent / "checkpoints" / "tiny-n3-d1-lr3e-4"


def addition_reward(completions, a, b, **kwargs):
    """TRL reward function: the dataset's columns a and b arrive as keyword arguments."""
    return [1.0 if addition.is_correct(x, y, text) else -1.0 for x, y, text in zip(a, b, completions)]


SAMPLES_PER_ADDITION = 4  # the sampled accuracy's completions per held-out addition


def held_out_accuracy(model, tokenizer, pairs, temperature: float, seed: int) -> tuple[float, float] | None:
    """The greedy accuracy on held-out additions, and the accuracy of SAMPLES_PER_ADDITION completions per
    addition sampled at `temperature` (the RL's; the same random numbers before and after), measured with
    the model in evaluation mode without gradient checkpointing (as it is saved and reloaded; TRL leaves it
    in training mode with checkpointing on); None without pairs."""
    if not pairs:
        return None
    model.eval()
    if getattr(model, "is_gradient_checkpointing", False):
        model.gradient_checkpointing_disable()
    greedy = accuracy_on(model, tokenizer, pairs).mean().item()
    generator = torch.Generator(device=model.device).manual_seed(stream_seed(seed, "eval_sampling"))
    sampled = accuracy_on(model, tokenizer, pairs * SAMPLES_PER_ADDITION, temperature=temperature, generator=generator).mean().item()
    return greedy, sampled


def parser(description: str, algorithm: str, kl_coef: float, kl_help: str, lr: float, lr_help: str) -> argparse.ArgumentParser:
    """The options of both examples; the KL coefficient and the learning rate differ by algorithm."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--pretrained", default=str(SHIPPED), help="pre-training run or model directory (default: the shipped regime model tiny-n3-d1-lr3e-4)")
    p.add_argument("--out", default=f"runs/trl-{algorithm}-prioritized", help="output directory (TRL's, and the fine-tuned model in OUT/model)")
    p.add_argument("--max-steps", type=int, default=100, help="optimizer steps (one prompt each)")
    p.add_argument("--num-generations", type=int, default=8, help=f"completions per prompt ({algorithm.upper()}'s group)")
    p.add_argument("--prioritized-beta", default="8", help="w = c^prioritized_beta, or 'auto'. 8: the value of this project's studies on this model "
                   "(the cpu-regime and cpu-confirm presets); the `rl` command's default is the paper's 150, for a far more confident model")
    p.add_argument("--kl-coef", type=float, default=kl_coef, help=kl_help)
    p.add_argument("--temperature", type=float, default=1.0, help="sampling and log-prob temperature (the cpu preset's 1.0)")
    p.add_argument("--lr", type=float, default=lr, help=lr_help)
    p.add_argument("--eval-examples", type=int, default=200, help="held-out (N+1)-digit additions for the accuracy before and after (0: skip)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads on a CPU (a tiny model gains little from more, "
                   "and on a shared machine a descheduled thread stalls the others: 4 s per step with 1, a minute with 2 under load)")
    return p


def check_args(args) -> None:
    """The options, checked before the model is loaded and evaluated and before anything is written
    (checks.py: the same checks as the `rl` command's and the TRL configs')."""
    checks.in_range("--max-steps", args.max_steps, 1, integer=True)
    checks.in_range("--num-generations", args.num_generations, 2, integer=True)  # a group: a baseline needs two
    checks.in_range("--kl-coef", args.kl_coef, 0)
    checks.parse_beta("--prioritized-beta", args.prioritized_beta)
    checks.in_range("--temperature", args.temperature, 0, low_open=True)
    checks.in_range("--lr", args.lr, 0)  # 0: a run that does not move the model (the tests' check of the evaluation)
    checks.in_range("--eval-examples", args.eval_examples, 0, integer=True)
    checks.in_range("--seed", args.seed, 0, MAX_SEED, integer=True)
    checks.in_range("--threads", args.threads, 1, integer=True)
    check_output(args.out, "--out", directory=True)


def run_or_exit(main) -> None:
    """Runs an example's main; a bad option or input (a missing model, a value TRL or the config refuses,
    an output directory that cannot be written) ends it with a one-line error and exit status 1 instead
    of a traceback."""
    try:
        main()
    except (UserError, ValueError) as error:
        sys.exit(f"error: {error}")
    except OSError as error:  # a full disk, a read-only or forbidden place
        if error.errno not in USER_OS_ERRORS:
            raise
        sys.exit(f"error: {error.filename or 'a file'}: {error.strerror}")


def prepare(args) -> dict:
    """The model, its tokenizer and N; the training dataset (one prompt per step and process) and the held-out
    additions, each from its own random stream, none of them a training prompt; the accuracy before;
    and the TRL options both configs share."""
    check_args(args)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # transformers' "Loading weights" bar at each load
    if not torch.cuda.is_available():
        torch.set_num_threads(args.threads)
    model, tokenizer, n_digits = load_pretrained(args.pretrained)
    eval_pairs = addition.rl_pairs(n_digits, 1, args.eval_examples, seed=stream_seed(args.seed, "eval_prompts"))
    prompts = args.max_steps * int(os.environ.get("WORLD_SIZE", 1))  # one per step and process (accelerate launch sets WORLD_SIZE)
    pairs = addition.rl_pairs(n_digits, 1, prompts, seed=stream_seed(args.seed, "train_prompts"), exclude=set(eval_pairs))
    dataset = Dataset.from_dict({"prompt": [addition.prompt(a, b) for a, b in pairs], "a": [a for a, _ in pairs], "b": [b for _, b in pairs]})
    options = dict(
        output_dir=args.out,
        # TRL's own options (and kl_coef, which the config hands to TRL as its beta)
        kl_coef=args.kl_coef, temperature=args.temperature, learning_rate=args.lr, max_steps=args.max_steps, seed=args.seed,
        num_generations=args.num_generations, per_device_train_batch_size=args.num_generations,
        max_completion_length=addition.max_completion_length(n_digits + 1) + RL_SLACK,  # docs/method.md section 4
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=not torch.cuda.is_available(), bf16=False,
        # the prioritized KL penalty (the paper's estimator k2; certainty: eq. 2 at temperature 4)
        prioritized_beta=args.prioritized_beta, kl_estimator="k2", certainty="max_prob", certainty_temperature=4.0,
    )
    certainty = [scores.max_prob for scores in teacher_forced(model, tokenizer, eval_pairs)] if eval_pairs else []  # the reference's, T = 4
    return {"model": model, "tokenizer": tokenizer, "n_digits": n_digits, "dataset": dataset, "eval_pairs": eval_pairs,
            "before": held_out_accuracy(model, tokenizer, eval_pairs, args.temperature, args.seed), "certainty": certainty, "options": options}


def weights_on_critical_tokens(run: dict, beta: float) -> tuple[float, float]:
    """The mean prioritized weight c^beta that the reference gives the critical tokens of the held-out
    additions' right completions, and the other tokens (docs/method.md section 6)."""
    critical, other = [], []
    for (a, b), c in zip(run["eval_pairs"], run["certainty"]):
        marked = np.zeros(len(c), dtype=bool)
        marked[[t.offset for t in addition.critical_tokens(a, b, run["n_digits"]) if t.offset < len(c)]] = True
        w = kl.prioritized_weights(torch.as_tensor(c), beta).numpy()  # c^beta
        critical.append(w[marked])
        other.append(w[~marked])
    return float(np.concatenate(critical).mean()), float(np.concatenate(other).mean())


class StepLine(TrainerCallback):
    """Prints one line per optimizer step on the main process: the mean reward, the KL (plain and
    weighted) and the mean weight, instead of the Trainer's dict of every metric."""

    def __init__(self, kl_key: str, weighted_kl_key: str):
        self.kl_key, self.weighted_kl_key = kl_key, weighted_kl_key

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs and "reward" in logs:
            print(f"step {state.global_step}/{state.max_steps}: reward {logs['reward']:+.3f}, kl {logs.get(self.kl_key, float('nan')):.4f}, "
                  f"weighted kl {logs.get(self.weighted_kl_key, float('nan')):.4f}, mean weight {logs.get('kl_weight/mean', float('nan')):.3f}",
                  flush=True)


def train_and_report(trainer, run: dict, args, algorithm: str, kl_key: str, weighted_kl_key: str) -> None:
    """Trains, prints each step's reward, KL (plain and weighted) and mean weight, saves the model, and
    prints the held-out accuracy before and after. Under `accelerate launch` with several processes, every
    process trains (each on its own prompts of a step) and only the main one prints, saves and evaluates."""
    if not torch.cuda.is_available():
        torch.set_num_threads(args.threads)  # the Trainer sets its own
    n = run["n_digits"]
    main, processes = trainer.accelerator.is_main_process, trainer.accelerator.num_processes
    if main:
        print(f"{algorithm} with KL weights {trainer.kl_rule} from {args.pretrained} (N = {n}) on {n + 1}-digit additions: "
              f"{args.max_steps} steps of {args.num_generations} completions per process, {processes} process(es), "
              f"kl_coef {args.kl_coef}", flush=True)
    trainer.remove_callback(PrinterCallback)  # TRL's dict of every metric, each step ...
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(StepLine(kl_key, weighted_kl_key))  # ... becomes one line
    trainer.train()
    steps = [entry for entry in trainer.state.log_history if "frac_reward_zero_std" in entry]
    if main and steps and all(entry["frac_reward_zero_std"] == 1.0 for entry in steps):
        print(f"note: in every step all {args.num_generations} completions of a prompt had the same reward, so the advantages were 0 "
              "and the policy had no reward signal; any change of accuracy below comes from the KL term and float noise "
              "(Adam scales even tiny gradients to full steps), not from learning the task", flush=True)
    out = Path(args.out) / "model"
    trainer.save_model(str(out))  # on every process: the Trainer writes from the main one
    if not main:
        return
    run["tokenizer"].save_pretrained(str(out))
    summary = {"algorithm": algorithm, "options": vars(args), "processes": processes, "prioritized_beta_used": trainer.prioritized_beta,
               "held_out_additions": len(run["eval_pairs"]), "samples_per_addition": SAMPLES_PER_ADDITION}
    if run["eval_pairs"]:
        (greedy_before, sampled_before), (greedy, sampled) = run["before"], held_out_accuracy(trainer.model, run["tokenizer"], run["eval_pairs"], args.temperature, args.seed)
        summary.update(before={"greedy": greedy_before, "sampled": sampled_before}, after={"greedy": greedy, "sampled": sampled})
        print(f"accuracy on {len(run['eval_pairs'])} held-out {n + 1}-digit additions, before -> after: "
              f"greedy {100 * greedy_before:.1f}% -> {100 * greedy:.1f}%, sampled at temperature {args.temperature:g} "
              f"({SAMPLES_PER_ADDITION} per addition) {100 * sampled_before:.1f}% -> {100 * sampled:.1f}%")
        if trainer.prioritized_beta is not None:  # the beta used ('auto': calibrated on the first batch)
            on_critical, elsewhere = weights_on_critical_tokens(run, trainer.prioritized_beta)
            summary.update(mean_weight_critical=on_critical, mean_weight_other=elsewhere)
            print(f"mean KL weight c^{trainer.prioritized_beta:.3g} of the reference on those additions' critical tokens: "
                  f"{on_critical:.3f}, on the other tokens: {elsewhere:.3f}")
    # the run describes itself: TRL's metrics of every step (JSON lines), then the options and the accuracies
    atomic_write_text(Path(args.out) / "metrics.jsonl", "".join(json.dumps(entry) + "\n" for entry in trainer.state.log_history))
    write_json(Path(args.out) / "result.json", summary)
    print(f"fine-tuned model: {out}; metrics and accuracies: {args.out}/metrics.jsonl, {args.out}/result.json")
