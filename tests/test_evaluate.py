"""Evaluation (the paper's tables 4 and 5): bootstrap intervals, failure marking, the table, the command."""

import json
import shutil

import numpy as np
import pytest

from critical_tokens import cli
from critical_tokens.addition import completion, prompt
from critical_tokens.evaluate import bootstrap_ci, first_difference, mark_failure, table_markdown
from critical_tokens.runs import PACKAGE_DIR

# --- pure functions -------------------------------------------------------------------------------


def test_bootstrap_ci_of_all_ones_is_a_point():
    assert bootstrap_ci(np.ones(50)) == (1.0, 1.0)
    assert bootstrap_ci(np.zeros(50)) == (0.0, 0.0)


def test_bootstrap_ci_of_a_fair_coin_brackets_one_half():
    correct = np.array([0.0, 1.0] * 100)  # 200 examples, mean 1/2
    low, high = bootstrap_ci(correct, resamples=2000, seed=1)
    # the normal approximation gives 0.5 +- 1.96 * sqrt(0.25 / 200) = 0.5 +- 0.069
    assert 0.40 < low < 0.5 < high < 0.60
    assert bootstrap_ci(correct, resamples=2000, seed=1) == (low, high)  # seeded: reproducible


@pytest.mark.parametrize(
    "expected, got, index",
    [("abc", "abd", 2), ("abc", "xbc", 0), ("abc", "abc", 3), ("abc", "ab", 2), ("ab", "abc", 2), ("", "x", 0)],
)
def test_first_difference(expected, got, index):
    assert first_difference(expected, got) == index


def test_mark_failure_marks_the_first_wrong_character():
    right = completion(12, 5)  # "\n<scratch>\n[1,2] + [5] , A=[] , ..."
    i = right.index("[5]") + 1
    got = right[:i] + "4" + right[i + 1 :]
    failure = mark_failure(12, 5, got)
    assert failure["a"] == 12 and failure["b"] == 5
    assert failure["first_wrong"] == i and failure["expected"] == "5"
    assert failure["marked"] == prompt(12, 5) + right[:i] + "⟦4⟧" + right[i + 1 :]


def test_mark_failure_of_a_truncated_completion_marks_the_missing_character():
    right = completion(12, 5)
    failure = mark_failure(12, 5, right[:10])
    assert failure["first_wrong"] == 10 and failure["expected"] == right[10]
    assert failure["marked"] == prompt(12, 5) + right[:10] + "⟦∅⟧"


def test_table_markdown_layout():
    def cell(kind, n, accuracy, low, high):
        return {"kind": kind, "n": n, "accuracy": accuracy, "ci_low": low, "ci_high": high, "examples": 100}

    result = {
        "n_digits": 2,
        "cells": [
            cell("identical", 2, 0.5, 0.4, 0.6),
            cell("identical", 3, 0.25, 0.2, 0.3),
            cell("varying", 2, 1.0, 1.0, 1.0),
            cell("varying", 3, 0.0, 0.0, 0.0),
        ],
    }
    assert table_markdown(result) == (
        "**Identical digits** (paper's table 4)\n"
        "\n"
        "| N | N (2) | N+1 (3) |\n"
        "|---|---|---|\n"
        "| 2 | 50.0% ± 10.0% | 25.0% ± 5.0% |\n"
        "\n"
        "**Varying digits** (paper's table 5)\n"
        "\n"
        "| N | N (2) | N+1 (3) |\n"
        "|---|---|---|\n"
        "| 2 | 100.0% ± 0.0% | 0.0% ± 0.0% |\n"
    )


# --- the command ----------------------------------------------------------------------------------


@pytest.fixture
def run_copy(pretrained_run, tmp_path):
    """A private copy of the shared micro run (evaluation writes into the run directory)."""
    return shutil.copytree(pretrained_run, tmp_path / "run")


def test_evaluate_command_writes_the_tables(run_copy, capsys):
    assert cli.main(["evaluate", str(run_copy), "--examples", "20", "--show-failures", "2"]) == 0
    result = json.loads((run_copy / "eval" / "table.json").read_text())
    assert result["n_digits"] == 2
    cells = [(c["kind"], c["n"]) for c in result["cells"]]
    assert cells == [("identical", n) for n in (2, 3, 4, 5)] + [("varying", n) for n in (2, 3, 4, 5)]
    for c in result["cells"]:
        assert c["examples"] == 20
        assert 0.0 <= c["ci_low"] <= c["accuracy"] <= c["ci_high"] <= 1.0
    assert len(result["failures"]) <= 2
    markdown = (run_copy / "eval" / "table.md").read_text()
    assert markdown == table_markdown(result) + "\n"
    assert "| N | N (2) | N+1 (3) | N+2 (4) | N+3 (5) |" in markdown
    out = capsys.readouterr().out
    assert "**Identical digits**" in out and "**Varying digits**" in out
    assert out.count("first wrong character") == len(result["failures"])


