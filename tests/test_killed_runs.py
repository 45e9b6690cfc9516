"""A killed run never blocks its rerun (issue 33, row 4): an `rl` run stopped by SIGTERM or SIGKILL before
its first checkpoint, at several points, is started over by the same command (or by --resume), while a run
whose process is still alive is never taken over."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from critical_tokens import cli
from critical_tokens.runs import CHECKPOINT, PROCESS

ROOT = Path(__file__).resolve().parents[1]
# Tiny sizes, and no checkpoint before the end (--eval-every past --episodes): a kill always lands before it.
SIZES = ["--kl", "standard", "--episodes", "64", "--batch-size", "2", "--minibatch-size", "2", "--eval-every", "1000",
         "--eval-episodes", "1", "--eval-comfort-episodes", "1", "--probe-examples", "1", "--final-eval-episodes", "1",
         "--final-eval-comfort-episodes", "1", "--final-probe-examples", "1"]


def start(pretrained: Path, out: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "critical_tokens.cli", "rl", str(pretrained), "--out", str(out), *SIZES],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def wait_for(process: subprocess.Popen, path: Path, timeout: float = 120.0) -> None:
    """Until ``path`` exists (the point to kill at); fails if the run ends first."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, f"the run ended before {path.name}: {process.stderr.read().decode()[-2000:]}"
        assert time.monotonic() < deadline, f"no {path.name} after {timeout} s"
        time.sleep(0.05)


def kill(process: subprocess.Popen, sig: int) -> None:
    process.send_signal(sig)
    process.wait(timeout=60)
    process.stderr.close()
    assert process.returncode == -sig  # killed by it: neither caught nor cleaned up


def rerun(pretrained: Path, out: Path, *extra: str) -> int:
    return cli.main(["rl", str(pretrained), "--out", str(out), *SIZES[:2], "--episodes", "2", *SIZES[4:], *extra])


@pytest.mark.parametrize("sig, point", [(signal.SIGTERM, "config.json"), (signal.SIGKILL, "config.json"),
                                        (signal.SIGTERM, "metrics.jsonl"), (signal.SIGKILL, "metrics.jsonl")])
def test_a_run_killed_before_its_first_checkpoint_starts_over(pretrained_run, tmp_path, capsys, sig, point):
    out = tmp_path / "run"
    process = start(pretrained_run, out)
    wait_for(process, out / point)
    # Still running: its directory is its own, and a second invocation refuses it.
    assert rerun(pretrained_run, out) == 2
    assert "already exists" in capsys.readouterr().err
    kill(process, sig)
    assert (out / "config.json").exists() and (out / PROCESS).exists() and not (out / CHECKPOINT).exists()
    # Dead: the same command starts it over (at point metrics.jsonl, with --resume, which has nothing to resume).
    assert rerun(pretrained_run, out, *(["--resume"] if point == "metrics.jsonl" else [])) == 0
    assert "starting it over" in capsys.readouterr().out
    assert (out / CHECKPOINT).exists()
    assert json.loads((out / "config.json").read_text())["config"]["episodes"] == (64 if point == "metrics.jsonl" else 2)


def test_a_killed_run_with_a_checkpoint_is_resumed_not_started_over(pretrained_run, tmp_path, capsys):
    out = tmp_path / "run"
    assert rerun(pretrained_run, out) == 0
    (out / PROCESS).write_text(json.dumps({"host": "elsewhere", "pid": 1}))
    assert rerun(pretrained_run, out) == 2  # a finished (checkpointed) run is never deleted
    assert "pass --resume" in capsys.readouterr().err


def test_a_directory_that_is_not_a_dead_run_is_never_emptied(pretrained_run, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("a user's file\n")
    assert rerun(pretrained_run, out) == 2
    assert "already exists" in capsys.readouterr().err and (out / "notes.txt").exists()
