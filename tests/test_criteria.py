"""Which criterion finds the critical tokens: the measures by hand, and the command end to end."""

import json

import pytest
import torch

from critical_tokens import cli
from critical_tokens.critical.criteria import METHODS, TokenStats, auc, measure, precision_at_k
from critical_tokens.runs import PACKAGE_DIR


def test_auc_by_hand():
    # positives 0.9 and 0.3, negatives 0.1 and 0.8: of the 4 (positive, negative) pairs, 3 are ordered right
    assert auc([0.9, 0.1, 0.8, 0.3], [1, 0, 0, 1]) == 0.75
    assert auc([0.5, 0.5, 0.5], [1, 0, 0]) == 0.5  # ties count 1/2
    assert auc([0.1, 0.2], [0, 1]) == 1.0 and auc([0.1, 0.2], [1, 0]) == 0.0
    assert auc([0.1, 0.2], [1, 1]) is None and auc([0.1, 0.2], [0, 0]) is None


def test_precision_at_k_by_hand():
    # k = 2 critical tokens; the top 2 scores are 0.9 (critical) and 0.8 (not)
    assert precision_at_k([0.9, 0.1, 0.8, 0.3], [1, 0, 0, 1]) == 0.5
    assert precision_at_k([0.2, 0.9, 0.4, 0.8, 0.1], [0, 1, 0, 1, 0]) == 1.0
    assert precision_at_k([0.9, 0.1], [0, 0]) is None


def test_measure_by_hand():
    certainty = torch.tensor([[0.9, 0.2, 0.95, 0.3], [0.99, 0.1, 0.5, 0.9]])
    critical = torch.tensor([[False, True, False, False], [False, True, False, False]])  # c = 0.2 and 0.1: the least certain
    on_template = torch.ones(2, 4, dtype=torch.bool)
    on_template[1, 3] = False  # past the first wrong character
    entropy = 1 - certainty
    stats = TokenStats(certainty=certainty, entropy=entropy, covariance=-entropy, completion_mask=torch.ones(2, 4, dtype=torch.bool),
                       critical=critical, on_template=on_template, correct=torch.zeros(2, dtype=torch.bool))
    rows = measure(stats, beta=8.0)
    assert rows["prioritized_kl"] == pytest.approx(  # c^8 < 0.5 (c < 0.917) on 5 of the 7 on-template tokens, both critical ones among them
        {"auc": 1.0, "precision_at_k": 1.0, "precision": 2 / 5, "recall": 1.0, "share": 5 / 7})
    # 80/20: entropy >= its 0.8-quantile over the 8 tokens (0.76); Archer: > each row's 0.8-quantile (0.74, 0.66)
    assert rows["entropy80"] == rows["archer"] == pytest.approx({"auc": 1.0, "precision_at_k": 1.0, "precision": 1.0, "recall": 1.0, "share": 2 / 7})
    # KL-Cov: the one token of largest covariance, -0.01, is not critical; the critical ones have the lowest covariance
    assert rows["kl_cov"] == pytest.approx({"auc": 0.0, "precision_at_k": 0.0, "precision": 0.0, "recall": 0.0, "share": 1 / 7})


def test_the_command_writes_criteria_json(pretrained_run, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the default --out is runs/criteria/<run name>, under the working directory
    assert cli.main(["criteria", str(pretrained_run), "--prompts", "3", "--group-size", "2", "--seed", "1"]) == 0
    report = json.loads((tmp_path / "runs" / "criteria" / pretrained_run.name / "criteria.json").read_text())
    assert {"config", "n_digits", "digits", "episodes", "accuracy", "tokens", "base_rate", "criteria"} <= set(report)
    assert report["episodes"] == 6 and report["digits"] == report["n_digits"] + 1
    assert set(report["criteria"]) == set(METHODS)
    for row in report["criteria"].values():
        assert set(row) == {"auc", "precision_at_k", "precision", "recall", "share"}
        assert all(v is None or 0.0 <= v <= 1.0 for v in row.values()), row
    assert all(v is None or 0.0 <= v <= 1.0 for v in (report["accuracy"], report["base_rate"]))
    out = capsys.readouterr().out
    assert "| prioritized KL | 1 - c |" in out and "criteria.json" in out


@pytest.mark.parametrize("args,message", [
    (["missing-dir"], "does not exist"),
    (["RUN", "--group-size", "1"], "--group-size must be >= 2"),
    (["RUN", "--prompts", "0"], "--prompts must be >= 1"),
    (["RUN", "--beta", "nan"], "--beta must be a finite number"),
    (["RUN", "--beta", "0"], "--beta must be > 0"),
    (["RUN", "--seed", "-1"], "--seed must be in"),
    (["RUN", "--out", str(PACKAGE_DIR / "criteria")], "inside the installed package"),
])
def test_bad_input_is_one_line(pretrained_run, tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    args = [str(pretrained_run) if a == "RUN" else a for a in args]
    assert cli.main(["criteria", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not any(tmp_path.iterdir()) and not (PACKAGE_DIR / "criteria").exists()
