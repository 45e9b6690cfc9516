"""Nothing silently wrong, nothing stuck (issue 33): each row of its table, and a fuzz test of the entry
points outside the `critical-tokens` command (the TRL examples and scripts/trl_study.py; the command's
subcommands are fuzzed in test_cli_fuzz.py). Row 4 (killed runs) is test_killed_runs.py; rows 7 and 14's
`inspect --prompts` cases are rows of test_inspect.test_bad_input_is_one_line.

An entry point given a bad value or path exits non-zero with one line `error: ...` and no traceback, before
any expensive work, and leaves no folder behind."""

import errno
import importlib.util
import json
import re
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from critical_tokens import checks, cli
from critical_tokens.critical import criteria
from critical_tokens.study.preset import PRESETS_DIR, check_preset, preset_names
from critical_tokens.runs import PACKAGE_DIR, UserError, read_json

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = {"grpo": ROOT / "examples" / "trl_grpo_prioritized.py", "rloo": ROOT / "examples" / "trl_rloo_prioritized.py"}
SHIPPED = PACKAGE_DIR / "checkpoints" / "tiny-n3"


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "error: " in lines[0] and "Traceback" not in err, err
    return lines[0]


# --- the TRL examples (rows 1, 2, 3, 8, 10, 11) -------------------------------------------------------


@pytest.fixture
def example(monkeypatch, tmp_path, capsys):
    """Runs an example's main in this process with the given options, in an empty working directory;
    returns its one-line error (argparse's, for a value it cannot parse as an option's: "-inf" looks like
    an option to it). Loading the model means the options were taken: a failure here."""
    pytest.importorskip("trl")
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    monkeypatch.chdir(tmp_path)
    import addition_task

    def refuse(*args, **kwargs):
        raise AssertionError("the options were taken: the example went on to load the model")

    monkeypatch.setattr(addition_task, "load_pretrained", refuse)

    def run(name: str, *args: str) -> str:
        monkeypatch.setattr(sys, "argv", [str(EXAMPLES[name]), *args])
        with pytest.raises(SystemExit) as exit:
            import runpy

            runpy.run_path(str(EXAMPLES[name]), run_name="__main__")
        assert list(p.name for p in tmp_path.iterdir() if p.name != "afile") == [], "the example left files behind"
        if exit.value.code == 2:  # argparse: its usage, then one line "PROG: error: ..."
            return capsys.readouterr().err.strip().splitlines()[-1]
        assert isinstance(exit.value.code, str), exit.value.code  # sys.exit("error: ..."): status 1
        return one_line(exit.value.code)

    return run


@pytest.mark.parametrize("name, args, message", [
    ("grpo", ["--kl-coef", "nan"], "--kl-coef must be a finite number, got nan"),  # row 1: trained to NaN weights
    ("rloo", ["--kl-coef", "nan"], "--kl-coef must be a finite number"),  # row 2
    ("grpo", ["--prioritized-beta", "inf"], "--prioritized-beta must be a finite number >= 0 or 'auto'"),  # row 3: no KL at all
    ("grpo", ["--threads", "0"], "--threads must be >= 1"),  # row 8
    ("grpo", ["--max-steps", "0"], "--max-steps must be >= 1"),  # row 10: TRL's error after 65 s of evaluation
    ("grpo", ["--max-steps", "-1"], "--max-steps must be >= 1"),
    ("grpo", ["--lr", "-1"], "--lr must be >= 0"),
    ("grpo", ["--temperature", "0"], "--temperature must be > 0"),
    ("grpo", ["--eval-examples", "-5"], "--eval-examples must be >= 0"),  # row 11: silently 0
    ("grpo", ["--out", "/proc/x"], "--out /proc/x: cannot write"),
    ("rloo", ["--num-generations", "1"], "--num-generations must be >= 2"),
])
def test_the_examples_check_their_options_before_any_work(example, name, args, message):
    assert message in example(name, *args)


EXAMPLE_BAD = {  # flag -> values it must refuse
    "--kl-coef": ("nan", "inf", "-inf", "-1", "1e400"), "--prioritized-beta": ("nan", "inf", "-1", "x", "1e400", ""),
    "--temperature": ("nan", "inf", "0", "-1"), "--lr": ("nan", "inf", "-1", "-1e-5"), "--max-steps": ("0", "-1"),
    "--num-generations": ("0", "1", "-3"), "--eval-examples": ("-1", "-5"), "--seed": ("-1", str(2**40)), "--threads": ("0", "-2"),
    "--out": ("/proc/x", "afile", "afile/sub", str(PACKAGE_DIR / "x")),
}
EXAMPLE_GOOD = {"--kl-coef": ("0", "5"), "--prioritized-beta": ("0", "8", "auto"), "--temperature": ("1", "0.5"), "--lr": ("1e-5", "0"),
                "--max-steps": ("1", "3"), "--num-generations": ("2", "8"), "--eval-examples": ("0", "10"), "--seed": ("0", "7"),
                "--threads": ("1",), "--out": ("new/dir",)}


@st.composite
def example_args(draw) -> list[str]:
    """One bad value, and up to three other options with good values, in any order."""
    bad = draw(st.sampled_from(sorted(EXAMPLE_BAD)))
    others = draw(st.lists(st.sampled_from(sorted(set(EXAMPLE_GOOD) - {bad})), max_size=3, unique=True))
    pairs = [(bad, draw(st.sampled_from(EXAMPLE_BAD[bad])))] + [(f, draw(st.sampled_from(EXAMPLE_GOOD[f]))) for f in others]
    return [x for flag, value in draw(st.permutations(pairs)) for x in (flag, value)]


FUZZ = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(name=st.sampled_from(sorted(EXAMPLES)), args=example_args())
def test_fuzz_the_examples(example, tmp_path, name, args):
    (tmp_path / "afile").write_text("a file\n")
    try:
        example(name, *args)
    finally:
        (tmp_path / "afile").unlink()


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_an_examples_error_is_one_line_on_stderr(tmp_path, name):
    """As a user runs it: a process of its own, exit status 1, one line on stderr and nothing written."""
    pytest.importorskip("trl")
    result = subprocess.run([sys.executable, str(EXAMPLES[name]), "--kl-coef", "nan", "--out", str(tmp_path / "out")],
                            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert result.returncode == 1 and one_line(result.stderr).startswith("error: --kl-coef")
    assert not (tmp_path / "out").exists()


# --- scripts/trl_study.py (row 12) --------------------------------------------------------------------


def trl_study():
    spec = importlib.util.spec_from_file_location("trl_study", ROOT / "scripts" / "trl_study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("args, message", [
    (["--out", "/proc/x"], "--out /proc/x: cannot write"), (["--out", "afile"], "--out afile is a file"),
    (["--workers", "0"], "--workers must be >= 1"), (["--workers", "-1"], "--workers must be >= 1"),
])
def test_the_trl_study_checks_its_options(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("")
    module = trl_study()
    monkeypatch.setattr(module, "run_one", lambda *a: pytest.fail("a run started"))
    monkeypatch.setattr(sys, "argv", ["trl_study.py", *args])
    with pytest.raises(UserError, match=message):
        module.main()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_the_trl_study_error_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "trl_study.py"), "--workers", "0", "--out", str(tmp_path / "s")],
                            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert result.returncode == 1 and one_line(result.stderr) == "error: --workers must be >= 1, got 0"


@pytest.mark.parametrize("content", [b'{"after": ', b"\xff\xfe", b"[1, 2]", b'{"before": {"sampled": 0.2, "greedy": 0.3}, "after": NaN}'])
def test_a_corrupt_result_is_named_and_not_counted(tmp_path, content):
    module = trl_study()
    good = {"before": {"sampled": 0.2, "greedy": 0.3}, "after": {"sampled": 0.4, "greedy": 0.5}}
    seed = module.SEEDS[0]
    for arm in module.ARMS:
        (tmp_path / f"{arm}-s{seed}").mkdir()
        (tmp_path / f"{arm}-s{seed}" / "result.json").write_text(json.dumps(good))
    (tmp_path / f"standard-s{seed}" / "result.json").write_bytes(content)
    found, unreadable = module.results(tmp_path)
    assert seed not in found["standard"] and seed in found["prioritized"] and list(unreadable) == [f"standard-s{seed}"]
    text = module.report(tmp_path)
    assert f"| standard | `{' '.join(module.ARMS['standard'])}` | 0/{len(module.SEEDS)} |" in text
    assert f"Not counted: 1 run(s) whose result.json cannot be read" in text and f"standard-s{seed}" in text.split("Not counted")[1]
    assert read_json(tmp_path / "results.json")["unreadable"] == unreadable


# --- the critical-tokens command: rows 5, 6, 13, 14 and the error boundary -----------------------------


def command(capsys, *args: str) -> str:
    assert cli.main(list(args)) == 2
    return one_line(capsys.readouterr().err)


@pytest.mark.parametrize("args, message", [
    (["rl", "PRE", "--out", "/proc/x"], "--out /proc/x: cannot write in /proc"),  # row 5
    (["rl", "PRE", "--out", "afile/sub"], "afile is a file, not a directory"),
    (["criteria", "PRE", "--out", "/proc/x"], "--out /proc/x: cannot write in /proc"),  # row 6: after 11-19 s of sampling
    (["inspect", str(SHIPPED), "--prompts", "prompts.jsonl", "--out", "/proc/x"], "--out /proc/x: cannot write in /proc"),
    (["report", "REPRO", "--to", "/proc/x"], "--to /proc/x: cannot write in /proc"),
    (["rl", "PRE", "--method", "kl", "--entropy-quantile", "0.5"], "--entropy-quantile is an option of --method entropy80"),  # row 13
    (["rl", "PRE", "--method", "entropy80", "--algorithm", "grpo", "--cov-ratio", "0.01"], "--cov-ratio is an option of --method kl_cov and clip_cov"),
    (["rl", "PRE", "--kl-coef", "nan"], "--kl-coef must be a finite number"),
    (["rl", "PRE", "--beta", "inf"], "--beta must be a finite number >= 0 or 'auto'"),
    (["reproduce", "--preset", "missing.json"], "preset file missing.json does not exist"),  # row 14: was "unknown preset"
    (["reproduce", "--preset", "bad.json"], "bad.json is not valid JSON: Unterminated string starting at: line 1 column 10"),  # not "at at"
])
def test_bad_paths_and_values_are_one_line_before_any_work(pretrained_run, tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("")
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "1+1="}\n')
    (tmp_path / "bad.json").write_text('{"name": "x}')
    (tmp_path / "REPRO").mkdir()
    (tmp_path / "REPRO" / "reproduce.json").write_text("{}")
    monkeypatch.setattr(criteria, "token_stats", lambda *a, **k: pytest.fail("criteria sampled before checking --out"))
    args = [str(pretrained_run) if a == "PRE" else a for a in args]
    before = sorted(tmp_path.rglob("*"))
    assert message in command(capsys, *args)
    assert sorted(tmp_path.rglob("*")) == before


OUTPUT_FLAGS = {"pretrain": ["--preset", "micro", "--out"], "evaluate": ["PRE", "--out"], "critical": ["PRE", "--out"],
                "rl": ["PRE", "--out"], "reproduce": ["--preset", "smoke", "--out"], "report": ["REPRO", "--to"],
                "criteria": ["PRE", "--out"], "inspect": [str(SHIPPED), "--prompts", "prompts.jsonl", "--out"]}


def test_every_command_has_an_output_flag_here():
    assert set(OUTPUT_FLAGS) == set(cli._commands())


@pytest.mark.parametrize("path, message", [("/proc/x", "cannot write in /proc"), ("/proc/x/y", "cannot write in /proc"),
                                           ("afile/sub", "afile is a file, not a directory"), ("afile/sub/deeper", "afile is a file")])
@pytest.mark.parametrize("name", sorted(OUTPUT_FLAGS))
def test_every_command_refuses_an_output_it_cannot_write(pretrained_run, tmp_path, monkeypatch, capsys, name, path, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("")
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "1+1="}\n')
    (tmp_path / "REPRO").mkdir()
    (tmp_path / "REPRO" / "reproduce.json").write_text("{}")
    args = [str(pretrained_run) if a == "PRE" else a for a in OUTPUT_FLAGS[name]]
    assert message in command(capsys, name, *args, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["REPRO", "afile", "prompts.jsonl"]


def test_a_preset_error_names_the_file_and_the_arm(tmp_path):  # row 14
    preset = json.loads((PRESETS_DIR / "smoke.json").read_text())
    preset["experiments"]["kl_comparison"]["arms"][0].update(method="entropy80", algorithm="grpo", group_size=2, entropy_quantile=1.5)
    with pytest.raises(UserError) as e:
        check_preset(preset, "mine.json")
    assert str(e.value).startswith("mine.json: experiments.kl_comparison, arm standard: --entropy-quantile must be in (0, 1], got 1.5")


def test_reproduce_help_lists_every_preset(capsys):
    with pytest.raises(SystemExit):
        cli.main(["reproduce", "--help"])
    shown = re.sub(r"-\s+", "-", " ".join(capsys.readouterr().out.split()))  # argparse may wrap a name at its hyphen
    assert len(preset_names()) > 3 and all(name in shown for name in preset_names())


def test_every_script_is_named_in_the_usage_page():
    text = (ROOT / "docs" / "usage.md").read_text()
    assert all(f"`{p.name}`" in text for p in (ROOT / "scripts").glob("*.py"))


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES, errno.EROFS])
def test_a_users_os_error_while_writing_is_one_line_and_leaves_nothing(pretrained_run, tmp_path, monkeypatch, capsys, code):
    """A full disk or a place that turns read-only mid-run: one line, and the half-made run removed."""
    from critical_tokens.rl import loop

    def full(*args, **kwargs):
        raise OSError(code, os.strerror(code), str(tmp_path / "run" / "config.json"))

    monkeypatch.setattr(loop, "save_config", full)
    line = command(capsys, "rl", str(pretrained_run), "--out", str(tmp_path / "run"), "--kl", "standard")
    assert os.strerror(code) in line and "config.json" in line
    assert not (tmp_path / "run").exists()


def test_any_other_os_error_is_a_bug_and_keeps_its_traceback(pretrained_run, tmp_path, monkeypatch):
    from critical_tokens.rl import loop

    monkeypatch.setattr(loop, "save_config", lambda *a, **k: (_ for _ in ()).throw(ConnectionRefusedError(errno.ECONNREFUSED, "refused")))
    with pytest.raises(ConnectionRefusedError):
        cli.main(["rl", str(pretrained_run), "--out", str(tmp_path / "run"), "--kl", "standard"])


# --- row 9: a run whose final evaluation cannot be read is incomplete ---------------------------------


def test_a_run_whose_final_evaluation_is_cut_is_incomplete(tmp_path):
    from test_confirm_section import fake_reproduction  # tests/ is on the path (pytest's rootdir-relative import)

    from critical_tokens.report.document import _runs_table

    rep = fake_reproduction(tmp_path / "rep")
    jobs = rep.experiment_jobs("confirm")
    assert rep.state("confirm") == "complete"
    metrics = rep.results_dir(jobs[0]) / "metrics.jsonl"
    text = metrics.read_text()
    metrics.write_text(text[: len(text) - 40])  # the last line, with the final results, cut short by a kill
    rep = type(rep)(rep.root)
    assert len(rep.finished(jobs)) == len(jobs) - 1
    state = rep.state("confirm")
    assert state.startswith(f"partial: {len(jobs) - 1} of {len(jobs)} runs finished, 1 incomplete ({jobs[0]['dir']}: ")
    assert any(jobs[0]["name"] in line and "incomplete" in line for line in _runs_table(rep))


def test_the_report_header_names_what_a_model_continues_and_lists_no_answered_finding_as_not_run(tmp_path):
    """cpu-confirm's header called its continued instances "scratch", and listed "Prioritized KL beats standard
    KL (figure 4)" as not run under the pre-registered row that answers it."""
    from test_confirm_section import fake_reproduction

    from critical_tokens.report.document import Section, _header, markdown, not_run
    from critical_tokens.report.paper import PAPER_CLAIMS

    rep = fake_reproduction(tmp_path / "rep")
    for name, model in rep.models.items():
        model.update(dir=f"pretrain/{name}", config={**model["config"], "init_from": None})
    rep.models["i22"]["config"]["init_from"] = "pretrain/i21"  # as the plan records it: the parent's directory
    assert "i21: scratch, i22: continued from i21" in "\n".join(_header(rep))
    answered = Section(["## Study", ""], [("Prioritized beats standard (pre-registered)", PAPER_CLAIMS["kl_comparison"], "+1", "beats")])
    figure4 = not_run("KL comparison", "not in the preset", [("Prioritized KL beats standard KL (figure 4)", "kl_comparison")])
    table1 = not_run("Table 1", "not in the preset", [("Critical tokens are uncertain (table 1)", "table1")])
    text = markdown(rep, [figure4, table1, answered])
    skipped = next(line for line in text.splitlines() if line.startswith("Not run in this reproduction"))
    assert "table 1" in skipped and "figure 4" not in skipped


# --- the shared checks ----------------------------------------------------------------------------------


@pytest.mark.parametrize("value, beta", [("0", 0.0), (8, 8.0), ("150", 150.0), ("auto", None), (1e300, 1e300)])
def test_parse_beta_takes(value, beta):
    assert checks.parse_beta("--beta", value) == beta


@pytest.mark.parametrize("value", ["-1", "inf", "-inf", "nan", float("nan"), "x", "", None, [8]])
def test_parse_beta_refuses_with_a_value_error_that_is_a_user_error(value):
    with pytest.raises(checks.BadValue) as e:
        checks.parse_beta("--beta", value)
    assert isinstance(e.value, ValueError) and isinstance(e.value, UserError) and str(e.value).startswith("--beta must be")


def test_a_huge_integer_is_a_range_error_not_an_overflow(pretrained_run, tmp_path, capsys):
    assert "--seed must be in [0, " in command(capsys, "rl", str(pretrained_run), "--out", str(tmp_path / "x"), "--seed", "9" * 400)
    assert checks.in_range("--n", 10**400, 0) == 10**400


@pytest.mark.parametrize("value, low, high, low_open, integer", [
    (float("nan"), 0, None, False, False), (float("inf"), 0, None, False, False), (0, 0, None, True, False),
    (1.0, 0, 1, False, True), (True, 0, None, False, True), (2, 0, 1, False, False), (1, 0, 1, True, False),
])
def test_in_range_refuses(value, low, high, low_open, integer):
    with pytest.raises(checks.BadValue):
        checks.in_range("--x", value, low, high, low_open=low_open, high_open=low_open, integer=integer)
