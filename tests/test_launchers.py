"""The scheduler behind every launcher: a failed job is retried a bounded number of times and said
why, a job whose input is wrong is not retried, the jobs that need a failed one are skipped, and the
others go on. A launcher that hands back ready futures stands in for local workers, Ray and SLURM."""

import sys
from concurrent.futures import Future

import pytest

from critical_tokens import reproduce
from critical_tokens.study import launchers
from critical_tokens.study.plan import Job
from critical_tokens.reproduce import ReproduceConfig, run_plan
from critical_tokens.runs import UserError


class ScriptedLauncher:
    """Each job's outcomes in order: a run_job record, or an exception (the worker itself died)."""

    def __init__(self, outcomes: dict[str, list]):
        self.outcomes, self.submitted = outcomes, []

    def submit(self, job, root, resume, wandb) -> Future:
        self.submitted.append(job.name)
        outcome = self.outcomes.get(job.name, [{"wall_s": 1.0}]).pop(0)
        future = Future()
        if isinstance(outcome, Exception):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)
        return future

    def shutdown(self, cancel=False) -> None:
        pass


def test_failed_jobs_are_retried_then_reported_and_the_others_go_on(tmp_path, monkeypatch, capsys):
    jobs = [Job(f"pretrain/{m}", "pretrain", "pretrain", f"pretrain/{m}", {}) for m in "abcd"]
    jobs += [Job(f"levels/{m}", "evaluate", "levels", f"levels/{m}", {}, needs=f"pretrain/{m}") for m in "abcd"]
    launcher = ScriptedLauncher({
        "pretrain/a": [{"error": "RuntimeError: node lost", "retry": True}, {"wall_s": 2.0}],  # succeeds the second time
        "pretrain/b": [{"error": "UserError: too long", "retry": False}],  # a wrong input fails again: not retried
        "pretrain/c": [BrokenPipeError("worker died")] * 3,  # fails every time
    })
    monkeypatch.setattr(reproduce, "start_launcher", lambda *args: launcher)

    walls, failed = run_plan(jobs, {j.name: "fresh" for j in jobs}, tmp_path, 2, 0, False, ReproduceConfig(retries=2))
    assert sorted(walls) == ["levels/a", "levels/d", "pretrain/a", "pretrain/d"]
    assert failed == {"pretrain/b": "UserError: too long", "levels/b": "its model pretrain/b failed",
                      "pretrain/c": "BrokenPipeError: worker died", "levels/c": "its model pretrain/c failed"}
    assert launcher.submitted.count("pretrain/a") == 2 and launcher.submitted.count("pretrain/b") == 1
    assert launcher.submitted.count("pretrain/c") == 3  # the first try and 2 retries
    out = capsys.readouterr().out
    assert "retrying pretrain/a (1/2, from the start): it failed with RuntimeError: node lost" in out
    assert "FAILED pretrain/c after 3 attempts: BrokenPipeError: worker died (log: " in out


def test_run_job_reports_a_failure_and_whether_to_retry_it():
    def fails_with(error):
        def execute(*args):
            raise error
        return execute

    assert launchers.run_job(lambda *args: 3.5, None, "", False, False, 1) == {"wall_s": 3.5}
    assert launchers.run_job(fails_with(UserError("bad\nmore")), None, "", False, False, 1) == {"error": "UserError: bad", "retry": False}
    assert launchers.run_job(fails_with(MemoryError()), None, "", False, False, 1) == {"error": "MemoryError: ", "retry": True}


def test_a_missing_launcher_package_is_a_user_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", None)  # import submitit now raises ImportError
    with pytest.raises(UserError, match=r"pip install 'critical-tokens\[slurm\]'"):
        launchers.check_installed("slurm")
    launchers.check_installed("local")
