"""Supervised pre-training on scratchpad addition with operands of 1..N digits (docs/method.md section 3).

:func:`pretrain` runs the steps, each a function: 1. data (``_data``) -> 2. model, AdamW with warmup +
cosine decay (``_build_model``) -> 3. per-step loss on the completion tokens (``_train_step``) ->
4. periodic in-distribution accuracy and checkpoints (``_write_back``).
A checkpoint (``model/``, Hugging Face format, plus ``trainer_state.pt``) lets ``--resume`` continue
with the same data order and give the same numbers as an uninterrupted run.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from . import addition, distributed
from .config import arg, check_fields, check_range
from .evaluate import accuracy_on
from .model import build_model, count_parameters, gpt2_reduced_vocab, load_model, load_pretrained, preset
from .runs import MetricsLog, UserError, atomic_dir, read_metrics, save_config
from .tokenizer import build_tokenizer, encode


LOG_EVERY = 50  # on a GPU: steps between the host's reads of the loss (each read waits for the GPU)


@dataclass(frozen=True)
class PretrainConfig:
    out: str = arg("runs/pretrain", "run directory to create (config, metrics.jsonl, model/)")
    n_digits: int = arg(5, "N: operands of 1..N digits (the comfort zone)")
    preset: str = arg("tiny", "model size: micro, tiny, small, medium or paper")
    init: Literal["scratch", "gpt2"] = arg("scratch", "from scratch, or pre-trained GPT-2 with the vocabulary reduced to characters")
    gpt2_source: str = arg("gpt2", "--init gpt2: hub name or local directory of a GPT-2 model and tokenizer")
    init_from: str | None = arg(None, "continued pre-training: start from the weights of this pre-training run (overrides --init and --preset)")
    examples_per_length: int = arg(20_000, "training examples per operand length (the paper: 20,000)")
    epochs: float = arg(1.0, "passes over the data set")
    batch_size: int = arg(64, "sequences per optimizer step")
    lr: float = arg(1e-3, "peak AdamW learning rate")
    weight_decay: float = arg(0.1, "AdamW weight decay")
    warmup_fraction: float = arg(0.05, "fraction of the steps with linear warmup, then cosine decay to 0")
    grad_clip: float = arg(1.0, "gradient-norm clipping")
    loss_on: Literal["completion", "all"] = arg("completion", "tokens that carry the loss: the completion, or the whole text")
    random_position_offset: bool = arg(False, "deviation from the paper: shift each sequence's positions by a random offset so every position embedding is trained")
    n_plus_one_fraction: float = arg(0.0, "deviation from the paper: this fraction of the training set are additions of N+1 digits (the RL task's length), so the model has seen a few of them")
    eval_every: int = arg(500, "steps between in-distribution accuracy checks")
    eval_examples: int = arg(200, "examples per in-distribution accuracy check")
    checkpoint_every: int = arg(500, "steps between checkpoints")
    seed: int = arg(0, "seed of the data set, the initialisation and the data order")
    device: str = arg("auto", "auto, cpu or cuda")
    compile: bool = arg(True, "on a GPU: torch.compile the training step once, with dynamic sequence length (the CPU runs eager)")
    max_minutes: float | None = arg(None, "stop after this many minutes of training (a checkpoint, and 'stopped_early' in the last "
                                    "metrics line); the schedule stays the one of --epochs, so the learning rate has not decayed yet")
    resume: bool = arg(False, "continue an interrupted run in --out from its last checkpoint")


def validate(config: PretrainConfig) -> None:
    check_fields(config)
    preset(config.preset)
    check_range(config, ("weight_decay",), 0)
    check_range(config, ("grad_clip",), 0, low_open=True)
    for name in ("examples_per_length", "batch_size", "eval_every", "eval_examples", "checkpoint_every"):
        if getattr(config, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(config, name)}")
    if config.epochs <= 0 or config.lr <= 0:
        raise UserError("--epochs and --lr must be positive")
    if not 0 <= config.warmup_fraction < 1:
        raise UserError("--warmup-fraction must be in [0, 1)")
    if not 0 <= config.n_plus_one_fraction < 1:
        raise UserError(f"--n-plus-one-fraction must be in [0, 1), got {config.n_plus_one_fraction}")
    if config.max_minutes is not None and config.max_minutes <= 0:
        raise UserError(f"--max-minutes must be positive, got {config.max_minutes}")


def encode_examples(tokenizer, pairs: list[tuple[int, int]]) -> list[tuple[list[int], int]]:
    """(token ids of prompt + completion + end-of-text, prompt length) per pair."""
    eos = tokenizer.eos_token_id
    out = []
    for a, b in pairs:
        p = encode(tokenizer, addition.prompt(a, b))
        c = encode(tokenizer, addition.completion(a, b))
        out.append((p + c + [eos], len(p)))
    return out


def epoch_batches(n_examples: int, lengths: list[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The batches of one epoch: shuffled, then sorted by length within windows of 50 batches (less
    padding), then the batches shuffled. Depends only on (seed, epoch), which is what makes
    ``--resume`` reproduce the uninterrupted data order."""
    rng = random.Random(f"{seed}-{epoch}")
    order = list(range(n_examples))
    rng.shuffle(order)
    window = batch_size * 50
    batches = []
    for start in range(0, n_examples, window):
        chunk = sorted(order[start : start + window], key=lambda i: lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(examples, indices, pad_id: int, loss_on: str, max_offset: int, rng: torch.Generator, pad_multiple: int = 1):
    """(ids, attention mask, labels, position ids), each (B, W): the batch right-padded to its longest
    sequence, rounded up to a multiple of ``pad_multiple`` (on a GPU: a few shapes, so the compiled
    step is reused; padding carries no loss and is masked)."""
    width = pad_multiple * math.ceil(max(len(examples[i][0]) for i in indices) / pad_multiple)
    ids = torch.full((len(indices), width), pad_id, dtype=torch.long)
    labels = torch.full((len(indices), width), -100, dtype=torch.long)
    mask = torch.zeros((len(indices), width), dtype=torch.long)
    for row, i in enumerate(indices):
        seq, prompt_len = examples[i]
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
        start = prompt_len if loss_on == "completion" else 0
        labels[row, start : len(seq)] = ids[row, start : len(seq)]
    position_ids = torch.arange(width)[None, :].repeat(len(indices), 1)
    if max_offset > 0:  # --random-position-offset
        offsets = torch.randint(0, max_offset - width + 1, (len(indices), 1), generator=rng)
        position_ids = position_ids + offsets
    return ids, mask, labels, position_ids


def save_checkpoint(run_dir: Path, model, tokenizer, optimizer, scheduler, step: int) -> None:
    with atomic_dir(run_dir / "model") as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step}, tmp / "trainer_state.pt")


