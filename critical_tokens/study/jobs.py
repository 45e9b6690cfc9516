"""One job of a study's plan (a `plan.Job`): where it stands on disk, and running it.

`job_status` reads the job's directory: done (``DONE.json`` with the same config), to resume (the
checkpoint of an interrupted run) or fresh; a directory made with other hyper-parameters is an
error, never silently mixed. `execute` runs one job in a worker process, whatever the launcher, its
output in ``OUT/logs/``: it calls the job's command (pre-training, copying a shipped checkpoint,
evaluation, critical-token analysis, RL) with the job's config, then writes ``DONE.json``.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import time
import traceback
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from ..critical.command import CriticalConfig
from ..evaluate import EvaluateConfig
from ..pretrain import PretrainConfig
from ..rl.config import RLConfig
from ..runs import UserError, read_json, write_json
from .plan import Job, comparable
from .preset_fields import CHECKPOINTS_DIR

DONE = "DONE.json"  # written in a job's directory when it has finished
PATH_FIELDS = ("out", "pretrained", "run", "init_from")  # relative to OUT in a job's config


# --- 1. Where a job stands --------------------------------------------------------------------------------


def job_status(job: Job, root: Path) -> Literal["done", "resume", "fresh"]:
    """done: DONE.json with the same config; resume: a checkpoint of an interrupted run; fresh: start
    over. A directory made with other hyper-parameters is a UserError (never silently mixed)."""
    directory = root / job.dir
    if (directory / DONE).exists():
        _check_same(job, read_json(directory / DONE)["config"], directory / DONE)
        return "done"
    if job.kind in ("pretrain", "rl") and (directory / "config.json").exists():
        _check_same(job, read_json(directory / "config.json")["config"], directory / "config.json")
        if (directory / "model" / "trainer_state.pt").exists():
            return "resume"
    return "fresh"


JOB_CONFIGS = {"pretrain": PretrainConfig, "rl": RLConfig, "evaluate": EvaluateConfig, "critical": CriticalConfig}


def _check_same(job: Job, saved: dict, path: Path) -> None:
    want, have = comparable(job.config), comparable(saved)
    # A field added to the command after the run was made is no difference while it keeps its default
    # (the run behaved as the default does).
    config_class = JOB_CONFIGS.get(job.kind)
    defaults = {f.name: f.default for f in dataclasses.fields(config_class)} if config_class else {}
    want = {k: v for k, v in want.items() if k in have or k not in defaults or v != defaults[k]}
    if want != have:
        diff = [k for k in sorted(set(want) | set(have)) if want.get(k) != have.get(k)]
        shown = ", ".join(f"{k}: {have.get(k)!r} there, {want.get(k)!r} now" for k in diff[:3])
        raise UserError(f"{path} was made with other hyper-parameters ({shown}); choose another --out or delete {path.parent}")


# --- 2. Running one job, in a worker ----------------------------------------------------------------------


def _absolute(config: dict, root: Path) -> dict:
    return {k: (str(root / v) if k in PATH_FIELDS and isinstance(v, str) else v) for k, v in config.items()}


def _run_pretrain(job: Job, root: Path, resume: bool) -> None:
    from ..pretrain import pretrain

    pretrain(dataclasses.replace(PretrainConfig(**_absolute(job.config, root)), resume=resume))


def _run_copy(job: Job, root: Path, resume: bool) -> None:
    from ..runs import atomic_dir

    source = CHECKPOINTS_DIR / job.config["shipped"]
    with atomic_dir(root / job.dir) as tmp:
        shutil.copytree(source, tmp, dirs_exist_ok=True)
    print(f"copied the shipped checkpoint {source} to {root / job.dir}")


def _run_evaluate(job: Job, root: Path, resume: bool) -> None:
    from ..evaluate import evaluate_model, table_markdown
    from ..model import load_pretrained, pick_device
    from ..runs import atomic_write_text

    config = EvaluateConfig(**_absolute(job.config, root))
    model, tokenizer, n_digits = load_pretrained(config.run, config.n_digits)
    model.to(pick_device("auto"))
    result = evaluate_model(model, tokenizer, n_digits, config)
    write_json(root / job.dir / "table.json", {"model": job.arm, **result})
    atomic_write_text(root / job.dir / "table.md", table_markdown(result) + "\n")


def _run_critical(job: Job, root: Path, resume: bool) -> None:
    from ..critical.command import critical

    config = CriticalConfig(**_absolute(job.config, root))
    critical(config)  # writes RUN/critical/report.json beside the model; the experiment keeps a copy
    (root / job.dir).mkdir(parents=True, exist_ok=True)
    for name in ("report.json", "report.md"):
        shutil.copyfile(Path(config.run) / "critical" / name, root / job.dir / name)


def _run_rl(job: Job, root: Path, resume: bool) -> None:
    from ..rl.loop import train

    train(dataclasses.replace(RLConfig(**_absolute(job.config, root)), resume=resume))


RUNNERS = {"pretrain": _run_pretrain, "copy": _run_copy, "evaluate": _run_evaluate, "critical": _run_critical, "rl": _run_rl}


def log_path(root: Path, job: Job) -> Path:
    return root / "logs" / (job.name.replace("/", "__") + ".log")


@contextmanager
def _output_to(path: Path):
    """Sends this process's stdout and stderr (file descriptors included) to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush(), sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "a") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            os.dup2(saved[0], 1), os.dup2(saved[1], 2)
            os.close(saved[0]), os.close(saved[1])


def execute(job: Job, root: str, resume: bool, wandb: bool) -> float:
    """Runs one job in a worker process, its output in OUT/logs/; returns its wall time in seconds."""
    from ..tracking import log_wandb, write_tensorboard

    root = Path(root)
    directory = root / job.dir
    t0 = time.perf_counter()
    with _output_to(log_path(root, job)):
        print(f"\n=== {job.name} ({'resumed' if resume else 'started'} {now()}) ===", flush=True)
        try:
            if not resume and job.kind in ("pretrain", "rl") and directory.exists():
                shutil.rmtree(directory)  # a run interrupted before its first checkpoint starts over
            RUNNERS[job.kind](job, root, resume)
            if job.kind in ("pretrain", "rl"):
                write_tensorboard(directory)
                if wandb:
                    log_wandb(directory, name=job.name, group=job.experiment, config=job.config)
        except BaseException:
            traceback.print_exc()
            raise
    wall = time.perf_counter() - t0
    write_json(directory / DONE, {"job": job.name, "config": job.config, "wall_s": round(wall, 2), "resumed": resume, "finished": now()})
    return wall


def now() -> str:
    """The UTC time to the second, as DONE.json, the logs and timing.json record it."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")

