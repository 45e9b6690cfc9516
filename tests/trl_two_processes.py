"""One process of tests/test_trl.py's multi-process test, run by ``accelerate launch --multi_gpu --num_processes 2``
(torchrun on the CPU, gloo): a prioritized trainer on the micro model with prioritized_beta='auto' trains
``--steps`` steps (or with the rule ``--kl-weights``, whose beta is 'auto'), then each process writes what it used
to OUT/rank<i>.json: its beta, the certainties, reference entropies and weights of its own first batch (the one
'auto' calibrates on), and the weight statistics it logged.

    accelerate launch --multi_gpu --num_processes 2 tests/trl_two_processes.py --pretrained RUN --out OUT --trainer grpo
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import torch
from datasets import Dataset

from critical_tokens import addition
from critical_tokens.model import load_pretrained
from critical_tokens.trl import PrioritizedGRPOConfig, PrioritizedGRPOTrainer, PrioritizedRLOOConfig, PrioritizedRLOOTrainer

TRAINERS = {"grpo": (PrioritizedGRPOTrainer, PrioritizedGRPOConfig), "rloo": (PrioritizedRLOOTrainer, PrioritizedRLOOConfig)}


def reward(completions, a, b, **kwargs):
    return [1.0 if addition.is_correct(x, y, text) else -1.0 for x, y, text in zip(a, b, completions)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pretrained", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--trainer", choices=list(TRAINERS), default="grpo")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--kl-weights", default=None, help="a rule's text (critical_tokens.kl_rules), instead of prioritized_beta='auto'")
    args = parser.parse_args()
    torch.set_num_threads(1)
    trainer_class, config_class = TRAINERS[args.trainer]

    class Recording(trainer_class):
        first_certainty = first_entropy = first_weights = None

        def _kl_weights(self, stats, token_ids, mask):
            weights = super()._kl_weights(stats, token_ids, mask)
            if self.first_certainty is None:  # this process's completion tokens
                self.first_certainty = stats.certainty[mask].tolist()
                self.first_entropy = None if stats.entropy is None else stats.entropy[mask].tolist()
                self.first_weights = weights[mask].tolist()
            return weights

    model, tokenizer, n_digits = load_pretrained(args.pretrained)
    pairs = addition.rl_pairs(n_digits, 1, 4 * args.steps, seed=0)
    dataset = Dataset.from_dict({"prompt": [addition.prompt(a, b) for a, b in pairs], "a": [a for a, _ in pairs], "b": [b for _, b in pairs]})
    config = config_class(output_dir=str(Path(args.out) / "trainer"), per_device_train_batch_size=4, num_generations=4, max_completion_length=12,
                          temperature=1.0, beta=0.1, learning_rate=1e-2, max_steps=args.steps, logging_steps=1, save_strategy="no",
                          report_to="none", use_cpu=True, bf16=False, seed=0, disable_tqdm=True, dataloader_num_workers=0,
                          certainty_temperature=4.0,
                          **({"prioritized_beta": "auto"} if args.kl_weights is None else {"kl_weights": args.kl_weights}))
    trainer = Recording(model=model, reward_funcs=reward, args=config, train_dataset=dataset, processing_class=tokenizer)
    torch.set_num_threads(1)
    trainer.train()
    rank, world = trainer.accelerator.process_index, trainer.accelerator.num_processes
    logged = [{k: v for k, v in entry.items() if k.startswith(("kl_weight/", "certainty/", "prioritized_beta"))}
              for entry in trainer.state.log_history if "kl_weight/mean" in entry]
    result = {"rank": rank, "world": world, "beta": trainer.prioritized_beta, "first_certainty": trainer.first_certainty,
              "first_entropy": trainer.first_entropy, "first_weights": trainer.first_weights,
              "logged": logged, "metrics_beta": trainer._metrics["train"].get("prioritized_beta")}
    (Path(args.out) / f"rank{rank}.json").write_text(json.dumps(result))
    # Both ranks have written their results: leave together, without the interpreter's teardown. A rank
    # torn down while gloo's threads still run can abort ("terminate called without an active exception",
    # SIGABRT), and destroy_process_group can wait on a rank that has already left; both seen under load.
    trainer.accelerator.wait_for_everyone()
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
