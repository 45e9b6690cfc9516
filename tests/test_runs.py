"""Run directories: file modes that follow the umask, what a directory holds, resuming only a run of
the same command, no half-made run after a failure, and outputs never inside the package."""

import json
import os
import stat
import tempfile
from pathlib import Path

import pytest

from critical_tokens.pretrain import PretrainConfig
from critical_tokens.rl.config import RLConfig
from critical_tokens.runs import (
    PACKAGE_DIR,
    UserError,
    atomic_dir,
    atomic_write_text,
    no_half_made_run,
    output_dir,
    read_metrics,
    run_kind,
    save_config,
    start_or_resume,
    write_json,
)

SHIPPED = PACKAGE_DIR / "checkpoints" / "tiny-n3"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask_027():
    before = os.umask(0o027)
    yield
    os.umask(before)


def test_atomic_files_get_the_modes_of_open_under_the_umask(tmp_path, umask_027):
    atomic_write_text(tmp_path / "a" / "report.md", "x\n")
    assert mode(tmp_path / "a" / "report.md") == 0o640  # 0666 & ~027, not mkstemp's 0600
    with atomic_dir(tmp_path / "model") as tmp:
        fd, private = tempfile.mkstemp(dir=tmp)  # as safetensors writes its weights: 0600
        os.close(fd)
        (tmp / "sub").mkdir(mode=0o700)
        name = Path(private).name
    assert mode(tmp_path / "model") == 0o750  # 0777 & ~027, not mkdtemp's 0700
    assert mode(tmp_path / "model" / name) == 0o640
    assert mode(tmp_path / "model" / "sub") == 0o750


def test_modes_follow_a_permissive_umask_too(tmp_path):
    before = os.umask(0o002)
    try:
        atomic_write_text(tmp_path / "shared.md", "x\n")
    finally:
        os.umask(before)
    assert mode(tmp_path / "shared.md") == 0o664


def test_run_kind_reads_the_directory(tmp_path):
    save_config(tmp_path / "pt", PretrainConfig(), kind="pretrain")
    write_json(tmp_path / "model" / "config.json", {"model_type": "gpt2"})
    write_json(tmp_path / "repro" / "reproduce.json", {})
    (tmp_path / "empty").mkdir()
    assert [run_kind(tmp_path / d) for d in ("pt", "model", "repro", "empty")] == ["pretrain", "model", "reproduction", None]
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="neither"):
        run_kind(tmp_path / "bad")
    (tmp_path / "bad" / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        run_kind(tmp_path / "bad")


def test_resume_refuses_a_run_of_another_command(tmp_path):
    save_config(tmp_path / "pt", PretrainConfig(out=str(tmp_path / "pt")), kind="pretrain")
    with pytest.raises(UserError, match="it is a pre-training run, not a run of this command"):
        start_or_resume(RLConfig(pretrained="x", out=str(tmp_path / "pt"), resume=True))
    save_config(tmp_path / "rl", RLConfig(out=str(tmp_path / "rl")), kind="rl")
    with pytest.raises(UserError, match="it is an RL run"):
        start_or_resume(PretrainConfig(out=str(tmp_path / "rl"), resume=True))
    write_json(tmp_path / "repro" / "reproduce.json", {})
    with pytest.raises(UserError, match="is a reproduction, not a critical-tokens run"):
        start_or_resume(PretrainConfig(out=str(tmp_path / "repro"), resume=True))
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="is a file"):
        start_or_resume(PretrainConfig(out=str(tmp_path / "file")))


def fail_after_writing(config, checkpoint: bool = False):
    with pytest.raises(RuntimeError), no_half_made_run(config):
        run_dir = Path(config.out)
        save_config(run_dir, config, kind="pretrain")
        if checkpoint:
            atomic_write_text(run_dir / "model" / "trainer_state.pt", "")
        raise RuntimeError("failed")


def test_a_run_that_fails_before_its_first_checkpoint_leaves_nothing(tmp_path):
    fail_after_writing(PretrainConfig(out=str(tmp_path / "new" / "deeper" / "run")))
    assert list(tmp_path.iterdir()) == []  # the parents it created went too
    (tmp_path / "empty").mkdir()
    fail_after_writing(PretrainConfig(out=str(tmp_path / "empty")))
    assert (tmp_path / "empty").is_dir() and not any((tmp_path / "empty").iterdir())  # there before: kept, empty


def test_a_run_with_a_checkpoint_is_kept_after_a_failure(tmp_path):
    fail_after_writing(PretrainConfig(out=str(tmp_path / "run")), checkpoint=True)
    assert (tmp_path / "run" / "model" / "trainer_state.pt").exists()  # resumable: kept


def test_outputs_default_beside_a_run_and_outside_the_package(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert output_dir(None, "runs/pt", "eval") == Path("runs/pt/eval")
    assert output_dir(None, str(SHIPPED), "eval") == Path("eval-tiny-n3")
    assert output_dir(None, str(SHIPPED / "model"), "critical") == Path("critical-tiny-n3")
    assert output_dir("mine", str(SHIPPED), "eval") == Path("mine")
    with pytest.raises(UserError, match="inside the installed package"):
        output_dir(str(SHIPPED / "eval"), "runs/pt", "eval")


def test_metrics_cut_short_by_a_kill_lose_only_their_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 1}) + "\n" + '{"step": 2, "lo')
    assert read_metrics(path) == [{"step": 1}]
    path.write_text('{"step": 1, "lo\n' + json.dumps({"step": 2}) + "\n")
    with pytest.raises(UserError, match="line 1"):
        read_metrics(path)


def test_a_percent_sign_in_a_fields_help_is_text_for_argparse():
    """argparse formats help strings with %: an unescaped "5%" made --help itself fail with a traceback."""
    import argparse
    from dataclasses import dataclass

    from critical_tokens.config import add_arguments, arg

    @dataclass(frozen=True)
    class Config:
        quantile: float = arg(0.05, "the 5% quantile of the certainty")

    parser = argparse.ArgumentParser()
    add_arguments(parser, Config)
    assert "the 5% quantile" in parser.format_help()