def corrupt_weights(run_dir):
    (run_dir / "model" / "model.safetensors").write_bytes(b"\x00garbage, not safetensors" * 8)


@pytest.mark.parametrize("problem", ["missing", "no checkpoint", "corrupt weights"])
def test_evaluate_bad_run_exits_2_with_one_line(run_copy, tmp_path, capsys, problem):
    if problem == "missing":
        run = tmp_path / "nothing"
    elif problem == "no checkpoint":
        run = tmp_path / "empty"
        run.mkdir()
    else:
        run = run_copy
        corrupt_weights(run)
    assert cli.main(["evaluate", str(run), "--examples", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("critical-tokens evaluate: error:") and str(run) in err[0]
    assert not (run / "eval").exists()


def test_evaluate_writes_to_out_and_says_where(run_copy, tmp_path, capsys):
    out = tmp_path / "tables"
    assert cli.main(["evaluate", str(run_copy), "--examples", "2", "--extra-digits", "0", "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"wrote {out / 'table.json'} and {out / 'table.md'}"
    assert json.loads((out / "table.json").read_text())["n_digits"] == 2
    assert not (run_copy / "eval").exists()


def test_evaluate_never_overwrites_a_shipped_checkpoints_table(tmp_path, monkeypatch):
    shipped = PACKAGE_DIR / "checkpoints" / "tiny-n3"
    committed = (shipped / "eval" / "table.md").read_text()
    monkeypatch.chdir(tmp_path)
    assert cli.main(["evaluate", str(shipped), "--examples", "2", "--extra-digits", "0"]) == 0
    assert (shipped / "eval" / "table.md").read_text() == committed
    assert (tmp_path / "eval-tiny-n3" / "table.md").exists()
    assert cli.main(["evaluate", str(shipped), "--examples", "2", "--out", str(shipped / "eval")]) == 2


@pytest.mark.parametrize("flags", [["--n-digits", "0"], ["--n-digits", "31"], ["--extra-digits", "-1"], ["--seed", "-1"],
                                   ["--bootstrap", "0"], ["--show-failures", "-2"]])
def test_evaluate_refuses_out_of_range_values_in_one_line(run_copy, capsys, flags):
    assert cli.main(["evaluate", str(run_copy), "--examples", "2", *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and flags[0] in err[0], err
    assert not (run_copy / "eval").exists()


# --- several sets in one generation call (the RL run's intermediate evaluations) --------------------


@pytest.mark.parametrize("batch_size", [250, 40])  # one call for the three sets; set by set
def test_completions_together_gives_each_sets_own_completions(batch_size):
    """Greedy N+1, greedy N and sampled N+1 prompts in one call: the texts of three separate calls, the
    sampled ones with the same generator seed. On the shipped regime model (real stops), and on a
    random micro model that never stops early, so that every row runs to its own set's limit."""
    import torch

    from critical_tokens import addition
    from critical_tokens.evaluate import completions, completions_together
    from critical_tokens.model import build_model, load_pretrained
    from critical_tokens.tokenizer import build_tokenizer

    shipped, tokenizer, _ = load_pretrained(PACKAGE_DIR / "checkpoints" / "tiny-n3-d1-lr3e-4")
    torch.manual_seed(0)
    micro = build_model("micro", build_tokenizer(), n_digits=2)
    for model, n in ((shipped.eval(), 3), (micro.eval(), 2)):
        task, comfort = addition.rl_pairs(n, 1, 12, seed=1), addition.eval_pairs(n, "varying", 5, seed=2)
        sets = [(task, 0.0), (comfort, 0.0), (task, 1.0)]
        together = completions_together(model, tokenizer, sets, generator=torch.Generator().manual_seed(9), batch_size=batch_size)
        apart = [completions(model, tokenizer, pairs, temperature=t, generator=torch.Generator().manual_seed(9)) for pairs, t in sets]
        assert together == apart
        assert together[0] != together[2]  # not vacuous: sampling changed some completions
    lengths = {len(text) for text in together[1]}  # the micro model's N-digit rows: their own limit
    assert max(lengths) <= addition.max_completion_length(2) + 100 < max(len(t) for t in together[0])


def test_completions_together_takes_one_sampled_set():
    from critical_tokens.evaluate import completions_together

    with pytest.raises(ValueError, match="one sampled set"):
        completions_together(None, None, [([(1, 2)], 1.0), ([(3, 4)], 0.5)])
