"""Data parallelism under torchrun: 2 ranks on a CPU (gloo) give the numbers of one process with the
same global batch, up to the order of float sums; rank 0 alone writes; a run whose rank was killed
resumes under torchrun to those numbers. One torchrun start-up per launch costs most of the time."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import MICRO_PRETRAIN_ARGS
from critical_tokens import cli, distributed
from critical_tokens.generation import Generation, concatenate

HERE = Path(__file__).parent
MICRO_RL_ARGS = ["--episodes", "16", "--batch-size", "8", "--minibatch-size", "4", "--eval-every", "16",
                 "--eval-episodes", "4", "--eval-comfort-episodes", "2", "--probe-examples", "2",
                 "--final-eval-episodes", "4", "--final-eval-comfort-episodes", "2", "--final-probe-examples", "2", "--lr", "1e-3"]
EXACT = ("step", "episodes", "iteration", "lr", "reward", "accuracy", "episode_length", "truncated")  # no float sum in them


def torchrun(*commands: list[str]) -> subprocess.Popen:
    """2 ranks running ``commands`` one after the other; a new session, so a test can kill them."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             str(HERE / "torchrun_commands.py"), json.dumps([list(map(str, c)) for c in commands])],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def finish(process: subprocess.Popen) -> None:
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-3000:]


def metrics(run_dir: Path) -> list[dict]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time/") and k not in ("tokens_per_s", "elapsed_s")} for r in lines]


def assert_close(two_ranks: list[dict], one: list[dict]) -> None:
    assert [sorted(r) for r in two_ranks] == [sorted(r) for r in one]  # one line per step: rank 0 alone wrote
    for got, want in zip(two_ranks, one):
        for key in want:
            if key in EXACT or want[key] is None:
                assert got[key] == want[key], (key, got, want)
            else:
                assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), (key, got, want)


def test_shares_of_a_batch_cover_it_once():
    for n in range(2, 20):
        rows = [distributed.Ranks(rank, 3).rows(n) for rank in range(3)]
        assert sum((list(range(n))[r] for r in rows), []) == list(range(n))


def test_concatenated_shares_are_the_whole_batchs_layout():
    """Two shares with different prompt and completion lengths, laid out as one batch would be."""
    def share(prompt: list[int], completion: list[int]) -> Generation:
        P, T = len(prompt), len(completion)
        return Generation(torch.tensor([prompt + completion]), torch.ones(1, P + T, dtype=torch.long), P,
                          torch.ones(1, T, dtype=torch.bool), torch.full((1, T), -0.5), None, torch.tensor([True]))

    whole = concatenate([share([5, 6], [7]), share([8], [9, 3])], pad_token_id=0)
    assert whole.prompt_length == 2
    assert whole.sequences.tolist() == [[5, 6, 7, 0], [0, 8, 9, 3]]
    assert whole.attention_mask.tolist() == [[1, 1, 1, 0], [0, 1, 1, 1]]
    assert whole.completion_mask.tolist() == [[True, False], [True, True]]
    assert whole.logprobs.tolist() == [[-0.5, 0.0], [-0.5, -0.5]]


def test_two_ranks_give_the_numbers_of_one_process_and_resume_after_a_kill(pretrained_run, tmp_path):
    # RL under torchrun from the shared micro model; the same run in this process.
    rl_two, rl_one, pretrain_two = tmp_path / "rl-two", tmp_path / "rl-one", tmp_path / "pretrain-two"
    ranks = torchrun(["rl", pretrained_run, "--out", rl_two, *MICRO_RL_ARGS],
                     ["pretrain", "--out", pretrain_two, *MICRO_PRETRAIN_ARGS])
    assert cli.main(["rl", str(pretrained_run), "--out", str(rl_one), *MICRO_RL_ARGS]) == 0

    # A real SIGKILL of one rank at a random step after the first checkpoint (step 5 of 13).
    stop_at = random.Random().randint(6, 12)
    deadline = time.monotonic() + 300
    while len(_lines(pretrain_two / "metrics.jsonl")) < stop_at and ranks.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    rank_pids = Path(f"/proc/{ranks.pid}/task/{ranks.pid}/children").read_text().split()
    if ranks.poll() is None and rank_pids:
        os.kill(int(random.choice(rank_pids)), signal.SIGKILL)
    ranks.communicate(timeout=300)
    assert_close(metrics(rl_two), metrics(rl_one))
    assert json.loads((rl_two / "config.json").read_text())["ranks"] == 2

    # Then, in the same launch, a pre-training stopped by --max-minutes: every rank stops at the same step.
    stopped = tmp_path / "stopped"
    finish(torchrun(["pretrain", "--out", pretrain_two, "--resume"], ["pretrain", "--out", stopped, *MICRO_PRETRAIN_ARGS, "--max-minutes", "1e-9"]))
    assert_close(metrics(pretrain_two), metrics(pretrained_run))
    assert [(r["step"], r.get("stopped_early")) for r in metrics(stopped)] == [(1, True)]


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []
