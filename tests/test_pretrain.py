"""End-to-end pre-training at micro size: the run directory, the loss, --resume, and bad input."""

import json
import math
import shutil

import pytest
import torch

from critical_tokens import cli, pretrain
from critical_tokens.model import context_length
from critical_tokens.pretrain import load_pretrained
from critical_tokens.runs import read_metrics

from conftest import MICRO_PRETRAIN_ARGS


def test_pretrain_writes_a_self_describing_run(pretrained_run):
    config = json.loads((pretrained_run / "config.json").read_text())
    assert config["config"]["n_digits"] == 2 and config["config"]["preset"] == "micro"
    assert config["n_examples"] == 200 and config["total_steps"] == 13  # ceil(200 / 16)

    metrics = read_metrics(pretrained_run)
    assert [r["step"] for r in metrics] == list(range(1, 14))
    assert all(math.isfinite(r["loss"]) for r in metrics)
    evaluated = [r["step"] for r in metrics if "accuracy_identical_n" in r]
    assert evaluated == [5, 10, 13]  # every --eval-every steps, and at the end
    assert all(0.0 <= r["accuracy_identical_n"] <= 1.0 for r in metrics if "accuracy_identical_n" in r)

    model, tokenizer, n_digits = load_pretrained(pretrained_run)
    assert n_digits == 2
    assert model.config.n_positions == context_length(2) and model.config.vocab_size == len(tokenizer)
    assert (pretrained_run / "model" / "trainer_state.pt").exists()
    assert not [p.name for p in pretrained_run.iterdir() if p.name.startswith(".")]  # no temporary leftovers


# --- a slightly longer run: the loss goes down, and --resume reproduces it ------------------------

RESUME_ARGS = [
    "--preset", "micro", "--n-digits", "2", "--examples-per-length", "80", "--epochs", "1", "--batch-size", "8",
    "--lr", "3e-3", "--eval-every", "100", "--eval-examples", "4", "--checkpoint-every", "10",
]  # 160 additions, 20 steps of 8, a checkpoint at step 10


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("resume") / "a"
    assert cli.main(["pretrain", "--out", str(out), *RESUME_ARGS]) == 0
    return out


def test_loss_goes_down(uninterrupted_run):
    losses = [r["loss"] for r in read_metrics(uninterrupted_run)]
    assert len(losses) == 20
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < first - 0.3, (first, last)


def test_resume_gives_the_same_model_and_metrics(uninterrupted_run, tmp_path, monkeypatch):
    out = tmp_path / "b"

    class InterruptedLog(pretrain.MetricsLog):
        """Ctrl-C during step 13: three steps after the checkpoint at step 10 were logged."""

        def log(self, record):
            if record["step"] == 13:
                raise KeyboardInterrupt
            super().log(record)

    monkeypatch.setattr(pretrain, "MetricsLog", InterruptedLog)
    assert cli.main(["pretrain", "--out", str(out), *RESUME_ARGS]) == 130
    assert [r["step"] for r in read_metrics(out)] == list(range(1, 13))
    assert torch.load(out / "model" / "trainer_state.pt", weights_only=False)["step"] == 10
    monkeypatch.undo()

    assert cli.main(["pretrain", "--out", str(out), "--resume"]) == 0
    expected, resumed = read_metrics(uninterrupted_run), read_metrics(out)
    assert [r["step"] for r in resumed] == list(range(1, 21))  # steps 11, 12 logged once, not twice
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in expected], rel=1e-6, abs=1e-7)
    assert resumed[-1]["accuracy_identical_n"] == expected[-1]["accuracy_identical_n"]

    model_a, _, _ = load_pretrained(uninterrupted_run)
    model_b, _, _ = load_pretrained(out)
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        torch.testing.assert_close(state_b[key], state_a[key], rtol=0, atol=1e-6, msg=key)


def test_random_position_offset_runs(tmp_path):
    out = tmp_path / "offset"
    rc = cli.main(["pretrain", "--out", str(out), "--random-position-offset", "--preset", "micro", "--n-digits", "1",
                   "--examples-per-length", "24", "--batch-size", "8", "--eval-every", "100", "--eval-examples", "2"])
    assert rc == 0
    assert json.loads((out / "config.json").read_text())["config"]["random_position_offset"] is True
    metrics = read_metrics(out)
    assert len(metrics) == 3 and all(math.isfinite(r["loss"]) for r in metrics)