@dataclass
class _Run:
    """What the training loop works with, set up once by :func:`pretrain`."""

    config: PretrainConfig
    run_dir: Path
    ranks: distributed.Ranks
    tokenizer: object
    examples: list[tuple[list[int], int]]  # (token ids, prompt length), see encode_examples
    lengths: list[int]  # the examples' lengths in tokens
    steps_per_epoch: int
    total_steps: int
    model: torch.nn.Module = None  # the weights (what is saved and evaluated)
    train_model: torch.nn.Module = None  # the model the step calls: wrapped by DDP under torchrun, compiled on a GPU
    optimizer: torch.optim.Optimizer = None
    scheduler: object = None
    gpu: bool = False
    pad_multiple: int = 1  # batch widths rounded up to this multiple (collate)
    log_every: int = 1  # steps between the host's reads of the loss


def _data(config: PretrainConfig, run_dir: Path, ranks: distributed.Ranks) -> _Run:
    """1. Data: balanced over operand lengths 1..N (plus, if asked, a dose of N+1), tokenized once."""
    tokenizer = build_tokenizer()
    pairs = addition.pretraining_pairs(config.n_digits, config.examples_per_length, config.seed, config.n_plus_one_fraction)
    examples = encode_examples(tokenizer, pairs)
    steps_per_epoch = math.ceil(len(examples) / config.batch_size)
    if min(config.batch_size, len(examples) % config.batch_size or config.batch_size) < ranks.world:
        raise UserError(f"every batch needs a row per rank: --batch-size {config.batch_size} with {len(examples)} examples "
                        f"leaves a batch of {len(examples) % config.batch_size} for {ranks.world} ranks")
    return _Run(config, run_dir, ranks, tokenizer, examples, [len(seq) for seq, _ in examples], steps_per_epoch,
                math.ceil(config.epochs * steps_per_epoch))


