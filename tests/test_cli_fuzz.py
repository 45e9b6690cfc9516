"""Every subcommand driven with random flag values and with directories of every kind (a pre-training
run, an RL run, a reproduction, empty, corrupt, a file, missing, a checkpoint shipped in the package,
a path where nothing can be written or under a file, a file cut short or not UTF-8):
the command exits 0 or 2, never with a traceback; after an error nothing is left behind; and nothing
is ever written inside the installed package.

The values come from small pools per field (two valid ones first, then the ones a command must
refuse) so that a run the flags allow stays tiny: the micro model, a few examples, a few episodes.
"""

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import typing
from pathlib import Path
from typing import Literal, get_args, get_origin

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from critical_tokens import addition, cli, reproduce
from critical_tokens.runs import PACKAGE_DIR

SHIPPED = PACKAGE_DIR / "checkpoints" / "tiny-n3"
KINDS = ("pretrain", "rl", "repro", "empty", "corrupt", "badshape", "brokenrepro", "file", "missing", "new/deeper/dir")
COMMANDS = {name: config_class for name, (config_class, _, _) in cli._commands().items()}

INTS = ("1", "2", "0", "-1")
FLOATS = ("0.5", "1", "1e-3", "0", "-1", "nan", "inf")
POOLS = {  # (command, field) or field -> values, the valid ones first
    "out": ("new/deeper/dir", "empty", "pretrain", "rl", "repro", "corrupt", "file", str(SHIPPED / "run"), "/proc/x", "file/sub"),
    "run": ("pretrain", "rl", "shipped", "repro", "empty", "corrupt", "badshape", "missing", "file"),
    "pretrained": ("pretrain", "rl", "repro", "empty", "corrupt", "missing"),
    "init_from": ("pretrain", "shipped", "rl", "repro", "empty", "missing"),
    ("report", "run"): ("repro", "brokenrepro", "pretrain", "empty", "missing", "file"),
    ("report", "to"): ("new/deeper/dir", "empty", "file", str(SHIPPED), "/proc/x", "file/sub"),
    ("reproduce", "out"): ("new/deeper/dir", "repro", "empty", "pretrain", "corrupt", "file", str(SHIPPED / "repro"), "/proc/x"),
    ("reproduce", "preset"): ("smoke", "nope", "bad.json", "file", "cut.json", "latin1.json", "missing.json", "empty"),
    ("pretrain", "preset"): ("micro", "nope"),
    ("inspect", "model"): ("pretrain", "shipped", "rl", "repro", "empty", "corrupt", "missing", "file"),
    ("inspect", "prompts"): ("prompts.jsonl", "prompts.jsonl", "file", "bad.json", "missing", "empty", "cut.json", "latin1.json"),
    "html": ("page.html", "empty", str(SHIPPED / "page.html")),
    "png": ("picture.png", "picture", "empty", str(SHIPPED / "picture.png")),
    "n_digits": ("2", "1", "3", "0", "31"),
    "extra_digits": ("0", "1", "-1", "40"),
    "seed": ("0", "7", "-1", str(2**40)),
    "device": ("cpu", "auto", "cuda", "gpu"),
    "lr": ("1e-3", "1e-4", "0", "-1", "nan"),
    "epochs": ("1", "0.5", "0", "inf"),
    "beta": ("10", "0", "auto", "-1", "inf", "x"),
    "only": ("levels", "table1,levels", "nope"),
    "jobs": ("1", "0", "-1", "5000"),
    "seeds": ("1", "0", "-1", "5000"),
    "gpt2_source": (),  # --init gpt2 would download GPT-2: never drawn
}
# Flags always given, so that a run the flags allow stays small (their defaults are the paper's sizes).
REQUIRED = {
    "pretrain": ("out", "preset", "examples_per_length", "eval_examples"),
    "evaluate": ("run", "examples", "extra_digits"),
    "critical": ("run", "examples"),
    "rl": ("pretrained", "out", "episodes", "batch_size", "minibatch_size", "eval_episodes", "eval_comfort_episodes", "probe_examples",
           "final_eval_episodes", "final_eval_comfort_episodes", "final_probe_examples"),
    "reproduce": ("preset", "out"),
    "report": ("run",),
    "criteria": ("run", "prompts", "group_size"),
    "inspect": ("model", "prompts", "sample", "max_new_tokens"),
}


def pool(command: str, field: dataclasses.Field, kind) -> tuple[str, ...]:
    if (command, field.name) in POOLS:
        return POOLS[(command, field.name)]
    if field.name in POOLS:
        return POOLS[field.name]
    if get_origin(kind) is typing.Union or type(kind).__name__ == "UnionType":
        kind = next(a for a in get_args(kind) if a is not type(None))
    if get_origin(kind) is Literal:
        return (*map(str, get_args(kind)), "nope")
    return {int: INTS, float: FLOATS, bool: ("on", "off")}.get(kind, ("x",))


@st.composite
def argv(draw, command: str) -> list[str]:
    """The command's required flags and up to three others: one of them (or none) with any value of
    its pool, the others with one of the first two (valid as a rule), so that the examples reach
    past the first check."""
    config_class = COMMANDS[command]
    hints = typing.get_type_hints(config_class)
    fields = [f for f in dataclasses.fields(config_class) if pool(command, f, hints[f.name])]
    optional = [f.name for f in fields if f.name not in REQUIRED[command]]
    chosen = [*REQUIRED[command], *draw(st.lists(st.sampled_from(optional), max_size=3, unique=True))]
    anything = draw(st.sampled_from([None, *chosen]))
    args = [command]
    for f in fields:
        if f.name not in chosen:
            continue
        values = pool(command, f, hints[f.name])
        value = draw(st.sampled_from(values if f.name == anything else values[:2]))
        if f.metadata.get("positional"):
            args.append(value)
        elif hints[f.name] is bool:
            args.append(f"--{'' if value == 'on' else 'no-'}{f.name.replace('_', '-')}")
        else:
            args += [f"--{f.name.replace('_', '-')}", value]
    return args


