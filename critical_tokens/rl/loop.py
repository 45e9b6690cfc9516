"""RL fine-tuning with A2C (or PPO, GRPO, RLOO) and a standard or prioritized KL penalty (docs/method.md sections 4 and 5).

One iteration, as numbered steps in :func:`train`:

1. rollout    - sample a batch of episodes from the policy at its temperature (KV cache);
               grpo and rloo: ``group_size`` episodes per prompt;
2. reward     - +1 / -1 on the last token of each episode (a length-limit hit counts as wrong);
3. reference  - one teacher-forced pass of the frozen pre-trained model: log-probs and certainty;
4. KL weights - the rule's (kl_rules): c(s)^beta (prioritized), 1 (standard), --kl-weights, or none;
               ppo, grpo and rloo also fix the advantages of the whole collect here (:func:`collect_advantages`);
then for each epoch (ppo: 4, others: 1) and each minibatch of episodes:
5. policy     - one teacher-forced pass of the policy: log-probs, entropy, values (a2c, ppo);
6. advantages - a2c: GAE (gamma 1, lambda 0.95) on the current values; others: those of step 4;
7. loss       - actor + vf_coef * value - ent_coef * entropy + kl_coef * KL term, the actor loss
               being A2C's -A log pi or the clipped surrogate of PPO (policy_gradient.py);
8. update     - gradient clipping, Adam;
and at the end of the iteration: 9. log (and every ``eval_every`` episodes: evaluate, checkpoint).

The paper's reference code takes one gradient step every 2 tokens of a single episode with a
learning rate of 1e-6; here a step is taken on a minibatch of whole episodes, so the learning rate
is larger (see ``RLConfig.lr``). Both arms of a comparison share every value except the KL options.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .. import addition, distributed, kl, kl_rules
from .. import token_weights as tw
from ..seeding import stream_seed
from .a2c import ValueHead, entropy_from_logits, gae, token_logprobs
from .evaluation import evaluate_policy, held_out_prompts, training_prompts
from ..generation import addition_stop_rule, concatenate, generate
from ..model import RL_SLACK, check_fits, count_parameters, load_pretrained
from .policy_gradient import clipped_surrogate, group_advantages, leave_one_out_advantages
from .config import CRITIC_ALGORITHMS, RLConfig, kl_weight_rule, validate
from ..critical.selection import SelectionCounts, template_masks
from ..runs import MetricsLog, Timer, UserError, atomic_dir, load_run_config, read_metrics, save_config, write_json
from ..tokenizer import encode


class Policy(torch.nn.Module):
    """The language model and the critic's value head, sharing the transformer (docs/method.md section 4).
    grpo and rloo have no critic: ``value_head`` None, and the values None. ``detach_critic``: the
    head reads the hidden states detached, so the value loss trains the head alone."""

    def __init__(self, lm, value_head: ValueHead | None, detach_critic: bool = False):
        super().__init__()
        self.lm = lm
        self.value_head = value_head
        self.detach_critic = detach_critic

    def forward(self, sequences, attention_mask, prompt_length: int, temperature: float):
        """Teacher-forced pass over prompt + completion; returns the action logits at the policy
        temperature (B, T, V) and the values of the states the actions were taken in (B, T)."""
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        critic = self.value_head is not None
        with torch.autocast(sequences.device.type, dtype=torch.bfloat16, enabled=sequences.is_cuda):  # GPU: bf16 matmuls
            out = self.lm(input_ids=sequences, attention_mask=attention_mask, position_ids=position_ids, output_hidden_states=critic)
        states = slice(prompt_length - 1, sequences.shape[1] - 1)  # state t predicts completion token t
        logits = out.logits[:, states].float() / temperature  # (B, T, V)
        if critic:
            hidden = out.hidden_states[-1][:, states]  # (B, T, D)
            values = self.value_head((hidden.detach() if self.detach_critic else hidden).float())  # (B, T)
        else:
            values = None
        return logits, values


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
    ref_logprobs = token_logprobs(logits / config.temperature, actions)
    certainty = kl.certainty(logits, config.certainty, config.certainty_temperature)
    entropy = entropy_from_logits(logits / config.temperature) if "entropy" in needs else None
    return ref_logprobs, kl_rules.ReferenceStats(certainty, entropy)


def terminal_rewards(pairs, texts, finished, completion_mask, wrong: float = -1.0) -> torch.Tensor:
    """(B, T): 0 everywhere, +1 / ``wrong`` on each episode's last token (docs/method.md section 4)."""
    correct = torch.tensor([addition.is_correct(a, b, t) for (a, b), t in zip(pairs, texts)])
    correct &= finished.cpu()  # an episode that hit the length limit is wrong
    final = torch.where(correct, 1.0, wrong)
    rewards = torch.zeros(completion_mask.shape)
    last = completion_mask.long().sum(-1) - 1  # (B,)
    rewards[torch.arange(len(pairs)), last] = final
    return rewards.to(completion_mask.device)


