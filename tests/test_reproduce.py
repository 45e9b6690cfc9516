"""`critical-tokens reproduce` and `report`: the smoke preset end to end, skipping and resuming,
the report rebuilt from files, preset validation, and the statistics behind the verdicts."""

import dataclasses
import hashlib
import json
import math
import os
import random
import re
import signal
import threading
import time
import shutil
from pathlib import Path

import pytest

from critical_tokens import cli
from critical_tokens.critical.command import CriticalConfig
from critical_tokens.evaluate import EvaluateConfig
from critical_tokens.pretrain import PretrainConfig
from critical_tokens.report.study_dir import Runs
from critical_tokens.report.rl_sections import _mean_kl_weight
from critical_tokens.report import readme
from critical_tokens.report.statistics import Estimate, over_seeds, pct, proportion_interval, seeds_at, t_interval, versus, wilson_interval
from critical_tokens.rl.config import RLConfig
from critical_tokens.runs import UserError, read_json
from critical_tokens.study import launchers
from critical_tokens.study.plan import plan, selected
from critical_tokens.study.preset import PRESETS_DIR, check_preset, load_preset, preset_names, with_seeds
from critical_tokens.study.preset_fields import CHECKPOINTS_DIR, SECTIONS

CONFIG_CLASSES = {"pretrain": PretrainConfig, "evaluate": EvaluateConfig, "critical": CriticalConfig, "rl": RLConfig}


def checksums(root: Path) -> dict[str, str]:
    """Every file of a reproduction but the logs (a rerun appends nothing to them either way)."""
    return {str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and "logs" not in p.parts}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> Path:
    """One smoke reproduction (about a minute on 2 cores); treat as read-only, copy it to change it."""
    out = tmp_path_factory.mktemp("reproduce") / "smoke"
    assert cli.main(["reproduce", "--preset", "smoke", "--out", str(out), "--jobs", "2"]) == 0
    return out


# --- end to end ----------------------------------------------------------------------------------------------


def test_smoke_reproduction_writes_report_plots_and_every_hyperparameter(smoke):
    report = (smoke / "REPORT.md").read_text()
    for heading in ("## Summary", "tables 4-5", "table 1", "figure 3", "figure 4", "figure 6", "figure 7", "several starting models",
                    "## Hyper-parameters", "## Runs"):
        assert heading in report
    assert "critical-tokens reproduce --preset smoke" in report and "Wall time" in report and "Hardware" in report
    for plot in ("levels", "table1", "rl_levels", "kl_comparison", "beta_sweep", "tracked_tokens", "kl_by_model", "confirm"):
        assert (smoke / "plots" / f"{plot}.png").stat().st_size > 0
        assert (smoke / "plots" / f"{plot}.svg").stat().st_size > 0
        assert f"plots/{plot}.png" in report

    meta = read_json(smoke / "reproduce.json")
    assert meta["preset"] == json.loads((PRESETS_DIR / "smoke.json").read_text())
    for job in meta["jobs"]:  # every field of the command's config, resolved
        if job["kind"] in CONFIG_CLASSES:
            assert set(job["config"]) == {f.name for f in dataclasses.fields(CONFIG_CLASSES[job["kind"]])}
        assert (smoke / job.get("same_as_dir", job["dir"]) / "DONE.json").exists()
    rl_jobs = [j for j in meta["jobs"] if j["kind"] == "rl"]
    assert {j["experiment"] for j in rl_jobs} == {"kl_comparison", "beta_sweep", "rl_levels", "kl_by_model", "confirm"}
    assert [j["same_as"] for j in rl_jobs if j["name"] == "beta_sweep/beta0/seed0"] == ["kl_comparison/standard/seed0"]
    # kl_by_model: the kl_comparison model's runs are shared, the other model's are its own
    assert [j["same_as"] for j in rl_jobs if j["name"] == "kl_by_model/n2/standard/seed1"] == ["kl_comparison/standard/seed1"]
    assert [j.get("same_as") for j in rl_jobs if j["name"] == "kl_by_model/n2-d10/standard/seed1"] == [None]
    assert read_json(smoke / meta["models"]["n2-d10"]["dir"] / "config.json")["config"]["n_plus_one_fraction"] == 0.1

    run = smoke / "kl_comparison" / "standard" / "seed1"
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["episodes"] == 32 and "eval/accuracy_sampled" in lines[-1]
    assert any((run / "tb").glob("events.out.tfevents.*"))  # TensorBoard, always
    timing = read_json(smoke / "timing.json")
    assert timing["wall_s"] > 0 and timing["hardware"]["cores"] >= 1