@pytest.fixture(scope="module")
def library(pretrained_run, tmp_path_factory) -> Path:
    """One directory of each kind, copied into a fresh working directory for every example."""
    lib = tmp_path_factory.mktemp("kinds")
    shutil.copytree(pretrained_run, lib / "pretrain")
    assert cli.main(["rl", str(pretrained_run), "--out", str(lib / "rl"), "--kl", "standard", "--episodes", "2", "--batch-size", "2",
                     "--minibatch-size", "1", "--eval-every", "2", "--eval-episodes", "1", "--eval-comfort-episodes", "1",
                     "--probe-examples", "1", "--final-eval-episodes", "1", "--final-eval-comfort-episodes", "1",
                     "--final-probe-examples", "1"]) == 0
    with pytest.MonkeyPatch.context() as mp:  # a reproduction's files without its runs
        mp.setattr(reproduce, "run_plan", lambda *args, **kwargs: ({}, {}))
        assert cli.main(["reproduce", "--preset", "smoke", "--out", str(lib / "repro")]) == 0
    (lib / "empty").mkdir()
    (lib / "corrupt" / "model").mkdir(parents=True)
    (lib / "corrupt" / "config.json").write_text("{not json")
    (lib / "corrupt" / "model" / "config.json").write_text("garbage")
    (lib / "badshape").mkdir()
    (lib / "badshape" / "config.json").write_text('{"kind": "pretrain"}')
    (lib / "brokenrepro").mkdir()
    (lib / "brokenrepro" / "reproduce.json").write_text("[]")
    (lib / "file").write_text("not a directory\n")
    (lib / "bad.json").write_text('{"models": 3}')
    (lib / "cut.json").write_text('{"models": {"n2": {"n_digi')  # a file cut short
    (lib / "latin1.json").write_bytes('{"prompt": "café"}\n'.encode("latin-1"))  # not UTF-8
    (lib / "prompts.jsonl").write_text(json.dumps({"prompt": addition.prompt(12, 34), "completion": addition.completion(12, 34)}) + "\n"
                                       + json.dumps({"prompt": addition.prompt(5, 7)}) + "\n")
    return lib


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*")) if "__pycache__" not in p.parts}


def run_in_workspace(library: Path, args: list[str]) -> None:
    workspace = Path(tempfile.mkdtemp(dir=library.parent))
    shutil.copytree(library, workspace, dirs_exist_ok=True)
    args = [str(SHIPPED) if a == "shipped" else a for a in args]
    before, package_before = snapshot(workspace), snapshot(PACKAGE_DIR)
    cwd = os.getcwd()
    os.chdir(workspace)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(reproduce, "run_plan", lambda *args, **kwargs: ({}, {}))  # reproduce: validation and files, not the runs
            try:
                code = cli.main(args)
            except SystemExit as e:  # argparse: an unknown choice, a value that is not a number
                code = e.code
    finally:
        os.chdir(cwd)
    assert code in (0, 2), args
    if code == 2:
        assert snapshot(workspace) == before, f"an error left files behind: {args}"
    assert snapshot(PACKAGE_DIR) == package_before, f"wrote inside the package: {args}"
    shutil.rmtree(workspace)


FUZZ = settings(max_examples=6, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@FUZZ
@given(args=argv("pretrain"))
def test_pretrain(library, args):
    run_in_workspace(library, args)


@FUZZ
@given(args=argv("evaluate"))
def test_evaluate(library, args):
    run_in_workspace(library, args)


@FUZZ
@given(args=argv("critical"))
def test_critical(library, args):
    run_in_workspace(library, args)


@FUZZ
@given(args=argv("rl"))
def test_rl(library, args):
    run_in_workspace(library, args)


@FUZZ
@given(args=argv("reproduce"))
def test_reproduce(library, args):
    run_in_workspace(library, args)


@FUZZ
@given(args=argv("report"))
def test_report(library, args):
    run_in_workspace(library, args)


@FUZZ
@given(args=argv("criteria"))
def test_criteria(library, args):
    run_in_workspace(library, args)


@FUZZ
@given(args=argv("inspect"))
def test_inspect(library, args):
    run_in_workspace(library, args)


@pytest.mark.parametrize("command,run,wrong", [
    ("pretrain", "rl", "an RL run"), ("rl", "pretrain", "a pre-training run"), ("rl", "repro", "a reproduction"),
])
def test_resume_of_a_run_of_another_kind_is_one_line(library, capsys, command, run, wrong):
    args = [command, "--out", str(library / run), "--resume"] + ([str(library / "pretrain")] if command == "rl" else [])
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and wrong in err[0], err


@pytest.mark.parametrize("command", ["rl", "evaluate", "critical"])
def test_a_reproduction_is_not_a_model(library, capsys, command):
    args = [command, str(library / "repro"), "--out", str(library.parent / "unused")]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a reproduction, not a run with a model" in err[0], err
    assert not (library.parent / "unused").exists()


def test_rl_refuses_an_rl_run_as_its_pretrained_model(library, tmp_path, capsys):
    assert cli.main(["rl", str(library / "rl"), "--out", str(tmp_path / "x")]) == 2
    assert "is an RL run; give a pre-training run" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