def _build_model(run: _Run) -> None:
    """2. Model: a fresh GPT-2 preset, or GPT-2's weights with the character vocabulary (or the run's
    checkpoint, or another pre-training run's weights); then the optimizer and its schedule.

    On a GPU: bf16 autocast, widths padded to multiples of 64, one compiled step for every width
    (dynamic sequence length), fused AdamW, and the host reads the loss back only every LOG_EVERY
    steps. On a CPU: eager, float32, every step logged as it ends.
    """
    config, device = run.config, run.ranks.device
    if config.resume:
        model = load_model(run.run_dir / "model")
    elif config.init_from:
        model, _, _ = load_pretrained(config.init_from, config.n_digits)
    elif config.init == "gpt2":
        model = gpt2_reduced_vocab(config.gpt2_source, run.tokenizer)
    else:
        model = build_model(config.preset, run.tokenizer, config.n_digits)
    model.config.critical_tokens_n_digits = config.n_digits  # read back by evaluate / rl / critical
    model.to(device)
    if max(run.lengths) > model.config.n_positions:
        raise UserError(f"the longest example has {max(run.lengths)} tokens, more than the model's {model.config.n_positions} positions")
    run.model, run.gpu = model, device.type == "cuda"
    train_model = run.ranks.wrap(model)  # DistributedDataParallel under torchrun
    run.train_model = torch.compile(train_model, dynamic=True) if run.gpu and config.compile else train_model
    run.pad_multiple, run.log_every = (64, LOG_EVERY) if run.gpu else (1, 1)
    run.optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.95),
                                      **({"fused": True} if run.gpu else {}))
    run.scheduler = get_cosine_schedule_with_warmup(run.optimizer, int(config.warmup_fraction * run.total_steps), run.total_steps)


def _start(run: _Run) -> int:
    """The step to start at: the checkpoint's (``--resume``, which restores the optimizer and the
    schedule) or 0 (a new run directory). Rank 0 writes the config and announces the run."""
    config, ranks, run_dir = run.config, run.ranks, run.run_dir
    step = 0
    if config.resume:
        state = torch.load(run_dir / "model" / "trainer_state.pt", map_location=ranks.device, weights_only=False)
        run.optimizer.load_state_dict(state["optimizer"])
        run.scheduler.load_state_dict(state["scheduler"])
        step = state["step"]
        if ranks.main:
            print(f"resuming {run_dir} at step {step}/{run.total_steps}")
    elif ranks.main:
        run_dir.mkdir(parents=True, exist_ok=True)
    n_params = count_parameters(run.model)
    if ranks.main:
        n_positions = run.model.config.n_positions
        save_config(run_dir, config, kind="pretrain", n_params=n_params, n_examples=len(run.examples), total_steps=run.total_steps,
                    n_positions=n_positions, vocab_size=len(run.tokenizer), device=str(ranks.device),
                    **({"ranks": ranks.world} if ranks.world > 1 else {}))
        print(f"pre-training {config.preset} ({n_params / 1e6:.2f}M parameters, {n_positions} positions) "
              f"on {len(run.examples):,} additions of 1..{config.n_digits} digits, {run.total_steps:,} steps of {config.batch_size}"
              + (f" split over {ranks.world} ranks" if ranks.world > 1 else ""))
    return step


def _batch(run: _Run, batch: list[int], step: int) -> tuple[tuple[torch.Tensor, ...], int]:
    """(ids, attention mask, labels, position ids), each (b, w) on the device: this rank's rows of the
    examples ``batch``; and the tokens of the whole batch (all ranks)."""
    config, ranks = run.config, run.ranks
    # The offset generator is seeded per step, so a resumed run draws the same offsets.
    offset_rng = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
    max_offset = run.model.config.n_positions if config.random_position_offset else 0
    ids, mask, labels, position_ids = collate(run.examples, batch, run.tokenizer.pad_token_id, config.loss_on, max_offset, offset_rng,
                                              run.pad_multiple)  # (B, W)
    if ranks.world > 1:  # this rank's rows of the global batch
        mask, ids, labels, position_ids = distributed.shard(ranks, mask, ids, labels, position_ids)  # (b, w)
    tokens = int(ranks.sum(mask.sum()))
    return tuple(t.to(ranks.device, non_blocking=True) for t in (ids, mask, labels, position_ids)), tokens


def _train_step(run: _Run, ids, mask, labels, position_ids) -> tuple[torch.Tensor, torch.Tensor]:
    """3. One optimizer step on the next-token loss of the completion tokens; (loss of the global
    batch, gradient norm before clipping), both still on the device."""
    ranks = run.ranks
    with torch.autocast(ranks.device.type, dtype=torch.bfloat16, enabled=run.gpu):
        loss = run.train_model(input_ids=ids, attention_mask=mask, position_ids=position_ids, labels=labels).loss
    rank_loss = loss  # what this rank differentiates
    if ranks.world > 1:  # its part of the global batch's mean over the label tokens (distributed.py)
        rank_loss = loss * ranks.token_share((labels[:, 1:] != -100).sum())
        loss = ranks.sum(rank_loss.detach()) / ranks.world  # the global batch's loss
    run.optimizer.zero_grad(set_to_none=True)
    rank_loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.config.grad_clip)
    run.optimizer.step()
    run.scheduler.step()
    return loss, grad_norm


