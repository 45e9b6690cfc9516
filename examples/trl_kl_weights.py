"""Per-token KL weights by a rule in TRL's GRPO, on the shipped regime model (N = 3): the same short run with
`ignore_tokens` on the scratchpad's separators and with `prioritized`, and the KL per token class after each.

    pip install -e ".[trl]"      # in a clone of this repository
    python examples/trl_kl_weights.py --max-steps 1 --eval-examples 8     # a smoke run: about a minute
    python examples/trl_kl_weights.py                                      # 2 runs of 40 steps: 6-7 minutes on 2 busy cores

The rule is one option of the config (critical_tokens/kl_rules.py; docs/own-rl.md section 2):

    PrioritizedGRPOConfig(kl_coef=5, kl_weights=ignore_tokens([" ", ",", "\\n"]))   # no KL on the separators
    PrioritizedGRPOConfig(kl_coef=5, kl_weights=prioritized(8))                     # w = c^8 (the default rule)

Both runs share everything else: the seed, the prompts, the options of examples/trl_grpo_prioritized.py
(KL coefficient 5, learning rate 5e-5, 8 completions of one prompt per step, temperature 1), and each
prints its held-out accuracy before and after, as that example does. After each run, on the right
completions of the held-out additions (teacher-forced), the script prints per token class (the critical
tokens of docs/method.md section 6, the other digits, the separators, the rest): the tokens' share, their
mean weight w under the run's rule, and the KL of the fine-tuned policy to the reference there, before and
after the weights: KL = sum_a pi(a) log(pi(a) / pi_ref(a)) exact over the vocabulary at the RL
temperature, and w x KL, the part the penalty charges. Some commas are critical tokens (the comma before
an operand's extra digit), so ignoring the commas also frees those. Writes OUT/<rule>/ for each run (the
model, TRL's metrics, the accuracies) and OUT/kl_by_class.json.

40 steps show where each rule lets the policy move, not what it gains: the accuracy moves by a few points
either way in so few steps (docs/own-rl.md gives the GRPO example's accuracy after 100 steps, and the
studies that compare rules). Measured at the defaults (2026-12-06, 2 cores shared with other jobs, load
average 5): 6 min 21 s; the prioritized run's policy moved most on the critical tokens (KL 0.021, against
0.013 on the other digits and 0.0001 on the separators) while paying there w x KL = 0.0005; the ignore run's
moved little anywhere (KL 0.012 on the critical tokens, 0.006 on the digits).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from addition_task import addition_reward, parser, prepare, run_or_exit, train_and_report  # examples/addition_task.py, beside this script
from critical_tokens import addition, kl
from critical_tokens.kl_rules import ReferenceStats, ignore_tokens, prioritized
from critical_tokens.model import load_pretrained
from critical_tokens.policy import entropy_from_logits
from critical_tokens.runs import write_json
from critical_tokens.tokenizer import encode
from critical_tokens.trl import PrioritizedGRPOConfig, PrioritizedGRPOTrainer

SEPARATORS = (" ", ",", "\n")  # what structures the scratchpad's lines and lists, carrying no number
CLASSES = ("critical", "digit", "separator", "other")


def token_class(char: str, critical: bool) -> str:
    if critical:
        return "critical"
    return "digit" if char.isdigit() else "separator" if char in SEPARATORS else "other"


@torch.no_grad()
def kl_by_class(policy, reference, tokenizer, pairs, n_digits: int, rule, temperature: float) -> dict[str, dict]:
    """Per token class of the right completions of ``pairs`` (teacher-forced): the share of tokens, the mean
    weight w the rule gives, the mean KL(pi || pi_ref) of the state (exact, at ``temperature``) and of w x KL."""
    sums = {name: torch.zeros(3, dtype=torch.float64) for name in CLASSES}  # weight, KL, w x KL
    counts = dict.fromkeys(CLASSES, 0)
    policy.eval()
    for a, b in pairs:
        prompt, text = encode(tokenizer, addition.prompt(a, b)), addition.completion(a, b)
        ids = torch.tensor([prompt + encode(tokenizer, text)], device=policy.device)  # (1, P + T)
        states = slice(len(prompt) - 1, ids.shape[1] - 1)  # state t predicts completion token t
        logp = F.log_softmax(policy(input_ids=ids).logits[0, states].float() / temperature, -1)  # (T, V)
        ref_logits = reference(input_ids=ids).logits[0, states].float()  # (T, V)
        kl_t = (logp.exp() * (logp - F.log_softmax(ref_logits / temperature, -1))).sum(-1)  # (T,)
        stats = ReferenceStats(certainty=kl.certainty(ref_logits, "max_prob", 4.0)[None],
                               entropy=entropy_from_logits(ref_logits / temperature)[None])
        w = rule(stats, ids[:, len(prompt):], torch.ones_like(ids[:, len(prompt):], dtype=torch.bool))[0]  # (T,)
        critical = {t.offset for t in addition.critical_tokens(a, b, n_digits)}
        for t, char in enumerate(text):
            name = token_class(char, t in critical)
            sums[name] += torch.tensor([w[t].item(), kl_t[t].item(), (w[t] * kl_t[t]).item()], dtype=torch.float64)
            counts[name] += 1
    total = sum(counts.values())
    return {name: {"share": counts[name] / total, **dict(zip(("weight", "kl", "weighted_kl"), (sums[name] / max(counts[name], 1)).tolist()))}
            for name in CLASSES}


def print_table(rule, table: dict[str, dict], examples: int) -> None:
    print(f"KL of the fine-tuned policy to the reference per token class, on the right completions of {examples} held-out additions, "
          f"weights {rule}:")
    print(f"  {'class':<10} {'share':>6} {'weight':>7} {'KL':>9} {'w x KL':>9}")
    for name, row in table.items():
        print(f"  {name:<10} {100 * row['share']:5.1f}% {row['weight']:7.3f} {row['kl']:9.5f} {row['weighted_kl']:9.5f}")


def main() -> None:
    p = parser(__doc__.split("\n")[0], "grpo", kl_coef=5.0, kl_help="the KL coefficient, TRL's beta (the paper's alpha: 5)",
               lr=5e-5, lr_help="learning rate (examples/trl_grpo_prioritized.py's)")
    p.set_defaults(out="runs/trl-kl-weights", max_steps=40, eval_examples=100)
    args = p.parse_args()
    rules = [ignore_tokens(list(SEPARATORS)), prioritized(args.prioritized_beta)]
    run = prepare(args)
    tables = {}
    for i, rule in enumerate(rules):
        if i:  # each run starts from the pre-trained model
            run["model"] = load_pretrained(args.pretrained)[0]
        options = {**run["options"], "kl_weights": rule}
        del options["prioritized_beta"]  # the rule gives the weights
        arm = argparse.Namespace(**{**vars(args), "out": str(Path(args.out) / str(rule).split(":")[0])})
        options["output_dir"] = arm.out
        trainer = PrioritizedGRPOTrainer(model=run["model"], reward_funcs=addition_reward, args=PrioritizedGRPOConfig(**options),
                                         train_dataset=run["dataset"], processing_class=run["tokenizer"])
        train_and_report(trainer, run, arm, "GRPO", kl_key="kl", weighted_kl_key="kl_prioritized")
        if trainer.accelerator.is_main_process and run["eval_pairs"]:
            table = kl_by_class(trainer.model, trainer.ref_model, run["tokenizer"], run["eval_pairs"], run["n_digits"], trainer.kl_rule, args.temperature)
            print_table(trainer.kl_rule, table, len(run["eval_pairs"]))
            tables[str(trainer.kl_rule)] = table
        print(flush=True)
    if tables:
        write_json(Path(args.out) / "kl_by_class.json", {"held_out_additions": len(run["eval_pairs"]), "temperature": args.temperature, "rules": tables})
        print(f"per-class KL of both runs: {args.out}/kl_by_class.json")


if __name__ == "__main__":
    run_or_exit(main)
