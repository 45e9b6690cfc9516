"""Data parallelism under ``torchrun``: the global batch split between processes, the numbers of one.

``torchrun --nproc-per-node K -m critical_tokens.cli pretrain ...`` (or ``rl``) starts K processes and
sets RANK, WORLD_SIZE and LOCAL_RANK; :func:`setup` joins them (gloo on a CPU, nccl on GPUs). Every
rank derives the same global batch from the seed and keeps its share of the rows (:meth:`Ranks.rows`).
DistributedDataParallel averages the gradients over ranks, and each rank scales its loss by its share
of the batch's tokens (:meth:`Ranks.token_share`), so that an update is the one a single process makes
on the whole batch: a masked mean over B tokens is sum_r (n_r / B) * mean_r, up to the order of float
sums. Rank 0 alone writes the run directory and logs. Without torchrun there is one rank and every
method here returns its argument untouched, so a single process computes exactly what it did before.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

from .model import pick_device
from .runs import start_or_resume

Config = TypeVar("Config")


@dataclass(frozen=True)
class Ranks:
    """This process's place among the ranks of a torchrun run (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        """The rank that writes the run directory, logs and evaluates."""
        return self.rank == 0

    def rows(self, n: int) -> slice:
        """This rank's contiguous share of a global batch of ``n`` rows (sizes differ by at most 1)."""
        return slice(n * self.rank // self.world, n * (self.rank + 1) // self.world)

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """The sum of ``value`` over ranks (a new tensor; ``value`` itself with one rank)."""
        if self.world == 1:
            return value
        total = value.detach().clone().to(self.device)
        dist.all_reduce(total)
        return total

    def token_share(self, tokens: torch.Tensor) -> torch.Tensor:
        """K * n_r / sum_r n_r: the factor that turns this rank's mean over its ``tokens`` = n_r
        tokens into its part of the global mean, once DDP has averaged the gradients over K ranks."""
        return self.world * tokens.float().to(self.device) / self.sum(tokens.float()).clamp_min(1)

    def gather(self, obj):
        """[obj of rank 0, obj of rank 1, ...] on every rank (pickled: for small CPU tensors)."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module to train: DistributedDataParallel over the ranks, or ``model`` itself."""
        if self.world == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index or 0] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)


def setup(device: torch.device) -> Ranks:
    """Joins the process group that torchrun describes in the environment; one rank without it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Ranks(device=device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Ranks(dist.get_rank(), dist.get_world_size(), device)


def start_run(config: Config, validate: Callable[[Config], None]) -> tuple[Config, Path, Ranks]:
    """The opening of a training command (``pretrain``, ``rl``): the run directory created, or on
    ``--resume`` its saved config read back; that config checked; the ranks joined on the device it
    names; and the seed set. Returns the config that runs, its directory and this process's ranks."""
    config = start_or_resume(config)
    validate(config)  # the config that runs: on --resume, the saved one
    ranks = setup(pick_device(config.device))  # under torchrun: this process's rank; otherwise the only one
    ranks.barrier()  # every rank has checked --out before rank 0 writes into it
    torch.manual_seed(config.seed)
    return config, Path(config.out), ranks


def shard(ranks: Ranks, mask: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """This rank's rows of right-padded (B, W) tensors, cut to their longest row by ``mask``."""
    rows = ranks.rows(len(mask))
    width = int(mask[rows].sum(-1).max())
    return tuple(t[rows, :width] for t in (mask, *tensors))