def test_report_html_is_self_contained_and_holds_every_section(smoke):
    html, report = (smoke / "report.html").read_text(), (smoke / "REPORT.md").read_text()
    sources = re.findall(r'src="([^"]*)"', html)
    assert sources and all(s.startswith("data:image/") for s in sources)  # every plot inline
    assert len(sources) == report.count("![")
    assert not re.search(r"<link\b|<script\b|@import|url\(", html)  # nothing else to fetch
    assert not re.search(r'href="(https?:)?//', html)
    for heading in (line[3:] for line in report.splitlines() if line.startswith("## ")):
        assert f">{heading}</h2>" in html.replace("&quot;", '"').replace("&amp;", "&")


def test_running_again_skips_everything_and_changes_nothing(smoke):
    before = checksums(smoke)
    assert cli.main(["reproduce", "--preset", "smoke", "--out", str(smoke), "--jobs", "2"]) == 0
    assert checksums(smoke) == before  # runs, timing, and the rebuilt report and plots alike


def test_an_interrupted_reproduction_resumes(smoke, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(smoke, out)
    resumed = out / "kl_comparison" / "standard" / "seed0"
    (resumed / "DONE.json").unlink()  # as if stopped after its last checkpoint
    restarted = out / "kl_comparison" / "prioritized-auto" / "seed1"
    (restarted / "DONE.json").unlink()
    shutil.rmtree(restarted / "model")  # as if stopped before its first checkpoint
    metrics = (resumed / "metrics.jsonl").read_text()

    assert cli.main(["reproduce", "--preset", "smoke", "--out", str(out), "--only", "kl-comparison", "--jobs", "2"]) == 0
    assert read_json(resumed / "DONE.json")["resumed"] is True
    assert (resumed / "metrics.jsonl").read_text() == metrics
    assert read_json(restarted / "DONE.json")["resumed"] is False
    assert read_json(restarted / "config.json")["config"]["seed"] == 1
    assert len(read_json(out / "timing.json")["invocations"]) == 2


def report_lines(root: Path) -> list[str]:
    """REPORT.md without what differs between two invocations by nature: the command, the times."""
    text = re.sub(r"\d+h\d\dm\d\ds|\d+m\d\ds", "<time>", (root / "REPORT.md").read_text())
    return [line for line in text.splitlines() if not line.startswith(("- Command:", "- Wall time:"))]


def metric_lines(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if not k.startswith("time/")} for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_ray_launcher_caches_runs_and_reports_as_the_local_one(smoke, tmp_path):
    """Two runs of the local smoke reproduction removed, then the same command with --launcher ray
    (a local Ray instance): the rest is cached, the two runs come back with the same numbers as Ray
    tasks, and the report is the local one."""
    pytest.importorskip("ray")
    out = tmp_path / "copy"
    shutil.copytree(smoke, out)
    removed = ["levels/n2", "kl_comparison/standard/seed0"]
    for run in removed:
        shutil.rmtree(out / run)

    assert cli.main(["reproduce", "--preset", "smoke", "--out", str(out), "--launcher", "ray"]) == 0
    assert read_json(out / "levels/n2/table.json") == read_json(smoke / "levels/n2/table.json")
    assert metric_lines(out / removed[1]) == metric_lines(smoke / removed[1])
    assert read_json(out / "timing.json")["invocations"][-1]["runs"] == 2  # the others were cached
    assert report_lines(out) == report_lines(smoke)


def test_slurm_launcher_resumes_an_interrupted_run(smoke, tmp_path, monkeypatch):
    """An RL run of the smoke reproduction stopped after its last checkpoint, resumed as a job of
    submitit's local executor (SLURM's stand-in): the numbers of the uninterrupted run."""
    pytest.importorskip("submitit")
    monkeypatch.setattr(launchers, "SUBMITIT_CLUSTER", "local")
    monkeypatch.setattr("critical_tokens.report.report", lambda config: None)  # the report: the ray test's
    out = tmp_path / "copy"
    shutil.copytree(smoke, out)
    resumed = out / "kl_comparison" / "standard" / "seed0"
    (resumed / "DONE.json").unlink()

    assert cli.main(["reproduce", "--preset", "smoke", "--out", str(out), "--launcher", "slurm"]) == 0
    assert read_json(resumed / "DONE.json")["resumed"] is True
    assert metric_lines(resumed) == metric_lines(smoke / "kl_comparison" / "standard" / "seed0")
    assert any((out / "submitit").iterdir())


def test_a_worker_killed_mid_run_is_retried_to_the_same_numbers(smoke, tmp_path, monkeypatch, capsys):
    """A real SIGKILL of the worker process running an RL job, at a random moment of the run: the
    launcher says so, starts the job again, and it ends with the uninterrupted run's metrics."""
    monkeypatch.setattr("critical_tokens.report.report", lambda config: None)  # the report: the ray test's
    out = tmp_path / "copy"
    shutil.copytree(smoke, out)
    run = "kl_comparison/standard/seed0"
    shutil.rmtree(out / run)

    def kill_the_worker():
        deadline = time.monotonic() + 300
        while not (out / run / "metrics.jsonl").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(random.uniform(0, 1.0))
        for pid in _children():
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(int(pid), signal.SIGKILL)

    killer = threading.Thread(target=kill_the_worker)
    killer.start()
    assert cli.main(["reproduce", "--preset", "smoke", "--out", str(out), "--jobs", "2"]) == 0  # as the fixture: 1 thread per run
    killer.join()
    assert f"retrying {run} (1/2" in capsys.readouterr().out
    assert metric_lines(out / run) == metric_lines(smoke / run)


def _children() -> list[str]:
    """The processes this one started (its worker processes among them)."""
    return [pid for task in Path(f"/proc/{os.getpid()}/task").iterdir() for pid in (task / "children").read_text().split()]


def test_report_rebuilds_from_the_files_alone(smoke, tmp_path):
    assert cli.main(["report", str(smoke), "--to", str(tmp_path / "published")]) == 0
    assert (tmp_path / "published" / "REPORT.md").read_text() == (smoke / "REPORT.md").read_text()
    assert (tmp_path / "published" / "summary.json").read_text() == (smoke / "summary.json").read_text()
    assert (tmp_path / "published" / "plots" / "kl_comparison.svg").exists()


def test_a_reproduction_made_before_summary_json_gets_one(smoke, tmp_path):
    out = tmp_path / "older"
    shutil.copytree(smoke, out)
    (out / "summary.json").unlink()
    assert cli.main(["report", str(out)]) == 0
    assert (out / "summary.json").read_text() == (smoke / "summary.json").read_text()
    assert (out / "REPORT.md").read_text() == (smoke / "REPORT.md").read_text()


def test_summary_json_holds_the_numbers_report_md_states(smoke):
    summary, report = read_json(smoke / "summary.json"), (smoke / "REPORT.md").read_text()
    assert summary["hardware"] == read_json(smoke / "timing.json")["hardware"] and summary["preset"] == "smoke"
    assert list(summary["experiments"]) == ["levels", "table1", "rl_levels", "kl_comparison", "beta_sweep", "tracked_tokens", "kl_by_model", "confirm"]
    for finding in summary["findings"]:  # the rows of REPORT.md's summary table
        assert f"| {finding['finding']} | " in report and f" | {finding['ours']} | **{finding['verdict']}** |" in report
    kl = summary["experiments"]["kl_comparison"]
    assert kl["runs"] == 4 and kl["episodes"] == 32 and set(kl["arms"]) == {"standard", "prioritized-auto"}
    for arm, numbers in kl["arms"].items():  # final sampled, greedy, in distribution: as in the arm's row of figure 4's table
        row = next(line for line in report.splitlines() if line.startswith(f"| {arm} | "))
        cells = [pct(Estimate(**e) if e else None) for e in numbers["final"].values()]
        assert " | ".join(cells) in row
        assert any(" | ".join(cells) in line for line in readme.outcome(summary))  # the README's table, from the same numbers
        assert row.endswith(f" | {weight_cell(numbers['mean_kl_weight'])} |")  # the mean KL weight, the last column
    sweep = summary["experiments"]["beta_sweep"]
    jobs = read_json(smoke / "reproduce.json")["jobs"]
    block = readme.beta_sweep(summary)
    for arm, numbers in sweep["arms"].items():  # figure 6's table: final sampled, greedy, in distribution, mean KL weight
        row = next(line for line in report.splitlines() if line.startswith(f"| {numbers['beta']} | "))
        cells = [pct(Estimate(**e) if e else None) for e in numbers["final"].values()]
        assert len(cells) == 3 and " | ".join(cells) in row
        weight = weight_cell(numbers["mean_kl_weight"])
        assert f" | {weight} | {numbers['against_standard']} |" in row
        line = next(line for line in block if line.startswith(f"| {numbers['beta']} | "))  # the README's table
        assert " | ".join(cells) in line and line.endswith(f" | {weight} |")
        # from the runs' files: per run the mean of weight_mean over its iterations, then the mean over seeds
        per_run = []
        for job in (j for j in jobs if j["experiment"] == "beta_sweep" and j["arm"] == arm):
            records = [json.loads(r) for r in (smoke / job.get("same_as_dir", job["dir"]) / "metrics.jsonl").read_text().splitlines()]
            weights = [r["weight_mean"] for r in records if "weight_mean" in r]
            per_run.append(sum(weights) / len(weights))
        assert numbers["mean_kl_weight"]["mean"] == pytest.approx(sum(per_run) / len(per_run)) and numbers["mean_kl_weight"]["n"] == 2
        assert (weight == "1.00") == numbers["beta"].startswith("0 (standard)") and 0 < numbers["mean_kl_weight"]["mean"] <= 1


def test_the_study_is_analysed_paired_from_each_runs_final_evaluation(smoke):
    """smoke's toy study (2 instances x 2 seeds): every hypothesis has the 4 units, each difference
    recomputed here from the runs' final_eval.json; the matched-weight arm applied alpha x E[c^8]."""
    from critical_tokens.report.paired import DECISIONS

    summary, report = read_json(smoke / "summary.json"), (smoke / "REPORT.md").read_text()
    study = summary["experiments"]["confirm"]
    assert study["state"] == "complete" and study["decision"] in DECISIONS and study["git_commit"]
    assert f"**{study['decision']}**" in report and "Pre-registered confirmation" in report
    final = {(m, a, s): read_json(smoke / "confirm" / m / a / f"seed{s}" / "final_eval.json")
             for m in ("n2", "n2-d10") for a in ("standard", "prioritized", "matched-weight", "matched-penalty") for s in (100, 101)}
    for name, h in study["hypotheses"].items():
        diffs = [final[(m, h["arm"], s)][h["metric"]] - final[(m, h["versus"], s)][h["metric"]] for m in ("n2", "n2-d10") for s in (100, 101)]
        assert h["n"] == 4 and h["mean"] == pytest.approx(sum(diffs) / 4), name
        assert h["p_holm"] is None or h["p_holm"] >= (h["p_t"] or 0)
    coefs = [read_json(smoke / "confirm" / m / "matched-weight" / f"seed{s}" / "config.json")["kl_coef_used"] for m in ("n2", "n2-d10") for s in (100, 101)]
    assert all(0 < c < 5.0 for c in coefs) and coefs[0] == coefs[1]  # one calibration per instance, shared by its seeds


def weight_cell(e: dict | None) -> str:
    """A mean KL weight as REPORT.md and the README print it: three significant digits, "-" without a KL penalty."""
    return "-" if e is None else f"{e['mean']:#.3g}"


def test_a_changed_hyperparameter_is_refused_not_mixed(smoke, tmp_path):
    preset = json.loads((PRESETS_DIR / "smoke.json").read_text())
    preset["rl"]["lr"] = 0.5
    path = tmp_path / "changed.json"
    path.write_text(json.dumps(preset))
    before = checksums(smoke)
    assert cli.main(["reproduce", "--preset", str(path), "--out", str(smoke), "--only", "kl_comparison"]) == 2
    assert checksums(smoke) == before


# --- errors ---------------------------------------------------------------------------------------------------


def test_unknown_experiment_or_preset_exits_2(tmp_path, capsys):
    assert cli.main(["reproduce", "--preset", "smoke", "--out", str(tmp_path / "x"), "--only", "nope"]) == 2
    assert "unknown experiment 'nope'" in capsys.readouterr().err
    assert cli.main(["reproduce", "--preset", "laptop", "--out", str(tmp_path / "x")]) == 2
    assert "unknown preset 'laptop'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert cli.main(["report", str(tmp_path)]) == 2


def test_missing_shipped_checkpoint_says_pretrain_makes_it(tmp_path, capsys):
    preset = json.loads((PRESETS_DIR / "smoke.json").read_text())
    preset["models"]["n2"]["shipped"] = "no-such-checkpoint"
    path = tmp_path / "shipped.json"
    path.write_text(json.dumps(preset))
    assert cli.main(["reproduce", "--preset", str(path), "--out", str(tmp_path / "x"), "--only", "levels"]) == 2
    err = capsys.readouterr().err
    assert "no-such-checkpoint" in err and "--pretrain" in err and len(err.strip().splitlines()) == 1


# --- presets ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_loads_and_every_key_is_a_real_field(name):
    assert set(preset_names()) >= {"smoke", "cpu", "paper"}
    preset, _ = load_preset(name)
    jobs, models = plan(preset)
    experiments = preset["experiments"]  # each experiment brings the jobs it needs (cpu-rloo-long: RL alone)
    assert {j.kind for j in jobs} >= {"rl"} | ({"evaluate"} if "levels" in experiments else set()) | \
        ({"critical"} if "table1" in experiments else set())
    for section, (config_class, _) in SECTIONS.items():
        fields = {f.name for f in dataclasses.fields(config_class)}
        entries = preset[section].values() if section == "models" else [preset.get(section, {})]
        for entry in entries:
            assert set(entry) - {"shipped"} <= fields
    for experiment in preset["experiments"].values():
        assert set(experiment.get("rl", {})) <= {f.name for f in dataclasses.fields(RLConfig)}
        for arm in experiment.get("arms", []):
            assert set(arm) - {"name", "kl_coef_by_model"} <= {f.name for f in dataclasses.fields(RLConfig)}  # by model: kl_coef


@pytest.mark.parametrize("name", preset_names())
def test_shipped_checkpoints_were_made_by_the_recipe_their_preset_states(name):
    """A preset that uses a shipped checkpoint also says how to redo it (``--pretrain``); the two must
    agree on every recorded pre-training field but the paths (``out``, and ``init_from``, which the
    preset names by model)."""
    preset, _ = load_preset(name)
    for model, spec in preset["models"].items():
        if "shipped" not in spec:
            continue
        recorded = read_json(CHECKPOINTS_DIR / spec["shipped"] / "config.json")["config"]
        assert recorded.get("init_from") is None or "init_from" in spec
        for field, value in spec.items():
            if field not in ("shipped", "init_from"):
                assert recorded[field] == value, f"{name}: models.{model}.{field}"
        for field, value in recorded.items():
            if field not in spec and field not in ("out", "init_from", "resume", "device"):
                assert value == getattr(PretrainConfig(), field), f"{name}: models.{model}.{field} (default)"


@pytest.mark.parametrize("edit, message", [
    (lambda p: p["rl"].update(lrr=1e-4), "'lrr' is not a RLConfig field"),
    (lambda p: p["models"]["n2"].update(n_digit=2), "'n_digit' is not a PretrainConfig field"),
    (lambda p: p["evaluate"].update(run="x"), "'run' is set by reproduce"),
    (lambda p: p["experiments"]["kl_comparison"]["arms"][0].update(temprature=1.0), "'temprature' is not a RLConfig field"),
    (lambda p: p["experiments"].update(figure5={}), "unknown experiment 'figure5'"),
    (lambda p: p["experiments"]["levels"].update(models=["n9"]), "no model 'n9'"),
    (lambda p: p["rl"].update(kl="prioritised"), "'prioritised' is not one of"),
    (lambda p: p["rl"].update(episodes="many"), "'many' is not of type int"),
    (lambda p: p["rl"].update(episodes=-1), "--episodes must be >= 1"),
    (lambda p: p["experiments"]["beta_sweep"].update(betas=[-1]), "beta must be a finite number >= 0"),
    (lambda p: p["experiments"]["confirm"]["hypotheses"][0].update(arm="prioritised"), "compares arms 'prioritised'"),
    (lambda p: p["experiments"]["confirm"]["hypotheses"][1].update(role="primary"), "exactly one hypothesis"),
    (lambda p: p["experiments"]["confirm"]["hypotheses"][0].pop("margin"), "needs arm, margin"),
    (lambda p: p["experiments"]["confirm"].update(decision="best-arm"), "'decision' is one of confirm, per-arm"),
    (lambda p: (p["experiments"]["confirm"].update(decision="per-arm"), p["experiments"]["confirm"]["hypotheses"][1].update(role="primary")),
     "each arm it judges has exactly one 'primary'"),  # H2a is on prioritized too
    (lambda p: p["experiments"]["confirm"].update(first_seed=-3), "'first_seed' must be an integer >= 0"),
    (lambda p: p["experiments"]["confirm"]["arms"][2].update(kl="prioritized"), "--match-weight-beta scales the standard penalty"),
])
def test_a_typo_in_a_preset_is_a_user_error(edit, message):
    preset = json.loads((PRESETS_DIR / "smoke.json").read_text())
    edit(preset)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_preset(preset, "smoke.json")


def test_only_takes_names_comma_lists_and_dashes_and_brings_what_an_experiment_reads():
    preset, _ = load_preset("smoke")
    assert selected(("kl-comparison,levels",), preset) == ["levels", "kl_comparison"]
    assert selected(("tracked_tokens",), preset) == ["kl_comparison", "tracked_tokens"]
    assert selected((), preset) == list(preset["experiments"])
    assert all(spec.get("seeds", 5) == 5 for spec in with_seeds(preset, 5)["experiments"].values())


def test_a_study_runs_paired_seeds_from_its_first_seed_and_its_context_arms_last():
    """confirm: every arm of every instance at seeds first_seed.., seed-major, the arms no hypothesis
    names (no-kl) after all the others; --first-seed / --seeds move the whole study to other seeds."""
    preset, _ = load_preset("cpu-confirm")
    jobs = [j for j in plan(preset)[0] if j.experiment == "confirm"]
    assert len(jobs) == 3 * 5 * 10 and {j.seed for j in jobs} == set(range(100, 110))
    tested = [j for j in jobs if not j.arm.endswith("no-kl")]
    assert jobs[:len(tested)] == tested and [j.seed for j in tested] == sorted(j.seed for j in tested)
    used_before = {j.seed for name in preset_names() if name not in ("cpu-confirm", "smoke") for j in plan(load_preset(name)[0])[0] if j.kind == "rl"}
    assert not used_before & {j.seed for j in jobs}  # fresh seeds (smoke: a toy study, for the tests)
    moved = [j for j in plan(with_seeds(preset, 3, 200))[0] if j.experiment == "confirm"]
    assert {j.seed for j in moved} == {200, 201, 202} and len(moved) == 3 * 5 * 3


def test_beta_numbers_and_text_give_the_same_run():
    preset, _ = load_preset("smoke")
    preset["experiments"]["kl_comparison"]["arms"].append({"name": "p150", "kl": "prioritized", "beta": 150})
    preset["experiments"]["beta_sweep"]["betas"] = [0, 150.0]
    jobs, _ = plan(preset)
    by_name = {j.name: j for j in jobs}
    assert by_name["kl_comparison/p150/seed0"].config["beta"] == "150"
    assert by_name["beta_sweep/beta150/seed0"].same_as == "kl_comparison/p150/seed0"
    preset["experiments"]["beta_sweep"]["betas"] = [150, "150"]  # the same beta twice
    with pytest.raises(UserError, match="both be beta_sweep/beta150/seed0"):
        plan(preset)


# --- statistics behind the verdicts ------------------------------------------------------------------------------


def test_t_interval_by_hand():
    # values 1, 2, 3: mean 2, sample sd 1, t_{0.975, 2} = 4.303 -> 2 ± 4.303 / sqrt(3) = 2 ± 2.4843
    e = t_interval([1.0, 2.0, 3.0])
    assert e.mean == 2.0 and e.n == 3
    assert math.isclose(e.high - e.mean, 4.303 / math.sqrt(3), rel_tol=1e-9)
    assert t_interval([0.5]) == Estimate(0.5, None, None, 1)  # one seed: no interval
    assert t_interval([]) is None


def test_versus_needs_separate_intervals_to_be_clear():
    low, high = Estimate(0.2, 0.1, 0.3, 3), Estimate(0.5, 0.4, 0.6, 3)
    assert versus(high, low) == "clearly above"
    assert versus(Estimate(0.35, 0.25, 0.45, 3), low) == "above"
    assert versus(low, high) == "not above"
    assert versus(Estimate(0.9, None, None, 1), low) == "above"  # one seed is never "clearly"


def test_wilson_interval_by_hand():
    # p = 0.5 on n = 100, z = 1.96: (0.5 + 0.019208 ± 1.96 sqrt(0.0025 + 0.000096)) / 1.038416 = 0.4038, 0.5962
    low, high = wilson_interval(0.5, 100)
    assert math.isclose(low, 0.40383, abs_tol=1e-5) and math.isclose(high, 0.59617, abs_tol=1e-5)
    # p = 0: [0, z² / (n + z²)], not the point [0, 0] of p ± z s.e.
    assert wilson_interval(0.0, 100) == (0.0, pytest.approx(1.96**2 / (100 + 1.96**2)))


def test_proportion_interval_stays_inside_0_1_where_the_t_interval_does_not():
    seeds = [1.0, 1.0, 0.5, 1.0, 0.5]  # the t-interval: 0.8 ± 0.34, up to 1.14
    assert t_interval(seeds).high > 1
    e = proportion_interval(seeds)
    assert e.mean == 0.8 and 0 <= e.low < 0.8 < e.high <= 1
    # n_eff = p(1 - p) / (s² / n) = 0.16 / 0.015 with z = t_{0.975, 4}: the Wilson interval at that size
    assert (e.low, e.high) == pytest.approx(wilson_interval(0.8, 0.16 / 0.015, 2.776))
    assert proportion_interval([0.5]) == Estimate(0.5, None, None, 1)
    assert proportion_interval([]) is None


def test_seeds_that_agree_get_the_interval_of_their_pooled_episodes():
    assert proportion_interval([0.0, 0.0, 0.0]) == Estimate(0.0, 0.0, 0.0, 3)  # no count of trials: a point, as before
    e = proportion_interval([0.0, 0.0, 0.0], trials=32)  # 0 of 96 episodes
    assert e.low == pytest.approx(0.0, abs=1e-12) and e.high == pytest.approx(4.303**2 / (96 + 4.303**2))


def test_the_mean_kl_weight_is_the_mean_over_seeds_of_each_runs_mean_over_iterations():
    # seed 0 logs 1.0 and 0.5 (mean 0.75), seed 1 logs 0.25: the mean over seeds is (0.75 + 0.25) / 2 = 0.5, not
    # the 0.5833 of pooling the three iterations; evaluation lines log no weight and do not count
    runs = Runs([[{"episodes": 0, "eval/accuracy_sampled": 0.5}, {"episodes": 16, "weight_mean": 1.0}, {"episodes": 32, "weight_mean": 0.5}],
                 [{"episodes": 16, "weight_mean": 0.25}]], {})
    assert _mean_kl_weight(runs) == t_interval([0.75, 0.25])
    assert _mean_kl_weight(Runs([[{"episodes": 16, "kl": 0.1}]], {})) is None  # no KL penalty: no weight logged
    no_kl = {"beta": "-", "seeds": 1, "final": {"sampled": None, "greedy": None, "comfort_greedy": None}, "mean_kl_weight": None}
    summary = {"experiments": {"beta_sweep": {"state": "complete", "verdict": "not run", "arms": {"no-kl": no_kl}}}}
    assert "| - | - | - | - | - |" in readme.beta_sweep(summary)


def test_accuracies_are_summarised_as_proportions_and_gains_with_t():
    runs = Runs([[{"episodes": 0, "eval/accuracy_sampled": 1.0}], [{"episodes": 0, "eval/accuracy_sampled": 0.5}],
                 [{"episodes": 0, "eval/accuracy_sampled": 1.0}]], {"eval_episodes": 8})
    assert runs.trials["eval/accuracy_sampled"] == 8
    assert seeds_at(runs, "eval/accuracy_sampled", "final") == proportion_interval([1.0, 0.5, 1.0], trials=8)
    assert over_seeds([0.5, -0.25, 0.75], "gain") == t_interval([0.5, -0.25, 0.75])


def test_a_run_made_before_a_field_existed_is_the_same_run_while_the_field_keeps_its_default(tmp_path):
    from critical_tokens.study.jobs import job_status
    from critical_tokens.study.plan import Job

    preset, where = load_preset("smoke")
    job = next(j for j in plan(preset, where)[0] if j.kind == "rl")
    (tmp_path / job.dir).mkdir(parents=True)
    older = {k: v for k, v in job.config.items() if k != "n_digits"}  # as written by a version without the field
    (tmp_path / job.dir / "DONE.json").write_text(json.dumps({"config": older}))
    assert job_status(job, tmp_path) == "done"
    changed = dataclasses.replace(job, config={**job.config, "n_digits": 2})  # not the default: another run
    with pytest.raises(UserError, match="other hyper-parameters"):
        job_status(changed, tmp_path)


def test_an_interrupted_continued_pretraining_resumes(tmp_path):
    """A continued model's config.json holds init_from under OUT (as the worker resolved it), the plan
    holds it relative to OUT: the same run, to resume (it was refused as 'other hyper-parameters')."""
    from critical_tokens.study.jobs import _absolute, job_status

    preset, where = load_preset("smoke")
    job = next(j for j in plan(preset, where)[0] if j.kind == "pretrain" and j.config.get("init_from"))
    root = tmp_path / "out"
    (root / job.dir / "model").mkdir(parents=True)
    (root / job.dir / "config.json").write_text(json.dumps({"config": _absolute(job.config, root)}))
    (root / job.dir / "model" / "trainer_state.pt").write_bytes(b"")
    assert job_status(job, root) == "resume"


def test_a_pretraining_field_at_its_default_leaves_the_model_directory_as_it_was(tmp_path):
    """compile and max_minutes were added after reproductions were made: at their defaults a model
    keeps its directory (config hash) and job config; a value that changes the run changes both."""
    from critical_tokens.study.plan import LATER_FIELDS

    preset, where = load_preset("smoke")
    jobs, models = plan(preset, where)
    assert all(key not in models["n2"]["config"] for key in LATER_FIELDS)
    stopped = json.loads(json.dumps(preset))
    stopped["models"]["n2"]["max_minutes"] = 5.0
    jobs_stopped, models_stopped = plan(stopped, where)
    assert models_stopped["n2"]["dir"] != models["n2"]["dir"] and models_stopped["n2"]["config"]["max_minutes"] == 5.0
    assert models_stopped["n3"]["dir"] == models["n3"]["dir"]


def test_the_report_says_how_far_each_pretraining_went(smoke):
    report, summary = (smoke / "REPORT.md").read_text(), read_json(smoke / "summary.json")
    progress = summary["experiments"]["levels"]["pretraining"]
    assert set(progress) == {"n2", "n3"}
    for name, numbers in progress.items():
        config = read_json(smoke / read_json(smoke / "reproduce.json")["models"][name]["dir"] / "config.json")
        assert numbers["steps"] == numbers["total_steps"] == config["total_steps"] and not numbers["stopped_early"]
        assert f"- {name}: pre-trained here on cpu, all {numbers['total_steps']:,} steps, in " in report
