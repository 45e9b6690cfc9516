"""Reading a study directory (the ``--out`` of ``reproduce``): the plan, each job's results, the timing; the runs' metrics.

A study directory is files (``reproduce.json``: the plan and every hyper-parameter; ``timing.json``:
wall time, hardware; per job ``DONE.json``, ``metrics.jsonl``, ``config.json``, ``table.json``,
``report.json``). The report reads them through `StudyDir`, never a live object.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from ..runs import UserError, read_json, read_metrics

DONE = "DONE.json"

# The accuracies an RL run logs, and the field of its config that gives the episodes behind each.
ACCURACY_EPISODES = {"eval/accuracy_sampled": "eval_episodes", "eval/accuracy_greedy": "eval_episodes",
                     "eval/comfort_accuracy_greedy": "eval_comfort_episodes", "accuracy": "batch_size"}


class Runs(list):
    """The metrics of an arm's finished runs (one list of records per seed), with the episodes
    behind each accuracy they log (``trials``, from the arm's config)."""

    def __init__(self, metrics: list[list[dict]], config: dict):
        super().__init__(metrics)
        self.trials = {key: config[field] for key, field in ACCURACY_EPISODES.items() if isinstance(config.get(field), int)}


class StudyDir:
    """A study directory as files: the plan, the jobs' results, the timing."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not (self.root / "reproduce.json").exists():
            raise UserError(f"{self.root} is not a reproduction (no reproduce.json); make one with critical-tokens reproduce --out {self.root}")
        self.meta = read_json(self.root / "reproduce.json")
        self.timing = read_json(self.root / "timing.json") if (self.root / "timing.json").exists() else None
        shape = {"command": str, "preset_name": str, "preset_source": str, "parallel_jobs": int, "threads_per_job": int,
                 "preset": dict, "jobs": list, "models": dict}
        if not isinstance(self.meta, dict) or any(not isinstance(self.meta.get(k), t) for k, t in shape.items()) \
                or not isinstance(self.timing, (dict, type(None))):
            raise UserError(f"{self.root}: reproduce.json or timing.json is damaged (not what critical-tokens reproduce writes); "
                            f"run the reproduction again to rewrite them")
        self.preset = self.meta["preset"]
        self.jobs = self.meta["jobs"]
        self.models = self.meta["models"]
        self._unreadable: dict[str, str | None] = {}  # results directory -> why its results cannot be read

    def results_dir(self, job: dict) -> Path:
        return self.root / job.get("same_as_dir", job["dir"])

    def done(self, job: dict) -> dict | None:
        path = self.results_dir(job) / DONE
        return read_json(path) if path.exists() else None

    def experiment_jobs(self, experiment: str) -> list[dict]:
        return [j for j in self.jobs if j["experiment"] == experiment]

    def arms(self, experiment: str) -> dict[str, list[dict]]:
        arms: dict[str, list[dict]] = {}
        for job in self.experiment_jobs(experiment):
            arms.setdefault(job["arm"], []).append(job)
        return arms

    def finished(self, jobs: list[dict]) -> list[dict]:
        """The jobs that are done and whose results can be read (`unreadable`)."""
        return [j for j in jobs if self.done(j) and not self.unreadable(j)]

    def unreadable(self, job: dict) -> str | None:
        """Why a done job's results cannot be read, or None: an RL run whose metrics.jsonl does not end
        with its final evaluation (the ``final/`` keys the report reads), e.g. a last line cut short. Such
        a run counts as incomplete: a report never uses it silently."""
        if job.get("kind") != "rl" or not self.done(job):
            return None
        key = str(self.results_dir(job))
        if key not in self._unreadable:
            try:
                records = read_metrics(self.results_dir(job))
                final = bool(records) and any(k.startswith("final/") for k in records[-1])
                self._unreadable[key] = None if final else "its metrics.jsonl does not end with the final evaluation"
            except UserError as e:
                self._unreadable[key] = str(e)
        return self._unreadable[key]

    def incomplete(self, jobs: list[dict]) -> list[dict]:
        """The jobs that are done but whose results cannot be read."""
        return [j for j in jobs if self.unreadable(j)]

    def metrics(self, jobs: list[dict]) -> Runs:
        """The metrics.jsonl of each finished run of ``jobs`` (one arm: the seeds of one config)."""
        return Runs([read_metrics(self.results_dir(j)) for j in self.finished(jobs)], jobs[0]["config"] if jobs else {})

    def run_config(self, job: dict) -> dict:
        path = self.results_dir(job) / "config.json"
        return read_json(path) if path.exists() else {}

    def state(self, experiment: str) -> str:
        jobs = self.experiment_jobs(experiment)
        n, bad = len(self.finished(jobs)), self.incomplete(jobs)
        if not jobs or n + len(bad) == 0:
            return "not run"
        if n == len(jobs):
            return "complete"
        named = "; ".join(f"{j['dir']}: {self.unreadable(j)}" for j in bad[:3]) + ("; ..." if len(bad) > 3 else "")
        return f"partial: {n} of {len(jobs)} runs finished" + (f", {len(bad)} incomplete ({named})" if bad else "")

    def n_digits(self, model: str) -> int:
        return int(self.models[model]["config"]["n_digits"])

    def compute_s(self, experiment: str) -> float:
        """The sum of the wall times of the experiment's finished runs; a run it shares with another
        experiment counts there, where it ran."""
        own = [self.done(j) for j in self.experiment_jobs(experiment) if not j.get("same_as")]
        return sum(done["wall_s"] for done in own if done)


def series(records: list[dict], key: str) -> dict[int, float]:
    return {int(r["episodes"]): r[key] for r in records if r.get(key) is not None and "episodes" in r}


def at(runs: list[list[dict]], key: str, which: Literal["initial", "final"]) -> list[float]:
    """Per run, the first or the last logged value of ``key``."""
    values = []
    for records in runs:
        logged = [r[key] for r in records if r.get(key) is not None]
        if logged:
            values.append(logged[0] if which == "initial" else logged[-1])
    return values


def gains(runs: list[list[dict]], key: str) -> list[float]:
    return [f - i for f, i in zip(at(runs, key, "final"), at(runs, key, "initial"))]
