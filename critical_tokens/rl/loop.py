"""RL fine-tuning with A2C (or PPO, GRPO, RLOO) and a standard or prioritized KL penalty (docs/method.md sections 4 and 5).

:func:`train` sets the run up once (:func:`set_up`: the models, the resolved config of rl/config.py,
the loss of rl/loss.py with the method's actor loss chosen), then each iteration is numbered steps:

1. rollout    - sample a batch of episodes from the policy at its temperature (KV cache);
               grpo and rloo: ``group_size`` episodes per prompt;
2. reward     - +1 / -1 on the last token of each episode (a length-limit hit counts as wrong);
3. reference  - one teacher-forced pass of the frozen pre-trained model: log-probs and certainty;
4. KL weights - the rule's (kl_rules): c(s)^beta (prioritized), 1 (standard), --kl-weights, or none;
               the collect is then one value (rl/batch.RolloutBatch), and ppo, grpo and rloo fix the
               advantages of the whole collect (rl/batch.collect_advantages);
then for each epoch (ppo: 4, others: 1) and each minibatch of episodes:
5. policy     - one teacher-forced pass of the policy: log-probs, entropy, values (a2c, ppo);
6. advantages - a2c: GAE (gamma 1, lambda 0.95) on the current values; others: those of step 4;
7. loss       - rl/loss.rl_loss: actor + vf_coef * value - ent_coef * entropy + kl_coef * KL term, the
               actor loss being A2C's -A log pi, the clipped surrogate of PPO, or a --method's;
8. update     - gradient clipping, Adam;
and at the end of the iteration: 9. log (and every ``eval_every`` episodes: evaluate, checkpoint).

The paper's reference code takes one gradient step every 2 tokens of a single episode with a
learning rate of 1e-6; here a step is taken on a minibatch of whole episodes, so the learning rate
is larger (see ``RLConfig.lr``). Both arms of a comparison share every value except the KL options.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .. import addition, distributed, kl, kl_rules
from ..critical.selection import SelectionCounts, template_masks
from ..generation import addition_stop_rule, concatenate, generate
from ..model import check_fits, count_parameters, load_pretrained
from ..policy import Policy, token_logprobs, token_logprobs_and_entropy
from ..policy_gradient import terminal_rewards
from ..runs import MetricsLog, Timer, UserError, atomic_dir, load_run_config, read_metrics, save_config, write_json
from ..seeding import stream_seed
from ..tokenizer import encode
from .a2c import ValueHead
from .batch import RolloutBatch, collect_advantages, minibatch_advantages
from .calibration import calibrate
from .config import CRITIC_ALGORITHMS, Resolved, RLConfig, derive, kl_weight_rule, validate
from .evaluation import HeldOut, evaluate_policy, held_out_prompts, training_prompts
from .loss import Loss, LossTerms, loss_of, rl_loss


@torch.no_grad()
def reference_pass(ref_lm, sequences, attention_mask, prompt_length: int, config: RLConfig, needs=()):
    """Log-probs of the taken actions under the frozen reference at the policy temperature (B, T),
    and its statistics (kl_rules.ReferenceStats): the certainty c(s) at the certainty temperature and,
    if ``needs`` it, the entropy at the policy temperature (B, T)."""
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.autocast(sequences.device.type, dtype=torch.bfloat16, enabled=sequences.is_cuda):  # GPU: bf16 matmuls
        logits = ref_lm(input_ids=sequences, attention_mask=attention_mask, position_ids=position_ids).logits
    logits = logits[:, prompt_length - 1 : sequences.shape[1] - 1].float()  # (B, T, V)
    actions = sequences[:, prompt_length:]  # (B, T)
    if "entropy" in needs:
        ref_logprobs, entropy = token_logprobs_and_entropy(logits / config.temperature, actions)
    else:
        ref_logprobs, entropy = token_logprobs(logits / config.temperature, actions), None
    certainty = kl.certainty(logits, config.certainty, config.certainty_temperature)
    return ref_logprobs, kl_rules.ReferenceStats(certainty, entropy)


def shared_rollout(ranks: distributed.Ranks, lm, prompts, max_new: int, temperature: float, sampler: torch.Generator, stop_rule: dict):
    """Under torchrun: each rank samples its rows of the batch with the whole batch's noise
    (``generate``'s ``noise_rows``), then every rank holds the whole batch, as one process would have
    sampled it. The sampler is left where one process leaves it: one (B, V) block of noise for each
    position of the longest episode."""
    rows = ranks.rows(len(prompts))
    mine = generate(lm, prompts[rows], max_new_tokens=max_new, temperature=temperature, generator=sampler,
                    noise_rows=(len(prompts), rows), **stop_rule)
    on_cpu = {k: getattr(mine, k).cpu() for k in ("sequences", "attention_mask", "completion_mask", "logprobs", "finished")}
    rollout = concatenate(ranks.gather(dataclasses.replace(mine, **on_cpu)), stop_rule["pad_token_id"])
    for _ in range(rollout.completion_mask.shape[1] - mine.completion_mask.shape[1]):
        torch.rand((len(prompts), lm.config.vocab_size), generator=sampler)
    device = mine.sequences.device
    return dataclasses.replace(rollout, **{k: getattr(rollout, k).to(device) for k in on_cpu})


def save_checkpoint(run_dir: Path, policy: Policy, tokenizer, optimizer, iteration: int, episodes: int) -> None:
    with atomic_dir(run_dir / "model") as tmp:
        policy.lm.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if policy.value_head is not None:
            save_file(policy.value_head.state_dict(), str(tmp / "value_head.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "iteration": iteration, "episodes": episodes}, tmp / "trainer_state.pt")


@dataclass(frozen=True)
class RLRun:
    """An RL run once set up (:func:`set_up`): what every step of the loop reads."""

    config: RLConfig
    resolved: Resolved  # the values derived once (rl/config.py), saved in config.json
    run_dir: Path
    ranks: distributed.Ranks
    ref_lm: torch.nn.Module  # the frozen reference
    tokenizer: object
    policy: Policy
    train_policy: torch.nn.Module  # the policy; under torchrun, wrapped in DistributedDataParallel
    optimizer: torch.optim.Optimizer
    kl_rule: kl_rules.Rule | None  # the per-token KL weights, beta resolved; None: no KL
    loss: Loss  # the loss, its actor loss and KL term chosen once (rl/loss.py)
    stop_rule: dict
    held_out: HeldOut  # evaluation and probe prompts: never training prompts


def load_models(config: RLConfig, run_dir: Path, device):
    """The frozen reference and the policy, both from the pre-trained model (the policy, on --resume, from
    the run's checkpoint), with a fresh value head for a2c and ppo; returns (ref_lm, tokenizer, n_digits, policy)."""
    ref_lm, tokenizer, n_digits = load_pretrained(config.pretrained, config.n_digits, kinds=("pretrain",))
    ref_lm.to(device).eval().requires_grad_(False)
    start = run_dir / "model" if config.resume else Path(config.pretrained)
    lm, _, _ = load_pretrained(start, n_digits)
    critic = config.algorithm in CRITIC_ALGORITHMS
    value_head = ValueHead(lm.config.n_embd) if critic else None
    if config.resume and critic:
        value_head.load_state_dict(load_file(str(run_dir / "model" / "value_head.safetensors")))
    return ref_lm, tokenizer, n_digits, Policy(lm, value_head, config.detach_critic).to(device).train()


def set_up(config: RLConfig) -> tuple[RLRun, int, int]:
    """Everything the loop reads, once: the models, the resolved config (derived and calibrated, then saved;
    on --resume read back, with the optimizer's state), the loss. Returns the run and the iteration and
    episode it starts at."""
    config, run_dir, ranks = distributed.start_run(config, validate)
    ref_lm, tokenizer, n_digits, policy = load_models(config, run_dir, ranks.device)
    optimizer = torch.optim.Adam(policy.parameters(), lr=config.lr)
    kl_rule = kl_weight_rule(config, tokenizer)  # the per-token KL weights (kl_rules); None: no KL
    resolved = derive(config, n_digits, kl_rule)
    longest = 10 ** (n_digits + resolved.plus) - 1
    check_fits(policy.lm, len(addition.prompt(longest, longest)) + resolved.max_new_tokens)
    iteration = episodes = 0
    if config.resume:
        state = torch.load(run_dir / "model" / "trainer_state.pt", map_location=ranks.device, weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        iteration, episodes = state["iteration"], state["episodes"]
        resolved = Resolved.read(load_run_config(run_dir), resolved)
        if ranks.main:
            print(f"resuming {run_dir} at episode {episodes}")
    else:
        resolved = calibrate(resolved, config, ref_lm, tokenizer, kl_rule)
        if ranks.main:
            run_dir.mkdir(parents=True, exist_ok=True)
            save_config(run_dir, config, kind="rl", **resolved.record(), n_params=count_parameters(policy), device=str(ranks.device),
                        **({"ranks": ranks.world} if ranks.world > 1 else {}))
    run = RLRun(config, resolved, run_dir, ranks, ref_lm, tokenizer, policy, ranks.wrap(policy), optimizer,
                None if kl_rule is None else kl_rule.with_beta(resolved.beta), loss_of(config, resolved.kl_coef_used),
                addition_stop_rule(tokenizer), held_out_prompts(resolved, config))
    if ranks.main:
        print(describe(run))
    return run, iteration, episodes


def describe(run: RLRun) -> str:
    """The start-up line: the algorithm, the penalty with its resolved values, the task and the sizes."""
    config, r = run.config, run.resolved
    text = f"RL {config.algorithm} with {config.kl} KL"
    if config.kl == "prioritized" and config.kl_weights is None:
        text += f" (beta {r.beta:.4g}{' = auto' if config.beta == 'auto' else ''})"
    if config.kl_weights is not None:
        text += f" (weights {run.kl_rule})"
    if config.match_weight_beta is not None:
        text += f" (alpha {r.kl_coef_used:.4g} = {config.kl_coef:g} x E[c^{config.match_weight_beta:g}])"
    text += (f" on {config.task} ({r.n_digits + r.plus} digits) from {config.pretrained}: {config.episodes} episodes,"
             f" {config.batch_size} per collect" + (f" ({r.prompts_per_collect} prompts x {r.group_size})" if r.group_size > 1 else "")
             + f", minibatches of {config.minibatch_size}, {r.update_epochs} epoch(s), lr {config.lr}, temperature {config.temperature}")
    return text + (f", split over {run.ranks.world} ranks" if run.ranks.world > 1 else "")


def rollout_episodes(run: RLRun, pairs, sampler: torch.Generator):
    """Step 1: the episodes of these prompts, sampled from the policy at its temperature (generation.Rollout)."""
    run.policy.eval()
    prompts = [encode(run.tokenizer, addition.prompt(a, b)) for a, b in pairs]
    if run.ranks.world == 1:
        rollout = generate(run.policy.lm, prompts, max_new_tokens=run.resolved.max_new_tokens, temperature=run.config.temperature,
                           generator=sampler, **run.stop_rule)
    else:
        rollout = shared_rollout(run.ranks, run.policy.lm, prompts, run.resolved.max_new_tokens, run.config.temperature, sampler, run.stop_rule)
    run.policy.train()
    return rollout


def minibatch_rows(episodes: int, size: int, epochs: int, sampler: torch.Generator) -> list[torch.Tensor]:
    """The episodes of every minibatch of every epoch, each epoch in a new random order: (<= size,) each."""
    batches = []
    for _ in range(epochs):
        order = torch.randperm(episodes, generator=sampler)
        batches += [order[start : start + size] for start in range(0, episodes, size)]
    return batches


def optimizer_step(run: RLRun, loss, share) -> torch.Tensor:
    """Step 8: backward (under torchrun: each rank's part of the minibatch mean, distributed.py), gradient
    clipping, Adam; returns the gradient norm before clipping."""
    run.optimizer.zero_grad(set_to_none=True)
    (loss if share is None else loss * share).backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(run.policy.parameters(), run.config.grad_clip)
    run.optimizer.step()
    return grad_norm


def log_terms(stats: dict[str, list[float]], terms: LossTerms, grad_norm, ranks: distributed.Ranks, share) -> None:
    """Appends a minibatch's loss terms (its mean over the ranks under torchrun) and gradient norm to ``stats``."""
    for name, value in terms.logged().items():
        value = value.detach() if share is None else ranks.sum(value.detach() * share) / ranks.world  # the minibatch's mean
        stats.setdefault(name, []).append(float(value))
    stats.setdefault("grad_norm", []).append(float(grad_norm))


def iteration_record(run: RLRun, batch: RolloutBatch, finished, reference: kl_rules.ReferenceStats, stats, selection: SelectionCounts,
                     iteration: int, episodes: int, timer: Timer) -> dict:
    """Step 9: the metrics line of an iteration: rewards and episodes, the mean of each loss term over its
    minibatches, the time split, the selection of the freed tokens and the KL weights' statistics."""
    mask, returns = batch.completion_mask, batch.rewards.sum(-1)  # (B, T), (B,)
    record = {"step": episodes, "episodes": episodes, "iteration": iteration,
              "reward": returns.mean().item(), "accuracy": (returns > 0).float().mean().item(),
              "episode_length": mask.sum(-1).float().mean().item(), "truncated": (~finished).float().mean().item(),
              **{k: float(np.mean(v)) for k, v in stats.items()}, **{f"time/{k}": v for k, v in timer.totals.items()}}
    if run.loss.tracks_selection:
        record.update(selection.record())
    if batch.weights is not None:
        w = batch.weights[mask]
        record.update({"weight_mean": w.mean().item(), "weight_q05": torch.quantile(w, 0.05).item(),
                       "weight_q50": torch.quantile(w, 0.5).item(), "certainty_mean": reference.certainty[mask].mean().item()})
    return record


def final_evaluation(run: RLRun, record: dict, episodes: int) -> dict:
    """The evaluation at the end of the run, on the larger held-out sets, with the continuous endpoints
    (rl/endpoints.py; a run with a KL term in its loss also its realized penalty ratio), written to
    final_eval.json; the record also gets the curves' last point when the final sets hold the intermediate ones."""
    config, penalized = run.config, run.loss.penalized
    final = evaluate_policy(run.policy.lm, run.tokenizer, run.resolved.n_digits, config, run.held_out, final=True, ref_lm=run.ref_lm,
                            records=read_metrics(run.run_dir) + [record] if penalized else None,
                            kl_coef=run.loss.kl_coef if penalized else None)
    write_json(run.run_dir / "final_eval.json", {"episodes": episodes, **{k: v for k, v in final.items() if k.startswith("final/")}, "prompts": {
        "task": config.final_eval_episodes, "comfort": config.final_eval_comfort_episodes, "probe": config.final_probe_examples}})
    return final


def train(config: RLConfig) -> Path:
    """The ``rl`` command: sets the run up (or resumes it), then iterates the numbered steps; returns its directory."""
    run, iteration, episodes = set_up(config)
    config, resolved, ranks, policy = run.config, run.resolved, run.ranks, run.policy
    metrics = MetricsLog(run.run_dir / "metrics.jsonl", truncate_after_step=episodes if config.resume else None) if ranks.main else None
    if not config.resume and ranks.main:
        metrics.log({"step": 0, "episodes": 0, **evaluate_policy(policy.lm, run.tokenizer, resolved.n_digits, config, run.held_out)})
    timer = Timer()
    bar = tqdm(total=resolved.iterations * config.batch_size, initial=episodes, desc=f"rl {config.kl}", unit="ep", dynamic_ncols=True, disable=not ranks.main)
    while iteration < resolved.iterations:
        # Every iteration draws its prompts and samples from their own streams of (seed, iteration)
        # (seeding.py): the same seed gives the same numbers, and --resume continues exactly.
        sampler = torch.Generator().manual_seed(stream_seed(config.seed, "sampling", iteration))
        prompt_pairs = training_prompts(resolved, config, iteration, run.held_out)
        pairs = [pair for pair in prompt_pairs for _ in range(resolved.group_size)]  # each group's episodes side by side

        # 1. Rollout: sample episodes from the policy at its temperature.
        with timer("rollout"):
            rollout = rollout_episodes(run, pairs, sampler)
            texts = rollout.completions(run.tokenizer)
        b_sequences, b_completion_mask, P = rollout.sequences, rollout.completion_mask, rollout.prompt_length  # (B, P + T), (B, T)

        # 2. Reward: +1 / -1 at the end of each episode; and where the template's critical tokens are,
        #    for the selection precision of the tokens freed.
        b_rewards = terminal_rewards(pairs, texts, rollout.finished, b_completion_mask)  # (B, T)
        b_critical = b_on_template = None
        if run.loss.tracks_selection:
            b_critical, b_on_template = (m.to(ranks.device) for m in template_masks(pairs, texts, resolved.n_digits, b_completion_mask.shape[1]))

        # 3. Reference: log-probs of the sampled tokens and certainty c(s) of the frozen model.
        with timer("reference"):
            b_ref_logprobs, reference = reference_pass(run.ref_lm, b_sequences, rollout.attention_mask, P, config, run.kl_rule.needs if run.kl_rule else ())

        # 4. KL weights: the rule's, e.g. the prioritized KL penalty's w(s) = c(s)^beta (kl_rules.prioritized);
        #    ppo, grpo, rloo: the advantages of the whole collect, with the sampling log-probs as pi_old.
        b_weights = None if run.kl_rule is None else run.kl_rule(reference, b_sequences[:, P:], b_completion_mask)  # (B, T) or None
        batch = RolloutBatch(b_sequences, rollout.attention_mask, P, b_completion_mask, rollout.logprobs, b_ref_logprobs, b_rewards,
                             b_weights, critical=b_critical, on_template=b_on_template)
        with timer("update"):
            batch = collect_advantages(policy, batch, config, resolved.group_size, run.loss.kl_coef)

        stats: dict[str, list[float]] = {}
        selection = SelectionCounts()
        for rows in minibatch_rows(len(pairs), config.minibatch_size, resolved.update_epochs, sampler):
            mb = batch.minibatch(rows[ranks.rows(len(rows))])  # this rank's episodes of the minibatch, (b, P + T) and (b, T)
            share = ranks.token_share(mb.completion_mask.sum()) if ranks.world > 1 else None  # this rank's part of the minibatch's mean
            with timer("update"):
                # 5. Policy: log-probs of the taken actions, entropy and values, one teacher-forced pass.
                logits, values = run.train_policy(mb.sequences, mb.attention_mask, P, config.temperature)  # (b, T, V), (b, T)
                logprobs, entropy = token_logprobs_and_entropy(logits, mb.actions)  # (b, T) each

                # 6. Advantages: a2c: GAE on the current values; ppo, grpo, rloo: those fixed at step 4.
                advantages, returns = minibatch_advantages(mb, values, logprobs, config, run.loss.kl_coef)  # (b, T), (b, T) or None

                # 7. Loss, term by term (rl/loss.py); a --method other than kl changes the actor loss and
                #    singles out the tokens it frees (`terms.selected`).
                terms = rl_loss(run.loss, mb, logprobs, entropy, values, advantages, returns, sampler)
                if not torch.isfinite(terms.total):
                    raise UserError(f"non-finite loss at episode {episodes} (iteration {iteration}); "
                                    f"the last good checkpoint is in {run.run_dir / 'model'}")

                # 8. Update.
                grad_norm = optimizer_step(run, terms.total, share)
            if terms.selected is not None:
                selection.add(terms.selected, mb.critical, mb.on_template)
            log_terms(stats, terms, grad_norm, ranks, share)

        # 9. Log (and every eval_every episodes: evaluate, checkpoint; rank 0 alone evaluates and writes).
        iteration += 1
        episodes += len(pairs)
        record = iteration_record(run, batch, rollout.finished, reference, stats, selection, iteration, episodes, timer)
        checkpoint = (episodes % config.eval_every < config.batch_size or iteration == resolved.iterations) and ranks.main
        if checkpoint:
            with timer("evaluation"):
                if iteration == resolved.iterations:  # with the curves' last point when its sets hold theirs
                    record.update(final_evaluation(run, record, episodes))
                if "eval/accuracy_greedy" not in record:
                    record.update(evaluate_policy(policy.lm, run.tokenizer, resolved.n_digits, config, run.held_out))
        if ranks.main:
            metrics.log(record)  # before the checkpoint: a resumed run drops lines past its checkpoint
        if checkpoint:
            save_checkpoint(run.run_dir, policy, run.tokenizer, run.optimizer, iteration, episodes)
        bar.update(len(pairs))
        bar.set_postfix(reward=f"{record['reward']:+.2f}", acc=f"{record['accuracy']:.2f}", kl=f"{record['kl']:.4f}",
                        w=f"{record.get('weight_mean', float('nan')):.3f}")
        if "eval/accuracy_greedy" in record:
            bar.write(f"episode {episodes}: greedy {record['eval/accuracy_greedy']:.2f}, sampled {record['eval/accuracy_sampled']:.2f}, "
                      f"comfort {record['eval/comfort_accuracy_greedy']:.2f}, p(critical) {record.get('p_correct/critical_mean', float('nan')):.3f}")
    bar.close()
    ranks.barrier()  # the other ranks wait for rank 0's last checkpoint
    if not ranks.main:
        return run.run_dir
    metrics.close()
    total = sum(timer.totals.values())
    print("time split: " + ", ".join(f"{k} {v:.1f}s ({100 * v / total:.0f}%)" for k, v in timer.totals.items()))
    return run.run_dir
