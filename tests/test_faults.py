"""Faults: a pre-training killed with a real SIGKILL at random moments (a checkpoint being written
included), resumed each time, ends with the metrics.jsonl and the weights of an uninterrupted run."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import MICRO_PRETRAIN_ARGS


def metric_lines(run_dir: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock fields (they differ between runs by nature)."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "elapsed_s")} for r in lines]


def test_killed_at_random_moments_and_resumed_ends_as_an_uninterrupted_run(pretrained_run, tmp_path):
    rng = random.Random()
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "critical_tokens.cli", "pretrain", "--out", str(out), *MICRO_PRETRAIN_ARGS]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    kills = sorted(rng.sample(range(6, 13), 2))  # steps of 13; the first checkpoint is at step 5
    for step in kills:
        resume = ["--resume"] if (out / "model" / "trainer_state.pt").exists() else []
        process = subprocess.Popen(command + resume, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        while process.poll() is None and len(_lines(out / "metrics.jsonl")) < step and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.05))  # anywhere in the next step: forward, update, evaluation, checkpoint
        process.kill()  # SIGKILL: no handler, no clean-up
        assert process.wait() == -signal.SIGKILL  # killed, not finished

    finished = subprocess.run(command + ["--resume"], env=env, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert metric_lines(out) == metric_lines(pretrained_run)
    assert (out / "model" / "model.safetensors").read_bytes() == (pretrained_run / "model" / "model.safetensors").read_bytes()


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []
