"""The prompts of an RL run and the evaluation of its policy on the held-out ones.

Every run draws its held-out prompts once, from their own random streams (seeding.py): the RL task's
(greedy and sampled accuracy), the comfort zone's (N digits) and the probe set of the critical-token
probabilities; the training prompts of each collect come from the training stream of (seed,
iteration) and are never held-out ones. The evaluations run every ``eval_every`` episodes on the
first prompts of each set, and at the end on larger sets, with the continuous endpoints of
endpoints.py.
"""

from __future__ import annotations

import dataclasses

import torch

from .. import addition
from ..evaluate import completions_together, right_answers
from ..seeding import stream_seed
from .config import Resolved, RLConfig
from .endpoints import final_endpoints


@dataclasses.dataclass(frozen=True)
class HeldOut:
    """A run's held-out prompts, drawn once from their own streams (seeding.py): the RL task's
    (greedy and sampled accuracy), the comfort zone's (N digits) and the probe set of the
    critical-token probabilities. Intermediate evaluations use the first ``eval_episodes`` /
    ``eval_comfort_episodes`` / ``probe_examples`` of each, the final one the first ``final_*``.
    ``exclude``: the N+1-digit ones, never drawn as training prompts."""

    task: list[tuple[int, int]]
    comfort: list[tuple[int, int]]
    probe: list[tuple[int, int]]

    @property
    def exclude(self) -> frozenset[tuple[int, int]]:
        return frozenset(self.task) | frozenset(self.probe)


def held_out_prompts(resolved: Resolved, config: RLConfig) -> HeldOut:
    n_digits = resolved.n_digits
    task = addition.rl_pairs(n_digits, resolved.plus, max(config.eval_episodes, config.final_eval_episodes), seed=stream_seed(config.seed, "eval_prompts"))
    kind = "varying" if n_digits > 1 else "identical"  # N = 1: no shorter other operand
    comfort = addition.eval_pairs(n_digits, kind, max(config.eval_comfort_episodes, config.final_eval_comfort_episodes),
                                  seed=stream_seed(config.seed, "comfort_prompts"))
    probe = addition.rl_pairs(n_digits, 1, max(config.probe_examples, config.final_probe_examples), seed=stream_seed(config.seed, "probe_prompts"))
    return HeldOut(task, comfort, probe)


def training_prompts(resolved: Resolved, config: RLConfig, iteration: int, held_out: HeldOut) -> list[tuple[int, int]]:
    """The prompts of one collect (``batch_size / group_size`` of them), from the training stream of
    (seed, iteration), none of them a held-out prompt."""
    return addition.rl_pairs(resolved.n_digits, resolved.plus, resolved.prompts_per_collect,
                             seed=stream_seed(config.seed, "train_prompts", iteration), exclude=held_out.exclude)


@torch.no_grad()
def evaluate_policy(lm, tokenizer, n_digits: int, config: RLConfig, held_out: HeldOut, final: bool = False,
                    ref_lm=None, records: list[dict] | None = None, kl_coef: float | None = None) -> dict:
    """Accuracy (binary reward) on the RL task, greedy and sampled, and in the comfort zone, plus the
    policy's probability of the right token at the tracked critical tokens. Keys "eval/..." and
    "p_correct/..."; ``final``: on the larger final sets, every key under "final/", and with
    ``ref_lm`` the continuous endpoints of endpoints.py (``records``: the run's metrics lines, for
    its realized penalty ratio; None for a run without a KL term). A final evaluation whose sets hold
    the intermediate ones (their first prompts) also gives the intermediate keys, from those first
    prompts' completions: the last point of the run's curves, without generating them a second time
    (its sampled completions are a draw of the final evaluation's, not of an intermediate call)."""
    from ..critical.measure import tracked_probabilities

    was_training = lm.training
    lm.eval()
    sizes = (config.final_eval_episodes, config.final_eval_comfort_episodes, config.final_probe_examples) if final else \
        (config.eval_episodes, config.eval_comfort_episodes, config.probe_examples)
    task_pairs, comfort_pairs, probe_pairs = (pairs[:n] for pairs, n in zip((held_out.task, held_out.comfort, held_out.probe), sizes))
    sampler = torch.Generator().manual_seed(stream_seed(config.seed, "eval_sampling"))
    # One generation call for the three sets when they fit in one batch (the intermediate evaluations).
    task_texts, comfort_texts, sampled_texts = completions_together(
        lm, tokenizer, [(task_pairs, 0.0), (comfort_pairs, 0.0), (task_pairs, config.temperature)], generator=sampler)
    def scores(n_task: int, n_comfort: int, n_probe: int) -> dict:  # of the first prompts of each set
        return {
            "eval/accuracy_greedy": right_answers(task_pairs[:n_task], task_texts[:n_task]).mean().item(),
            "eval/accuracy_sampled": right_answers(task_pairs[:n_task], sampled_texts[:n_task]).mean().item(),
            "eval/comfort_accuracy_greedy": right_answers(comfort_pairs[:n_comfort], comfort_texts[:n_comfort]).mean().item(),
            **tracked_probabilities(lm, tokenizer, probe_pairs[:n_probe], n_digits, temperature=config.temperature),
        }

    record = scores(*sizes)
    if final and ref_lm is not None:
        endpoints = final_endpoints(lm, ref_lm, tokenizer, task_pairs, task_texts, comfort_pairs, comfort_texts,
                                    config.temperature, records or [], kl_coef)
        record.update({f"eval/{k}": v for k, v in endpoints.items()})
    if final:
        record = {"final/" + k.removeprefix("eval/"): v for k, v in record.items()}
        intermediate = (config.eval_episodes, config.eval_comfort_episodes, config.probe_examples)
        if all(i <= f for i, f in zip(intermediate, sizes)):
            record.update(scores(*intermediate))
    lm.train(was_training)
    return record
