"""Critical tokens: the gap Δ, discovery, where failures start, tracking, and the `critical` command."""

import json
import shutil

import numpy as np
import pytest
import torch

from critical_tokens import addition
from critical_tokens.cli import main
from critical_tokens.critical.measure import (
    certainty_gap,
    discover_critical_positions,
    discovery_scores,
    first_error,
    table_by_position,
    teacher_forced,
    tracked_probabilities,
    where_failures_start,
)
from critical_tokens.critical.pictures import Scratchpad, render_html, render_png
from critical_tokens.model import build_model
from critical_tokens.runs import PACKAGE_DIR, UserError
from critical_tokens.tokenizer import build_tokenizer, encode

# --- the gap Δ and table 1, by hand -----------------------------------------------------------------


def test_certainty_gap_by_hand():
    # index 2: 0.3 - mean(0.9, 0.9, 0.9) = -0.6; elsewhere 0.9 - mean(0.9, 0.3, 0.9) = 0.9 - 0.7 = 0.2
    np.testing.assert_allclose(certainty_gap(np.array([0.9, 0.9, 0.3, 0.9])), [0.2, 0.2, -0.6, 0.2])


def test_certainty_gap_needs_two_tokens():
    with pytest.raises(ValueError):
        certainty_gap(np.array([0.5]))


def test_table_by_position_by_hand():
    gaps = [certainty_gap(np.array([0.9, 0.9, 0.3, 0.9])),  # Δ = 0.2, 0.2, -0.6, 0.2
            certainty_gap(np.array([0.5, 0.5, 0.5]))]  # Δ = 0, 0, 0
    table = table_by_position(gaps, critical=[[2], [0]], groups={"first": [[], [0]]})
    assert table["critical"]["mean"] == pytest.approx((-0.6 + 0.0) / 2)
    assert table["non-critical"]["mean"] == pytest.approx((0.2 + 0.0) / 2)
    assert table["non-critical (lowest)"]["mean"] == pytest.approx((0.2 + 0.0) / 2)
    assert table["first"] == {"mean": pytest.approx(0.0), "ci_low": 0.0, "ci_high": 0.0, "outputs": 1}
    assert table["critical"]["ci_low"] <= table["critical"]["mean"] <= table["critical"]["ci_high"]


# --- discovery without the template ------------------------------------------------------------------


def test_discovery_by_hand():
    rows = [np.array([0.9, 0.9, 0.3, 0.9]), np.array([0.5, 0.9, 0.9, 0.8, 0.9])]
    critical = [[2], [3]]
    # Output 1: lowest Δ at 2 (a hit). Output 2: order 0 (0.5), 3 (0.8), then the ties 1, 2, 4.
    assert [f.tolist() for f in discover_critical_positions(rows, 3)] == [[2, 0, 1], [0, 3, 1]]
    scores = discovery_scores(rows, critical, ks=(1, 3))
    assert scores["at_k"][1] == {"precision": pytest.approx(0.5), "recall": pytest.approx(0.5)}
    assert scores["at_k"][3] == {"precision": pytest.approx(1 / 3), "recall": pytest.approx(1.0)}
    assert scores["chance_precision"] == pytest.approx((1 / 4 + 1 / 5) / 2)


def test_discovery_leaves_out_outputs_without_critical_positions():
    rows = [np.array([0.9, 0.3]), np.array([0.1, 0.9])]
    assert discovery_scores(rows, [[1], []], ks=(1,))["outputs"] == 1
    with pytest.raises(UserError):
        discovery_scores(rows, [[], []])


# --- where failures start ----------------------------------------------------------------------------


def _critical(a, b, n, name, step, operand):
    return next(t for t in addition.critical_tokens(a, b, n) if (t.name, t.step, t.operand) == (name, step, operand))