def test_n_plus_one_fraction_is_recorded_and_trains_on_longer_additions(tmp_path):
    out = tmp_path / "dose"
    assert cli.main(["pretrain", "--out", str(out), *MICRO_PRETRAIN_ARGS, "--n-plus-one-fraction", "0.2"]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["config"]["n_plus_one_fraction"] == 0.2
    assert saved["n_examples"] == 250  # 200 additions of 1..2 digits and 50 of 3 digits: 20% of the set


def test_max_minutes_stops_early_with_a_checkpoint_and_says_so(tmp_path):
    out = tmp_path / "short"
    assert cli.main(["pretrain", "--out", str(out), *MICRO_PRETRAIN_ARGS, "--max-minutes", "1e-9"]) == 0
    metrics = read_metrics(out)
    assert [r["step"] for r in metrics] == [1]  # the time was up after the first step (of 13)
    assert metrics[-1]["stopped_early"] is True and "accuracy_identical_n" in metrics[-1]
    assert torch.load(out / "model" / "trainer_state.pt", weights_only=False)["step"] == 1
    assert json.loads((out / "config.json").read_text())["total_steps"] == 13  # the schedule it did not finish


def test_padding_to_a_multiple_changes_the_width_not_the_loss(pretrained_run):
    from critical_tokens.pretrain import collate, encode_examples
    from critical_tokens import addition

    model, tokenizer, _ = load_pretrained(pretrained_run)
    examples = encode_examples(tokenizer, addition.pretraining_pairs(2, 8, seed=0))
    plain = collate(examples, list(range(8)), tokenizer.pad_token_id, "completion", 0, torch.Generator())
    padded = collate(examples, list(range(8)), tokenizer.pad_token_id, "completion", 0, torch.Generator(), pad_multiple=64)
    assert padded[0].shape[1] % 64 == 0 and padded[0].shape[1] - 64 < plain[0].shape[1] < padded[0].shape[1]
    assert (padded[2][:, plain[0].shape[1]:] == -100).all() and (padded[1][:, plain[0].shape[1]:] == 0).all()
    with torch.no_grad():
        losses = [model(input_ids=i, attention_mask=m, labels=l, position_ids=p).loss for i, m, l, p in (plain, padded)]
    torch.testing.assert_close(losses[1], losses[0])


# --- bad input: exit code 2, one line on stderr, nothing written --------------------------------------


def run_cli(argv) -> int:
    try:
        return cli.main(argv)
    except SystemExit as e:  # argparse rejects some input itself, with exit code 2
        return e.code


@pytest.mark.parametrize(
    "change, message",
    [
        (["--n-digits", "0"], "--n-digits"),
        (["--n-digits", "1000"], "--n-digits"),
        (["--preset", "huge"], "preset"),
        (["--batch-size", "0"], "--batch-size"),
        (["--n-plus-one-fraction", "1"], "--n-plus-one-fraction"),
        (["--n-plus-one-fraction", "-0.1"], "--n-plus-one-fraction"),
        (["--epochs", "inf"], "--epochs"),
        (["--lr", "nan"], "--lr"),
        (["--seed", "-1"], "--seed"),
        (["--grad-clip", "0"], "--grad-clip"),
        (["--max-minutes", "0"], "--max-minutes"),
    ],
)
def test_bad_arguments_exit_2_without_writing(tmp_path, capsys, change, message):
    out = tmp_path / "run"
    assert run_cli(["pretrain", "--out", str(out), *MICRO_PRETRAIN_ARGS, *change]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "Traceback" not in err[0]
    assert not out.exists()  # nothing half-written, no model/


def test_existing_out_without_resume_exits_2(pretrained_run, tmp_path, capsys):
    out = tmp_path / "copy"
    shutil.copytree(pretrained_run, out)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    metrics_before = (out / "metrics.jsonl").read_text()
    assert run_cli(["pretrain", "--out", str(out), *MICRO_PRETRAIN_ARGS]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already exists" in err[0] and "--resume" in err[0]
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert (out / "metrics.jsonl").read_text() == metrics_before


def test_resume_of_a_missing_dir_exits_2(tmp_path, capsys):
    out = tmp_path / "missing"
    assert run_cli(["pretrain", "--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0]
    assert not out.exists()


def test_resume_of_a_dir_without_checkpoint_starts_it_over(pretrained_run, tmp_path, capsys):
    """What a run stopped before its first checkpoint leaves (its config.json, no live process): nothing to
    resume, so --resume starts it over with its saved config (it used to refuse, and the directory blocked
    every rerun until deleted by hand)."""
    out = tmp_path / "no_checkpoint"
    out.mkdir()
    shutil.copy(pretrained_run / "config.json", out / "config.json")
    assert run_cli(["pretrain", "--out", str(out), "--resume"]) == 0
    assert "starting it over" in capsys.readouterr().out
    assert (out / "model" / "trainer_state.pt").exists()
    assert [r["loss"] for r in read_metrics(out)] == [r["loss"] for r in read_metrics(pretrained_run)]  # the same run, from the start


def test_init_from_continues_from_another_runs_weights(pretrained_run, tmp_path):
    """--init-from starts from the given run's weights (continued pre-training), not from scratch."""
    out = tmp_path / "continued"
    args = [a for a in MICRO_PRETRAIN_ARGS]
    args[args.index("--examples-per-length") + 1] = "10"  # one step of 16
    assert cli.main(["pretrain", "--out", str(out), "--init-from", str(pretrained_run), "--lr", "1e-9", *args]) == 0
    start, _, _ = load_pretrained(pretrained_run)
    continued, _, _ = load_pretrained(out)
    for (name, a), b in zip(start.state_dict().items(), continued.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name  # a learning rate of 1e-9 barely moves the weights
    assert json.loads((out / "config.json").read_text())["config"]["init_from"] == str(pretrained_run)
