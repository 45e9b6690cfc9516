"""Fine-tune the shipped regime model (N = 3) on (N+1)-digit additions with TRL's GRPO and the prioritized KL penalty.

    pip install -e ".[trl]"      # in a clone of this repository
    python examples/trl_grpo_prioritized.py --max-steps 2        # a minute or two on 2 CPU cores
    python examples/trl_grpo_prioritized.py --max-steps 200 --out runs/trl-prioritized

The reward is the project's grader (+1 if the result line is the true sum, else -1; docs/method.md section 4).
The only change from a plain TRL script is the config and the trainer class:

    GRPOConfig(beta=...)   ->  PrioritizedGRPOConfig(beta=..., prioritized_beta=10, kl_estimator="k2")
    GRPOTrainer(...)       ->  PrioritizedGRPOTrainer(...)

Each step samples --num-generations completions of one prompt. One prompt per step also means no left
padding: TRL scores completions with positions 0..L-1, while `generate` counts positions from the
first real token, so with padding a GPT-2 (absolute positions) would be scored at shifted positions.
At the end the script prints the greedy accuracy on held-out (N+1)-digit additions before and after,
measured in evaluation mode (TRL leaves the model in training mode with gradient checkpointing on, and a
model generating that way is not the model it saved). The held-out additions are drawn from their own
random stream and never used for training. The default model, `tiny-n3-d1-lr3e-4`, gets about 19% of
the 4-digit additions right when sampled, so GRPO's groups have rewards of both signs from the first step.
"""

from __future__ import annotations

from addition_task import addition_reward, parser, prepare, train_and_report  # examples/addition_task.py, beside this script
from critical_tokens.trl import PrioritizedGRPOConfig, PrioritizedGRPOTrainer


def main() -> None:
    args = parser(__doc__.split("\n")[0], "grpo", kl_coef=5.0,
                  kl_help="TRL's beta, the KL coefficient (the paper's alpha: 5)",
                  lr=2e-4, lr_help="learning rate").parse_args()
    run = prepare(args)
    config = PrioritizedGRPOConfig(**run["options"])
    trainer = PrioritizedGRPOTrainer(model=run["model"], reward_funcs=addition_reward, args=config, train_dataset=run["dataset"],
                                     processing_class=run["tokenizer"])
    train_and_report(trainer, run, args, "GRPO", kl_key="kl", weighted_kl_key="kl_prioritized")


if __name__ == "__main__":
    main()
