"""Fine-tune the shipped regime model (N = 3) on (N+1)-digit additions with TRL's GRPO and the prioritized KL penalty.

    pip install -e ".[trl]"      # in a clone of this repository
    python examples/trl_grpo_prioritized.py --max-steps 2        # a smoke run: a minute or two on 2 CPU cores
    python examples/trl_grpo_prioritized.py                      # 100 steps: 3-4 minutes on 2 CPU cores

The reward is the project's grader (+1 if the result line is the true sum, else -1; docs/method.md section 4).
The only change from a plain TRL script is the config and the trainer class:

    GRPOConfig(beta=...)   ->  PrioritizedGRPOConfig(kl_coef=..., prioritized_beta=8, kl_estimator="k2")   # kl_coef: TRL's beta
    GRPOTrainer(...)       ->  PrioritizedGRPOTrainer(...)

Each step samples --num-generations completions of one prompt. One prompt per step also means no left
padding: TRL scores completions with positions 0..L-1, while `generate` counts positions from the
first real token, so with padding a GPT-2 (absolute positions) would be scored at shifted positions.
At the end the script prints, on 200 held-out (N+1)-digit additions, the greedy accuracy and the
accuracy of 4 completions per addition sampled at the RL temperature, before and after, measured in
evaluation mode (TRL leaves the model in training mode with gradient checkpointing on, and a model
generating that way is not the model it saved); and the mean KL weight the reference gives those
additions' critical tokens against the other tokens. The held-out additions are drawn from their own
random stream and never used for training. The default model, `tiny-n3-d1-lr3e-4`, gets about 19% of
the 4-digit additions right when sampled, so GRPO's groups have rewards of both signs from the first step.
The learning rate, 5e-5, was chosen by a sweep (2e-5, 5e-5, 1e-4; seed 1, 100 steps) for the
greedy accuracy after on seed 1's held-out additions; the other defaults are the `rl` command's on this
model (KL coefficient 5, beta 8, temperature 1). docs/own-rl.md gives the accuracy it reaches on other seeds.
Under `accelerate launch` each process takes one prompt per step; the main process alone prints, saves
and evaluates (docs/own-rl.md: on a machine without a GPU, add `--multi_gpu` to start several).
"""

from __future__ import annotations

from addition_task import addition_reward, parser, prepare, run_or_exit, train_and_report  # examples/addition_task.py, beside this script
from critical_tokens.trl import PrioritizedGRPOConfig, PrioritizedGRPOTrainer


def main() -> None:
    args = parser(__doc__.split("\n")[0], "grpo", kl_coef=5.0,
                  kl_help="the KL coefficient, TRL's beta (the paper's alpha: 5)",
                  lr=5e-5, lr_help="learning rate").parse_args()
    run = prepare(args)
    config = PrioritizedGRPOConfig(**run["options"])
    trainer = PrioritizedGRPOTrainer(model=run["model"], reward_funcs=addition_reward, args=config, train_dataset=run["dataset"],
                                     processing_class=run["tokenizer"])
    train_and_report(trainer, run, args, "GRPO", kl_key="kl", weighted_kl_key="kl_prioritized")


if __name__ == "__main__":
    run_or_exit(main)
