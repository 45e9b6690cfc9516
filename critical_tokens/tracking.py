"""Experiment tracking from a run's files: TensorBoard event files always, Weights & Biases on request.

Both read ``metrics.jsonl``, never the live run, so a finished or resumed run exports the same curves.
"""

from __future__ import annotations

import os
from pathlib import Path

from .runs import atomic_dir, read_metrics


def _scalars(record: dict) -> dict[str, float]:
    return {k: float(v) for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "episodes", "iteration")}


def write_tensorboard(run_dir: str | Path) -> Path:
    """RUN/tb/: TensorBoard event files of RUN/metrics.jsonl (x axis: episodes for RL, steps for
    pre-training); rewritten whole, so it always matches the metrics file."""
    from torch.utils.tensorboard import SummaryWriter

    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    with atomic_dir(run_dir / "tb") as tmp:
        writer = SummaryWriter(log_dir=str(tmp))
        for r in records:
            step = int(r.get("episodes", r.get("step", 0)))
            for key, value in _scalars(r).items():
                writer.add_scalar(key, value, step)
        writer.close()
    return run_dir / "tb"


def log_wandb(run_dir: str | Path, name: str, group: str, config: dict) -> None:
    """Logs a finished run's metrics.jsonl to Weights & Biases: offline (``wandb sync`` uploads it
    later) unless WANDB_API_KEY is set."""
    import wandb

    run_dir = Path(run_dir)
    mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
    run = wandb.init(project=os.environ.get("WANDB_PROJECT", "critical-tokens"), name=name, group=group, config=config,
                     dir=str(run_dir), mode=mode, reinit=True)
    for r in read_metrics(run_dir):
        run.log(_scalars(r), step=int(r.get("episodes", r.get("step", 0))))
    run.finish()
