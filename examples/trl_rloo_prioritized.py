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

from addition_task import addition_reward, parser, prepare, train_and_report  # examples/addition_task.py, beside this script
from critical_tokens.trl import PrioritizedRLOOConfig, PrioritizedRLOOTrainer


def main() -> None:
    args = parser(__doc__.split("\n")[0], "rloo", kl_coef=0.05,
                  kl_help="TRL's beta, the KL coefficient (TRL's RLOO default; the KL is summed over the completion's tokens, up to ~390 here, not averaged as in GRPO)",
                  lr=2e-5, lr_help="learning rate (RLOO's sequence-level ratio sums the tokens' log-probs: the `rl` command's RLOO default, below the GRPO example's)").parse_args()
    run = prepare(args)
    config = PrioritizedRLOOConfig(**run["options"])
    trainer = PrioritizedRLOOTrainer(model=run["model"], reward_funcs=addition_reward, args=config, train_dataset=run["dataset"],
                                     processing_class=run["tokenizer"])
    train_and_report(trainer, run, args, "RLOO", kl_key="kl_unweighted", weighted_kl_key="kl")


if __name__ == "__main__":
    main()