@torch.no_grad()
def collect_advantages(policy: Policy, rollout, rewards, config: RLConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
    """ppo, grpo, rloo: the (advantages, returns) of a whole collect, (B, T) each, fixed before the
    policy moves. ppo: GAE on the critic's values at collect time (one pass without gradient);
    grpo, rloo: one advantage per episode from the total rewards of its group, on each of its tokens,
    and no returns (no critic). ``rewards``: (B, T), the KL already in them under --kl-as-reward."""
    mask = rollout.completion_mask  # (B, T)
    if config.algorithm == "ppo":
        size, P = config.minibatch_size, rollout.prompt_length
        values = torch.cat([policy(rollout.sequences[i : i + size], rollout.attention_mask[i : i + size], P, config.temperature)[1]
                            for i in range(0, len(mask), size)])  # (B, T)
        return gae(rewards, values, mask, config.gamma, config.gae_lambda)
    baseline = group_advantages if config.algorithm == "grpo" else leave_one_out_advantages
    advantages = baseline(rewards.sum(-1), config.group_size)  # (B,)
    return advantages[:, None] * mask, None


def method_actor_loss(config: RLConfig, logprobs, old_logprobs, advantages, entropy, completion_mask, generator):
    """The actor loss of a token-level ``--method`` other than kl (token_weights.py), and the set of
    tokens it frees or favours (b, T) bool: entropy80 the selected tokens, archer the high-entropy
    set, kl_cov and clip_cov the tokens selected by covariance. All (b, T); ``generator`` draws
    Clip-Cov's random pick."""
    if config.method == "entropy80":  # policy gradient on the high-entropy minority only (TRL's normaliser: all tokens)
        selected = tw.high_entropy_mask(entropy, completion_mask, config.entropy_quantile)
        per_token = tw.clipped_surrogate_per_token(logprobs, old_logprobs, advantages, config.clip_range, config.clip_range)
        return tw.masked_policy_gradient(per_token, selected, completion_mask, denominator="all"), selected
    if config.method == "archer":  # wider clip on each response's high-entropy tokens
        selected = tw.archer_high_entropy_set(entropy, completion_mask, config.archer_quantile)
        eps_low, eps_high = tw.archer_clip_ranges(selected, (config.clip_range,) * 2, (config.archer_clip_high,) * 2)
        per_token = tw.clipped_surrogate_per_token(logprobs, old_logprobs, advantages, eps_low, eps_high)
        return kl.masked_mean(per_token, completion_mask), selected
    cov = tw.token_covariance(advantages, logprobs, completion_mask)  # (b, T)
    if config.method == "kl_cov":  # |log r| penalty on the tokens of highest covariance, no clipping
        selected = tw.kl_cov_selection(cov, completion_mask, config.cov_ratio)
        return tw.kl_cov_loss(logprobs, old_logprobs, advantages, selected, completion_mask, config.kl_cov_coef), selected
    ratio = torch.exp(logprobs.detach().float() - old_logprobs.float())  # clip_cov: a gradient stop on random tokens of high covariance
    selected = tw.clip_cov_selection(cov, ratio, advantages, completion_mask, config.clip_range, config.clip_range,
                                     config.clip_cov_low, config.clip_cov_high, config.cov_ratio, generator)
    return tw.clip_cov_loss(logprobs, old_logprobs, advantages, selected, completion_mask, config.clip_range, config.clip_range), selected


@torch.no_grad()
def certainty_on_own_rollouts(ref_lm, tokenizer, n_digits: int, config: RLConfig, count: int, seed: int) -> torch.Tensor:
    """The reference's certainty c(s) at every completion token of its own rollouts of ``count`` RL
    prompts, sampled at the RL temperature (the policy's tokens before any update); flat (tokens,)."""
    stream = stream_seed(seed, "calibration")
    pairs = addition.rl_pairs(n_digits, int(config.task[-1]), count, seed=stream)
    prompts = [encode(tokenizer, addition.prompt(a, b)) for a, b in pairs]
    max_new = addition.max_completion_length(n_digits + int(config.task[-1])) + RL_SLACK
    gen = generate(ref_lm, prompts, max_new_tokens=max_new, temperature=config.temperature,
                   certainty_method=config.certainty, certainty_temperature=config.certainty_temperature,
                   generator=torch.Generator().manual_seed(stream), **addition_stop_rule(tokenizer))
    return gen.certainty[gen.completion_mask]


# The matched-weight control's calibration: one set of prompts for every seed, so that all the seeds
# of a starting model share one coefficient (measured once, before RL; the seeds differ in RL alone).
MATCH_CALIBRATION_PROMPTS, MATCH_CALIBRATION_SEED = 512, 0


def matched_weight(ref_lm, tokenizer, n_digits: int, config: RLConfig) -> tuple[float, dict]:
    """--match-weight-beta B: the factor E[c^B] by which the matched-weight control scales its uniform
    penalty, the mean prioritized weight (kl.prioritized_weights) over the reference's own rollouts.
    A uniform coefficient kl_coef * E[c^B] gives the penalty the prioritized arm's mean weight at the
    start of RL, spread evenly instead of lifted at the uncertain tokens."""
    c = certainty_on_own_rollouts(ref_lm, tokenizer, n_digits, config, MATCH_CALIBRATION_PROMPTS, MATCH_CALIBRATION_SEED)
    factor = float(kl.prioritized_weights(c, config.match_weight_beta).mean())
    return factor, {"match_weight_beta": config.match_weight_beta, "mean_weight": factor, "tokens": int(c.numel()),
                    "prompts": MATCH_CALIBRATION_PROMPTS, "calibration_seed": MATCH_CALIBRATION_SEED}


def calibrated_beta(ref_lm, tokenizer, n_digits: int, config: RLConfig) -> tuple[float, dict]:
    """--beta auto: beta such that the weight is ``auto_beta_weight`` at the ``auto_beta_quantile``
    of the reference's certainty on its own rollouts of RL prompts (kl.calibrate_beta)."""
    c = certainty_on_own_rollouts(ref_lm, tokenizer, n_digits, config, 64, config.seed)
    beta = kl.calibrate_beta(c, config.auto_beta_quantile, config.auto_beta_weight)
    quantiles = {f"c_q{int(q * 100):02d}": float(torch.quantile(c, q)) for q in (0.01, 0.05, 0.25, 0.5)}
    return beta, quantiles


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


def train(config: RLConfig) -> Path:
    config, run_dir, ranks = distributed.start_run(config, validate)
    device = ranks.device

    # The frozen reference and the policy both start from the pre-trained model.
    ref_lm, tokenizer, n_digits = load_pretrained(config.pretrained, config.n_digits, kinds=("pretrain",))
    ref_lm.to(device).eval().requires_grad_(False)
    start = run_dir / "model" if config.resume else Path(config.pretrained)
    lm, _, _ = load_pretrained(start, n_digits)
    critic = config.algorithm in CRITIC_ALGORITHMS
    value_head = ValueHead(lm.config.n_embd) if critic else None
    if config.resume and critic:
        value_head.load_state_dict(load_file(str(run_dir / "model" / "value_head.safetensors")))
    policy = Policy(lm, value_head, config.detach_critic).to(device).train()
    train_policy = ranks.wrap(policy)  # DistributedDataParallel under torchrun
    optimizer = torch.optim.Adam(policy.parameters(), lr=config.lr)

    plus = int(config.task[-1])
    group_size = config.group_size if config.algorithm in ("grpo", "rloo") else 1  # episodes per prompt
    epochs = config.update_epochs or (4 if config.algorithm == "ppo" else 1)
    stop_rule = addition_stop_rule(tokenizer)
    max_new = addition.max_completion_length(n_digits + plus) + RL_SLACK  # docs/method.md section 4
    prompt_len = len(addition.prompt(10 ** (n_digits + plus) - 1, 10 ** (n_digits + plus) - 1))
    check_fits(lm, prompt_len + max_new)
    iterations = math.ceil(config.episodes / config.batch_size)
    if min(config.minibatch_size, config.batch_size % config.minibatch_size or config.minibatch_size) < ranks.world:
        raise UserError(f"every minibatch needs an episode per rank: --minibatch-size {config.minibatch_size} with "
                        f"--batch-size {config.batch_size} leaves a minibatch of {config.batch_size % config.minibatch_size} for {ranks.world} ranks")
    iteration, episodes = 0, 0
    kl_rule = kl_weight_rule(config, tokenizer)  # the per-token KL weights (kl_rules); None: no KL
    if config.resume:
        state = torch.load(run_dir / "model" / "trainer_state.pt", map_location=device, weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        iteration, episodes = state["iteration"], state["episodes"]
        saved = load_run_config(run_dir)
        beta, kl_coef = saved["beta"], saved.get("kl_coef_used", config.kl_coef)
        if ranks.main:
            print(f"resuming {run_dir} at episode {episodes}")
    else:
        beta_info = {}
        if kl_rule is not None and kl_rule.needs_calibration:  # --beta auto, or prioritized:auto in --kl-weights
            beta, beta_info = calibrated_beta(ref_lm, tokenizer, n_digits, config)
        else:
            beta = float(config.beta) if config.beta != "auto" else 0.0
        # The KL coefficient applied: --kl-coef, or for the matched-weight control --kl-coef x E[c^beta].
        match_info, kl_coef = {}, config.kl_coef
        if config.match_weight_beta is not None:
            factor, match_info = matched_weight(ref_lm, tokenizer, n_digits, config)
            kl_coef = config.kl_coef * factor
        if ranks.main:
            run_dir.mkdir(parents=True, exist_ok=True)
            save_config(run_dir, config, kind="rl", n_digits=n_digits, beta=beta, beta_calibration=beta_info,
                        kl_weights_rule=None if kl_rule is None else str(kl_rule.with_beta(beta)),
                        kl_coef_used=kl_coef, kl_calibration=match_info,
                        n_params=count_parameters(policy), iterations=iterations, max_new_tokens=max_new, device=str(device),
                        update_epochs=epochs, prompts_per_collect=config.batch_size // group_size,
                        **({"ranks": ranks.world} if ranks.world > 1 else {}))
    kl_rule = None if kl_rule is None else kl_rule.with_beta(beta)
    if ranks.main:
        print(f"RL {config.algorithm} with {config.kl} KL" + (f" (beta {beta:.4g}{' = auto' if config.beta == 'auto' else ''})" if config.kl == "prioritized" and config.kl_weights is None else "")
              + (f" (weights {kl_rule})" if config.kl_weights is not None else "")
              + (f" (alpha {kl_coef:.4g} = {config.kl_coef:g} x E[c^{config.match_weight_beta:g}])" if config.match_weight_beta is not None else "")
              + f" on {config.task} ({n_digits + plus} digits) from {config.pretrained}: {config.episodes} episodes,"
              f" {config.batch_size} per collect" + (f" ({config.batch_size // group_size} prompts x {group_size})" if group_size > 1 else "")
              + f", minibatches of {config.minibatch_size}, {epochs} epoch(s), lr {config.lr}, temperature {config.temperature}"
              + (f", split over {ranks.world} ranks" if ranks.world > 1 else ""))

    held_out = held_out_prompts(n_digits, config)  # evaluation and probe prompts: never training prompts
    tracks_selection = config.method != "kl" or config.kl == "prioritized"  # a method that frees a set of tokens
    metrics = MetricsLog(run_dir / "metrics.jsonl", truncate_after_step=episodes if config.resume else None) if ranks.main else None
    if not config.resume and ranks.main:
        metrics.log({"step": 0, "episodes": 0, **evaluate_policy(policy.lm, tokenizer, n_digits, config, held_out)})
    timer = Timer()
    bar = tqdm(total=iterations * config.batch_size, initial=episodes, desc=f"rl {config.kl}", unit="ep", dynamic_ncols=True, disable=not ranks.main)
    while iteration < iterations:
        # Every iteration draws its prompts and samples from their own streams of (seed, iteration)
        # (seeding.py): the same seed gives the same numbers, and --resume continues exactly.
        sampler = torch.Generator().manual_seed(stream_seed(config.seed, "sampling", iteration))
        prompt_pairs = training_prompts(n_digits, config, iteration, held_out)
        pairs = [pair for pair in prompt_pairs for _ in range(group_size)]  # each group's episodes side by side

        # 1. Rollout: sample episodes from the policy at its temperature.
        with timer("rollout"):
            policy.eval()
            prompts = [encode(tokenizer, addition.prompt(a, b)) for a, b in pairs]
            if ranks.world == 1:
                rollout = generate(policy.lm, prompts, max_new_tokens=max_new, temperature=config.temperature, generator=sampler, **stop_rule)
            else:
                rollout = shared_rollout(ranks, policy.lm, prompts, max_new, config.temperature, sampler, stop_rule)
            policy.train()
            texts = rollout.completions(tokenizer)
            b_sequences, b_attention_mask, P = rollout.sequences, rollout.attention_mask, rollout.prompt_length
            b_completion_mask = rollout.completion_mask  # (B, T)

        # 2. Reward: +1 / -1 at the end of each episode.
        b_rewards = terminal_rewards(pairs, texts, rollout.finished, b_completion_mask)  # (B, T)
        #    and where the template's critical tokens are, for the selection precision of the tokens freed
        if tracks_selection:
            b_critical, b_on_template = (m.to(device) for m in template_masks(pairs, texts, n_digits, b_completion_mask.shape[1]))  # (B, T)
            selection = SelectionCounts()

        # 3. Reference: log-probs of the sampled tokens and certainty c(s) of the frozen model.
        with timer("reference"):
            b_ref_logprobs, b_reference = reference_pass(ref_lm, b_sequences, b_attention_mask, P, config, kl_rule.needs if kl_rule else ())  # (B, T)

        # 4. KL weights: the rule's, e.g. the prioritized KL penalty's w(s) = c(s)^beta (kl_rules.prioritized).
        b_weights = None if kl_rule is None else kl_rule(b_reference, b_sequences[:, P:], b_completion_mask)  # (B, T) or None
        #    ppo, grpo, rloo: the advantages of the whole collect, with the sampling log-probs as pi_old.
        b_old_logprobs = rollout.logprobs  # (B, T)
        b_advantages = b_returns = None
        if config.algorithm != "a2c":
            with timer("update"):
                rewards = b_rewards
                if config.kl_as_reward and b_weights is not None:
                    kl_rewards = kl_coef * b_weights * kl.kl_estimate(b_old_logprobs, b_ref_logprobs, config.estimator)  # (B, T)
                    rewards = rewards - kl_rewards * b_completion_mask
                b_advantages, b_returns = collect_advantages(policy, rollout, rewards, config)  # (B, T), (B, T) or None

        stats: dict[str, list[float]] = {}
        batches = []  # the minibatches of every epoch, each epoch in a new random order
        for _ in range(epochs):
            order = torch.randperm(len(pairs), generator=sampler)
            batches += [order[start : start + config.minibatch_size] for start in range(0, len(pairs), config.minibatch_size)]
        for mb in batches:
            mb = mb[ranks.rows(len(mb))]  # this rank's episodes of the minibatch
            mb_mask = b_completion_mask[mb]
            T = int(mb_mask.sum(-1).max())  # trim the minibatch's trailing padding
            mb_mask = mb_mask[:, :T]
            share = ranks.token_share(mb_mask.sum()) if ranks.world > 1 else None  # this rank's part of the minibatch's mean
            with timer("update"):
                # 5. Policy: log-probs of the taken actions, entropy and values, one teacher-forced pass.
                logits, values = train_policy(b_sequences[mb, : P + T], b_attention_mask[mb, : P + T], P, config.temperature)  # (b, T, V), (b, T)
                logprobs = token_logprobs(logits, b_sequences[mb, P : P + T])  # (b, T)
                entropy = entropy_from_logits(logits)  # (b, T)
                ref_logprobs = b_ref_logprobs[mb, :T]
                weights = None if b_weights is None else b_weights[mb, :T]
                kl_per_token = kl.kl_estimate(logprobs, ref_logprobs, config.estimator)  # (b, T)

                # 6. Advantages: a2c: GAE on the terminal reward (optionally minus the weighted KL per
                #    token) and the current values; ppo, grpo, rloo: those fixed at step 4.
                if b_advantages is None:
                    rewards = b_rewards[mb, :T]
                    if config.kl_as_reward and weights is not None:
                        rewards = rewards - kl_coef * (weights * kl_per_token).detach()
                    advantages, returns = gae(rewards, values.detach(), mb_mask, config.gamma, config.gae_lambda)
                else:
                    advantages = b_advantages[mb, :T]
                    returns = None if b_returns is None else b_returns[mb, :T]

                # 7. Loss, term by term; a --method other than kl changes the actor loss (token_weights.py)
                #    and singles out the tokens it frees (`selected`).
                selected = None if weights is None or config.kl != "prioritized" else weights < 0.5  # (b, T)
                if config.algorithm == "a2c":
                    actor_loss = -kl.masked_mean(advantages * logprobs, mb_mask)
                elif config.method == "kl":
                    actor_loss, clip_fraction = clipped_surrogate(logprobs, b_old_logprobs[mb, :T], advantages, mb_mask, config.clip_range)
                    stats.setdefault("clip_fraction", []).append(float(clip_fraction if share is None else ranks.sum(clip_fraction * share) / ranks.world))
                else:
                    actor_loss, selected = method_actor_loss(config, logprobs, b_old_logprobs[mb, :T], advantages, entropy.detach(), mb_mask, sampler)
                if tracks_selection and selected is not None:
                    selection.add(selected, b_critical[mb, :T], b_on_template[mb, :T])
                if values is not None:
                    value_loss = 0.5 * kl.masked_mean((values - returns) ** 2, mb_mask)
                else:
                    value_loss = torch.zeros((), device=device)  # grpo, rloo: no critic
                entropy_bonus = kl.masked_mean(entropy, mb_mask)
                if weights is None or config.kl_as_reward:
                    kl_term = torch.zeros((), device=device)
                elif config.method == "archer":  # the high-entropy tokens' KL scaled, each group averaged on its own
                    kl_term = tw.archer_kl(weights * kl_per_token, selected, mb_mask, 1.0, config.archer_high_kl_scale)
                else:
                    kl_term = kl.kl_penalty(logprobs, ref_logprobs, mb_mask, config.estimator, weights)
                loss = actor_loss + config.vf_coef * value_loss - config.ent_coef * entropy_bonus + kl_coef * kl_term
                if not torch.isfinite(loss):
                    raise UserError(f"non-finite loss at episode {episodes} (iteration {iteration}); "
                                    f"the last good checkpoint is in {run_dir / 'model'}")

                # 8. Update (under torchrun: each rank's part of the minibatch mean, distributed.py).
                optimizer.zero_grad(set_to_none=True)
                (loss if share is None else loss * share).backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), config.grad_clip)
                optimizer.step()
            for name, value in (("loss", loss), ("actor_loss", actor_loss), ("value_loss", value_loss), ("entropy", entropy_bonus),
                                ("kl_term", kl_term), ("kl", kl.masked_mean(kl_per_token, mb_mask))):
                value = value.detach() if share is None else ranks.sum(value.detach() * share) / ranks.world  # the minibatch's mean
                stats.setdefault(name, []).append(float(value))
            stats.setdefault("grad_norm", []).append(float(grad_norm))

        # 9. Log.
        iteration += 1
        episodes += len(pairs)
        mask = b_completion_mask
        correct = (b_rewards.sum(-1) > 0).float()
        record = {"step": episodes, "episodes": episodes, "iteration": iteration,
                  "reward": b_rewards.sum(-1).mean().item(), "accuracy": correct.mean().item(),
                  "episode_length": mask.sum(-1).float().mean().item(), "truncated": (~rollout.finished).float().mean().item(),
                  **{k: float(np.mean(v)) for k, v in stats.items()}, **{f"time/{k}": v for k, v in timer.totals.items()}}
        if tracks_selection:
            record.update(selection.record())
        if b_weights is not None:
            w = b_weights[mask]
            record.update({"weight_mean": w.mean().item(), "weight_q05": torch.quantile(w, 0.05).item(),
                           "weight_q50": torch.quantile(w, 0.5).item(), "certainty_mean": b_reference.certainty[mask].mean().item()})
        checkpoint = episodes % config.eval_every < config.batch_size or iteration == iterations
        checkpoint = checkpoint and ranks.main  # rank 0 alone evaluates and writes
        if checkpoint:
            with timer("evaluation"):
                record.update(evaluate_policy(policy.lm, tokenizer, n_digits, config, held_out))
                if iteration == iterations:  # the final evaluation, on the larger held-out sets
                    penalized = b_weights is not None and not config.kl_as_reward  # a run with a KL term in its loss
                    final = evaluate_policy(policy.lm, tokenizer, n_digits, config, held_out, final=True, ref_lm=ref_lm,
                                            records=read_metrics(run_dir) + [record] if penalized else None,
                                            kl_coef=kl_coef if penalized else None)
                    record.update(final)
                    write_json(run_dir / "final_eval.json", {"episodes": episodes, **final, "prompts": {
                        "task": config.final_eval_episodes, "comfort": config.final_eval_comfort_episodes, "probe": config.final_probe_examples}})
        if ranks.main:
            metrics.log(record)  # before the checkpoint: a resumed run drops lines past its checkpoint
        if checkpoint:
            save_checkpoint(run_dir, policy, tokenizer, optimizer, iteration, episodes)
        bar.update(len(pairs))
        bar.set_postfix(reward=f"{record['reward']:+.2f}", acc=f"{record['accuracy']:.2f}", kl=f"{record['kl']:.4f}",
                        w=f"{record.get('weight_mean', float('nan')):.3f}")
        if "eval/accuracy_greedy" in record:
            bar.write(f"episode {episodes}: greedy {record['eval/accuracy_greedy']:.2f}, sampled {record['eval/accuracy_sampled']:.2f}, "
                      f"comfort {record['eval/comfort_accuracy_greedy']:.2f}, p(critical) {record.get('p_correct/critical_mean', float('nan')):.3f}")
    bar.close()
    ranks.barrier()  # the other ranks wait for rank 0's last checkpoint
    if not ranks.main:
        return run_dir
    metrics.close()
    total = sum(timer.totals.values())
    print("time split: " + ", ".join(f"{k} {v:.1f}s ({100 * v / total:.0f}%)" for k, v in timer.totals.items()))
    return run_dir