def test_first_error_at_a_critical_comma():
    # N = 2, 123+45: on step 1 the model closes "[1,2" with "]" where the n+1 comma goes.
    a, b, n = 123, 45, 2
    expected = addition.completion(a, b)
    comma = _critical(a, b, n, "n+1_comma", 1, 1)
    assert expected[comma.offset] == ","
    generated = expected[: comma.offset] + "] + [4,5] , A=[] , C=0 , 2+5+0=7 , A->7 , C->0\n"
    error = first_error(a, b, generated, n)
    assert (error.offset, error.expected, error.got, error.correct) == (comma.offset, ",", "]", False)
    assert error.critical == comma
    assert error.category == "critical step1/op1/n+1_comma"


def test_first_error_not_at_a_critical_token():
    a, b, n = 123, 45, 2
    expected = addition.completion(a, b)
    generated = expected[:-2] + "9\n"  # result "1 6 9"
    error = first_error(a, b, generated, n)
    assert (error.offset, error.critical, error.place) == (len(expected) - 2, None, "result line")
    assert error.category == "not critical, result line"
    assert first_error(a, b, expected, n) is None


def test_where_failures_start_counts_and_recovery():
    a, b, n = 123, 45, 2
    expected = addition.completion(a, b)
    comma = _critical(a, b, n, "n+1_comma", 1, 1)
    wrong_comma = expected[: comma.offset] + "]" + "\n</scratch>\n1 2 3\n"  # wrong at the critical comma
    recovered = expected[: comma.offset] + "." + expected[comma.offset + 1 :]  # wrong there, right result
    wrong_result = expected[:-2] + "9\n"
    pairs = [(a, b)] * 4
    summary = where_failures_start(pairs, [expected, wrong_comma, recovered, wrong_result], n)
    assert (summary["generations"], summary["correct"], summary["failures"]) == (4, 2, 2)
    assert summary["counts"] == {"critical step1/op1/n+1_comma": 1, "not critical, result line": 1}
    assert (summary["at_critical"], summary["at_critical_fraction"]) == (1, 0.5)
    assert summary["recovery"] == {"recovered": 1, "total": 2, "fraction": 0.5}


# --- pictures -----------------------------------------------------------------------------------------


def test_pictures_outline_critical_tokens_and_a_premature_stop(tmp_path):
    stopped = Scratchpad("stopped early", "<[1,", (0.9, 0.8, 0.7, 0.2), critical_offsets=(3,), first_wrong=4)
    render_html([stopped], tmp_path / "p.html")
    page = (tmp_path / "p.html").read_text()
    assert page.count("outline: 2px solid #ff8c00") == 2  # the legend and the comma at offset 3
    assert 'title="expected more"' in page  # the red box after the last character
    assert "&lt;" in page and "offset 3: certainty 0.2000" in page  # characters escaped, values on hover
    render_png([stopped], tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


# --- teacher forcing and tracking with a micro model -------------------------------------------------


@pytest.fixture(scope="module")
def micro():
    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    return build_model("micro", tokenizer, 3), tokenizer


def test_teacher_forced_does_not_depend_on_the_batch(micro):
    model, tokenizer = micro
    pairs = [(1234, 56), (7, 8), (9999, 9999)]
    together = teacher_forced(model, tokenizer, pairs)
    for pair, scores in zip(pairs, together):
        alone = teacher_forced(model, tokenizer, [pair])[0]
        assert len(scores.max_prob) == len(addition.completion(*pair))
        for field in ("max_prob", "negentropy", "p_correct"):
            np.testing.assert_allclose(getattr(scores, field), getattr(alone, field), atol=1e-5)


def test_teacher_forced_scores_the_completion_tokens(micro):
    # Completion token t is predicted by the logits at prompt length + t - 1.
    model, tokenizer = micro
    a, b = 1234, 56
    prompt, target = encode(tokenizer, addition.prompt(a, b)), encode(tokenizer, addition.completion(a, b))
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + target])).logits[0]  # (S, V)
    probs = torch.softmax(logits[len(prompt) - 1 : -1] / 2.0, dim=-1)  # (L, V)
    expected = probs[torch.arange(len(target)), torch.tensor(target)].numpy()
    scores = teacher_forced(model, tokenizer, [(a, b)], temperature=2.0)[0]
    np.testing.assert_allclose(scores.p_correct, expected, rtol=1e-5, atol=1e-6)


