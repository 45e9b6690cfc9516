"""Fine-tune the shipped regime model (N = 3) on (N+1)-digit additions with TRL's RLOO and the prioritized KL penalty.

    pip install -e ".[trl]"      # in a clone of this repository
    python examples/trl_rloo_prioritized.py --max-steps 2        # a smoke run: a minute or two on 2 CPU cores
    python examples/trl_rloo_prioritized.py                      # 100 steps: 3-4 minutes on 2 CPU cores

The reward is the project's grader (+1 if the result line is the true sum, else -1; docs/method.md section 4).
TRL's RLOO takes beta * (the KL summed over the completion's tokens) out of each completion's reward; here
each token's KL is weighted by w = c^prioritized_beta before the sum. The only change from a plain TRL
script is the config and the trainer class:

    RLOOConfig(beta=...)   ->  PrioritizedRLOOConfig(kl_coef=..., prioritized_beta=8, kl_estimator="k2")   # kl_coef: TRL's beta
    RLOOTrainer(...)       ->  PrioritizedRLOOTrainer(...)

Each step samples --num-generations completions of one prompt (RLOO's group: each completion's baseline
is the mean reward of the others). One prompt per step also means no left
padding: TRL scores completions with positions 0..L-1, while `generate` counts positions from the
first real token, so with padding a GPT-2 (absolute positions) would be scored at shifted positions.
At the end the script prints, on 200 held-out (N+1)-digit additions, the greedy accuracy and the
accuracy of 4 completions per addition sampled at the RL temperature, before and after, measured in
evaluation mode (TRL leaves the model in training mode with gradient checkpointing on, and a model
generating that way is not the model it saved); and the mean KL weight the reference gives those
additions' critical tokens against the other tokens. The held-out additions are drawn from their own
random stream and never used for training. The default model, `tiny-n3-d1-lr3e-4`, gets about 19% of
the 4-digit additions right when sampled, so RLOO's groups have rewards of both signs from the first step.
The learning rate, 2e-5 (the `rl` command's RLOO rate on this model), did best in a sweep (5e-6, 2e-5,
1e-4; seed 1, 100 steps) for the greedy accuracy after on seed 1's held-out additions. docs/own-rl.md
gives the accuracy it reaches on other seeds.
Under `accelerate launch` each process takes one prompt per step; the main process alone prints, saves
and evaluates (docs/own-rl.md: on a machine without a GPU, add `--multi_gpu` to start several).
"""

from __future__ import annotations

from addition_task import addition_reward, parser, prepare, run_or_exit, train_and_report  # examples/addition_task.py, beside this script
from critical_tokens.trl import PrioritizedRLOOConfig, PrioritizedRLOOTrainer


def main() -> None:
    args = parser(__doc__.split("\n")[0], "rloo", kl_coef=0.05,
                  kl_help="the KL coefficient, TRL's beta (TRL's RLOO default; the KL is summed over the completion's tokens, up to ~390 here, not averaged as in GRPO)",
                  lr=2e-5, lr_help="learning rate (RLOO's sequence-level ratio sums the tokens' log-probs: the `rl` command's RLOO default, below the GRPO example's)").parse_args()
    run = prepare(args)
    config = PrioritizedRLOOConfig(**run["options"])
    trainer = PrioritizedRLOOTrainer(model=run["model"], reward_funcs=addition_reward, args=config, train_dataset=run["dataset"],
                                     processing_class=run["tokenizer"])
    train_and_report(trainer, run, args, "RLOO", kl_key="kl_unweighted", weighted_kl_key="kl")


if __name__ == "__main__":
    run_or_exit(main)
