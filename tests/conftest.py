"""Shared fixtures: one micro pre-training run, made once per test session (about ten seconds)."""

from pathlib import Path

import pytest
import torch

from critical_tokens import cli
from critical_tokens.tokenizer import build_tokenizer

# The end-to-end pre-training command at test size: 2 digits, 200 additions, 13 steps of 16.
MICRO_PRETRAIN_ARGS = [
    "--preset", "micro", "--n-digits", "2", "--examples-per-length", "100", "--epochs", "1",
    "--batch-size", "16", "--eval-every", "5", "--eval-examples", "10", "--checkpoint-every", "5",
]


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """The test models are tiny: a second intra-op thread only adds synchronisation, which costs
    10x on a busy 2-core machine. No result depends on the thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def pretrained_run(tmp_path_factory) -> Path:
    """A finished micro pre-training run (treat as read-only: copy it before writing into it)."""
    run_dir = tmp_path_factory.mktemp("shared") / "micro"
    assert cli.main(["pretrain", "--out", str(run_dir), *MICRO_PRETRAIN_ARGS]) == 0
    return run_dir


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()