def test_tracked_probabilities_on_n_plus_1_pairs(micro):
    model, tokenizer = micro
    model.train()
    pairs = [(1234, 5678), (1234, 56), (56, 1234)]  # N = 3: both, operand 1, operand 2 have N+1 digits
    probs = tracked_probabilities(model, tokenizer, pairs, 3, temperature=2.0)
    expected = {"p_correct/" + addition.tracked_token_key(*t) for t in addition.TRACKED_TOKENS}
    assert set(probs) == expected | {"p_correct/critical_mean"}
    assert all(0.0 <= p <= 1.0 for p in probs.values())
    assert model.training  # mode restored


def test_tracked_probabilities_refuses_comfort_zone_pairs(micro):
    model, tokenizer = micro
    with pytest.raises(UserError, match="no critical tokens"):
        tracked_probabilities(model, tokenizer, [(123, 45), (7, 8)], 3, temperature=2.0)


# --- the command, end to end -------------------------------------------------------------------------


@pytest.fixture
def micro_run(pretrained_run, tmp_path):
    """A copy of the session's micro pre-training run (N = 2): the command writes into it."""
    run = tmp_path / "run"
    shutil.copytree(pretrained_run, run)
    return run


def test_critical_command_end_to_end(micro_run, tmp_path, capsys):
    html, png = tmp_path / "pads.html", tmp_path / "pads.png"
    code = main(["critical", str(micro_run), "--examples", "6", "--batch-size", "6", "--show", "2",
                 "--html", str(html), "--png", str(png)])
    assert code == 0
    out = capsys.readouterr().out
    assert "Certainty gap" in out and "Where failures start" in out and "precision@k" in out
    report = json.loads((micro_run / "critical" / "report.json").read_text())
    assert report["n_digits"] == 2 and report["examples"] == 6
    assert report["table1"]["max_prob"]["critical"]["outputs"] == 6
    assert report["failures"]["generations"] == 6
    assert (micro_run / "critical" / "report.md").read_text().startswith("## Certainty gap")
    assert html.read_text().startswith("<!doctype html>")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_critical_command_needs_n_digits_when_the_model_lacks_it(tmp_path, capsys):
    tokenizer = build_tokenizer()
    build_model("micro", tokenizer, 2).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    assert main(["critical", str(tmp_path), "--examples", "2"]) == 2
    assert "--n-digits" in capsys.readouterr().err


def test_critical_writes_to_out_and_prints_the_paths_it_wrote(micro_run, tmp_path, capsys):
    out, png = tmp_path / "analysis", tmp_path / "picture"  # a picture name without ".png" is kept as given
    assert main(["critical", str(micro_run), "--examples", "2", "--show", "1", "--out", str(out), "--png", str(png)]) == 0
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert printed == f"wrote {out / 'report.json'} and {out / 'report.md'}, {png}"
    assert (out / "report.json").exists() and png.read_bytes()[:4] == b"\x89PNG"
    assert not (micro_run / "critical").exists()
    assert main(["critical", str(micro_run), "--examples", "2", "--png", str(tmp_path)]) == 2  # a directory
    assert "is a directory" in capsys.readouterr().err


def test_critical_of_a_shipped_checkpoint_writes_in_the_current_directory(tmp_path, monkeypatch):
    shipped = PACKAGE_DIR / "checkpoints" / "tiny-n3"
    before = sorted(p.relative_to(shipped) for p in shipped.rglob("*"))
    monkeypatch.chdir(tmp_path)
    assert main(["critical", str(shipped), "--examples", "2", "--show", "0"]) == 0
    assert (tmp_path / "critical-tiny-n3" / "report.json").exists()
    assert sorted(p.relative_to(shipped) for p in shipped.rglob("*")) == before
