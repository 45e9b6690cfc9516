"""A run is a directory that describes itself: ``config.json``, ``metrics.jsonl``, ``model/``.

Everything here writes atomically (write to a temporary sibling, then ``os.replace``) so that a
crash never leaves a half-written file or checkpoint behind.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any


class UserError(Exception):
    """A problem with the user's input: the command line prints it as one line and exits 2."""


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path} does not exist") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None


def atomic_dir(final: str | Path):
    """Context manager: yields a temporary directory that replaces ``final`` on success."""

    class _AtomicDir:
        def __enter__(self) -> Path:
            self.final = Path(final)
            self.final.parent.mkdir(parents=True, exist_ok=True)
            self.tmp = Path(tempfile.mkdtemp(dir=self.final.parent, prefix=f".{self.final.name}."))
            return self.tmp

        def __exit__(self, exc_type, exc, tb) -> None:
            if exc_type is not None:
                shutil.rmtree(self.tmp, ignore_errors=True)
                return
            old = self.final.with_name(f".{self.final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            if self.final.exists():
                os.replace(self.final, old)
            os.replace(self.tmp, self.final)
            shutil.rmtree(old, ignore_errors=True)

    return _AtomicDir()


class MetricsLog:
    """Appends one JSON object per line to ``metrics.jsonl`` (flushed at each line).

    On resume, lines logged after the checkpoint's step are dropped so that a resumed run's file
    equals an uninterrupted one.
    """

    def __init__(self, path: str | Path, truncate_after_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if truncate_after_step is not None and self.path.exists():
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= truncate_after_step]
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        elif truncate_after_step is None:
            self.path.unlink(missing_ok=True)
        self._f = open(self.path, "a")

    def log(self, record: dict[str, Any]) -> None:
        record = {k: _jsonable(v) for k, v in record.items()}
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def _jsonable(v: Any) -> Any:
    if hasattr(v, "item") and getattr(v, "ndim", 0) == 0:
        return v.item()
    if isinstance(v, float) and v != v:
        return None
    return v


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def save_config(run_dir: str | Path, config: Any, **derived: Any) -> dict[str, Any]:
    """Saves the command's frozen dataclass and the values derived from it, once, at start-up."""
    record = {"config": dataclasses.asdict(config), **derived}
    write_json(Path(run_dir) / "config.json", record)
    return record


def load_run_config(run_dir: str | Path) -> dict[str, Any]:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} does not exist")
    if not (run_dir / "config.json").exists():
        raise UserError(f"{run_dir} is not a critical-tokens run (no config.json)")
    return read_json(run_dir / "config.json")


def start_or_resume(config):
    """The config a training command runs with. On ``--resume``: the run's saved config (with this
    invocation's device and directory), after checking that there is a checkpoint to resume from.
    Otherwise: ``config`` itself, refusing to write into an existing non-empty directory."""
    run_dir = Path(config.out)
    if config.resume:
        saved = load_run_config(run_dir)["config"]
        if not (run_dir / "model" / "trainer_state.pt").exists():
            raise UserError(f"{run_dir} holds no checkpoint to resume from")
        return dataclasses.replace(type(config)(**saved), resume=True, device=config.device, out=str(run_dir))
    if run_dir.exists() and any(run_dir.iterdir()):
        raise UserError(f"{run_dir} already exists; pass --resume to continue it or choose another --out")
    return config


class Timer:
    """Accumulates wall time per named phase: ``with timer("rollout"): ...``."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}

    def __call__(self, name: str):
        timer = self

        class _Phase:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                timer.totals[name] = timer.totals.get(name, 0.0) + time.perf_counter() - self.t0

        return _Phase()