def _write_back(run: _Run, pending: list[dict], step: int, check: bool, out_of_time: bool, metrics, eval_pairs, bar) -> None:
    """4. The host reads the ``pending`` records' losses; rank 0 then adds the in-distribution
    accuracy (greedy) at a ``check``, logs the records and saves a checkpoint when one is due."""
    config = run.config
    for record in pending:
        record["loss"], record["grad_norm"] = record["loss"].item(), record["grad_norm"].item()
        if not math.isfinite(record["loss"]):
            raise UserError(f"non-finite loss at step {record['step'] - 1}; the last good checkpoint is in {run.run_dir / 'model'}")
    bar.set_postfix(loss=f"{pending[-1]['loss']:.4f}", tok_s=f"{pending[-1]['tokens_per_s']:,.0f}")
    if not run.ranks.main:
        return
    record = pending[-1]
    if check:
        run.model.eval()
        record["accuracy_identical_n"] = accuracy_on(run.model, run.tokenizer, eval_pairs).mean().item()
        run.model.train()
        bar.write(f"step {step}: loss {record['loss']:.4f}, in-distribution accuracy {record['accuracy_identical_n']:.3f}")
    if out_of_time and step < run.total_steps:
        record["stopped_early"] = True  # --max-minutes: the run ends here, its schedule unfinished
    for r in pending:
        metrics.log(r)
    if step % config.checkpoint_every == 0 or step == run.total_steps or out_of_time:
        save_checkpoint(run.run_dir, run.model, run.tokenizer, run.optimizer, run.scheduler, step)


def pretrain(config: PretrainConfig) -> Path:
    """Pre-trains (or, with ``--resume``, goes on pre-training) the run of ``config``; returns its
    directory. Steps 1-4 of the module docstring: :func:`_data`, :func:`_build_model` (and
    :func:`_start`), :func:`_train_step`, :func:`_write_back`."""
    config, run_dir, ranks = distributed.start_run(config, validate)
    run = _data(config, run_dir, ranks)
    _build_model(run)
    step = _start(run)
    metrics = MetricsLog(run_dir / "metrics.jsonl", truncate_after_step=step if config.resume else None) if ranks.main else None
    eval_pairs = addition.eval_pairs(config.n_digits, "identical", config.eval_examples, seed=10_000 + config.seed)
    bar = tqdm(total=run.total_steps, initial=step, desc="pretrain", unit="step", dynamic_ncols=True, disable=not ranks.main)
    tokens_seen, t0 = 0, time.perf_counter()
    previous = read_metrics(run_dir) if config.resume else []
    elapsed_before = previous[-1].get("elapsed_s", 0.0) if previous else 0.0  # wall time before a resume
    deadline = t0 + 60 * config.max_minutes if config.max_minutes else math.inf
    pending: list[dict] = []  # records whose loss and gradient norm are still on the device
    run.model.train()
    start_step = step
    while step < run.total_steps:
        epoch, index = divmod(step, run.steps_per_epoch)
        if index == 0 or step == start_step:  # the epoch's batches, computed once per epoch
            batches = epoch_batches(len(run.examples), run.lengths, config.batch_size, config.seed, epoch)
        (ids, mask, labels, position_ids), tokens = _batch(run, batches[index], step)  # (b, w)
        tokens_seen += tokens
        loss, grad_norm = _train_step(run, ids, mask, labels, position_ids)
        step += 1
        bar.update(1)
        pending.append({"step": step, "loss": loss.detach(), "lr": run.scheduler.get_last_lr()[0], "grad_norm": grad_norm.detach(),
                        "tokens_per_s": tokens_seen / (time.perf_counter() - t0), "elapsed_s": elapsed_before + time.perf_counter() - t0})

        # Every LOG_EVERY steps (each step on a CPU), at the end and at a check (every eval_every
        # steps, or out of time), or at a checkpoint: _write_back.
        out_of_time = time.perf_counter() > deadline
        if ranks.world > 1 and config.max_minutes:  # every rank stops at the same step
            out_of_time = bool(ranks.sum(torch.tensor(float(out_of_time))) > 0)
        check = step % config.eval_every == 0 or step == run.total_steps or out_of_time
        if len(pending) < run.log_every and not check and step % config.checkpoint_every:
            continue
        _write_back(run, pending, step, check, out_of_time, metrics, eval_pairs, bar)
        pending = []
        if out_of_time:
            if ranks.main:
                bar.write(f"--max-minutes {config.max_minutes}: stopped at step {step} of {run.total_steps}")
            break
    bar.close()
    if ranks.main:
        metrics.close()
    ranks.barrier()  # the other ranks wait for rank 0's last checkpoint
    return run_dir
