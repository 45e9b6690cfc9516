"""The ``critical-tokens reproduce`` command: a study in one command, the paper's by default (docs/method.md section 7).

It loads a preset (:mod:`critical_tokens.study.preset`) and makes its plan (`study.plan`), then
`run_plan` executes the jobs in parallel, in worker processes here, as Ray tasks or as SLURM jobs
(`study.launchers`); a finished job (``DONE.json``) is skipped, an interrupted one resumed from its
checkpoint, a failed one retried a bounded number of times (`study.jobs` says where a job stands and
runs it). ``OUT/reproduce.json`` records the options, the preset and the plan, ``OUT/timing.json``
the hardware and the wall time of every invocation. Last, it writes the study's report from those
files (:mod:`critical_tokens.report`): it stands above both packages, which do not import it.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from concurrent.futures import FIRST_COMPLETED, wait
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from .config import arg, check_range, check_types
from .runs import UserError, check_output, describe_kind, git_commit, read_json, run_kind, write_json
from .study.jobs import execute, job_status, log_path, now
from .study.launchers import LocalLauncher, RayLauncher, SlurmLauncher, check_installed
from .study.plan import Job, jobs_to_run, plan, selected
from .study.preset import PRESETS_DIR, load_preset, preset_names, with_seeds
from .study.preset_fields import CHECKPOINTS_DIR, EXPERIMENTS


@dataclass(frozen=True)
class ReproduceConfig:
    preset: str = arg("cpu", f"a preset of the package ({', '.join(preset_names())}: each file of {PRESETS_DIR} says what it runs in its "
                      "description; smoke is for tests, cpu is `make demo`), or the path of a preset JSON file")
    out: str = arg("runs/reproduce", "directory of the reproduction: every run, REPORT.md, plots/")
    only: tuple[str, ...] = arg((), "run only these experiments (names or a comma list): " + ", ".join(EXPERIMENTS), metavar="EXPERIMENT")
    jobs: int = arg(0, "runs in parallel (0: one per GPU, or one per CPU core without a GPU)")
    pretrain: bool = arg(False, "pre-train from scratch even the models the package ships a checkpoint for")
    seeds: int = arg(0, "seeds per experiment (0: the preset's)")
    first_seed: int | None = arg(None, "first seed of every experiment (default: the preset's, 0 unless it says): "
                                 "--first-seed 200 --seeds 10 runs seeds 200..209, e.g. to replicate a study on seeds it did not use")
    wandb: bool = arg(False, "also log every finished run to Weights & Biases (offline unless WANDB_API_KEY is set), if wandb is installed")
    launcher: Literal["local", "ray", "slurm"] = arg("local", "where the runs run: worker processes here, Ray tasks (pip install 'critical-tokens[ray]'), or SLURM jobs through submitit ('critical-tokens[slurm]'); --out must be on a file system every node sees")
    retries: int = arg(2, "times a failed run is started again (from its last checkpoint); a problem with its input is not retried")
    cpus_per_job: int = arg(0, "CPU cores (torch threads) per run; 0: local: this machine's cores over --jobs; ray, slurm: 1")
    gpus_per_job: int = arg(0, "ray, slurm: GPUs per run (local: one per worker when this machine has GPUs)")
    ray_address: str | None = arg(None, "ray: the address of a running Ray cluster ('auto': the one this node belongs to); default: a local Ray instance")
    slurm_partition: str | None = arg(None, "slurm: the partition to submit to (default: the cluster's)")
    slurm_minutes: int = arg(24 * 60, "slurm: time limit of each run's job, in minutes (a run cut short is retried from its last checkpoint)")


# --- 1. Running the plan in parallel ---------------------------------------------------------------------


def default_jobs() -> tuple[int, int]:
    """(parallel jobs, GPUs): one job per GPU, or one per CPU core without a GPU."""
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return (gpus or os.cpu_count() or 1), gpus


def _progress(job: Job, root: Path) -> tuple[int, int] | None:
    """(done, total) of a running job from its own files (the worker's bar is in its log)."""
    directory = root / job.dir
    if job.kind == "rl":
        last = _last_line(directory / "metrics.jsonl")
        return int(last.get("episodes", 0)), int(job.config["episodes"])
    if job.kind == "pretrain" and (directory / "config.json").exists():
        try:
            total = json.loads((directory / "config.json").read_text())["total_steps"]
        except (ValueError, KeyError):
            return None
        return int(_last_line(directory / "metrics.jsonl").get("step", 0)), int(total)
    return None


def _last_line(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - 16384))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return {}
    for line in reversed(lines):
        try:
            return json.loads(line)
        except ValueError:
            continue
    return {}


def start_launcher(config: ReproduceConfig, root: Path, n_jobs: int, gpus: int, threads: int):
    """The launcher of ``--launcher`` (study/launchers.py): where the jobs run."""
    if config.launcher == "ray":
        return RayLauncher(execute, config.ray_address, threads, config.gpus_per_job)
    if config.launcher == "slurm":
        return SlurmLauncher(execute, str((root / "submitit").resolve()), n_jobs, threads, config.gpus_per_job,
                             config.slurm_partition, config.slurm_minutes)
    return LocalLauncher(execute, n_jobs, gpus, threads)


class _PlanRun:
    """One `run_plan`: the jobs to do, running (future -> (job, its bar's slot)), finished and failed,
    and how they show: a bar overall and one per worker on a terminal, one plain line per run in a log."""

    def __init__(self, jobs: list[Job], status: dict[str, str], root: Path, n_jobs: int, config: ReproduceConfig):
        self.runnable = [j for j in jobs if j.same_as is None]
        self.todo = [j for j in self.runnable if status[j.name] != "done"]
        self.finished = {j.name for j in self.runnable if status[j.name] == "done"}
        self.walls: dict[str, float] = {}
        self.failed: dict[str, str] = {}
        self.attempts: dict[str, int] = {}
        self.running: dict[Any, tuple[Job, int]] = {}
        self.status, self.root, self.n_jobs, self.config = status, root, n_jobs, config
        self.interactive = sys.stderr.isatty()
        self.slots: list[Any] = [None] * n_jobs  # per-run bars, one line per worker, fed from the runs' files
        self.overall: Any = None
        self.t0, self.ended = time.perf_counter(), 0

    def say(self, text: str) -> None:
        (self.overall.write if self.interactive else print)(text)

    def announce(self, text: str, job: Job, ran: bool = True) -> None:
        self.ended += ran and job.kind != "copy"  # copying a shipped checkpoint (or skipping) takes no time: not a run to average
        self.overall.update(1)
        if self.interactive:
            self.overall.write(text)
            return
        elapsed = time.perf_counter() - self.t0  # a log file: one plain line per run, with the count and an estimate of the time left
        left = sum(j.kind != "copy" for j in [*self.todo, *(j for j, _ in self.running.values())])
        eta = "no run left" if not left else f"about {_duration(elapsed / self.ended * left)} left" if self.ended else "time left: known after the first run"
        print(f"[{len(self.finished) + len(self.failed)}/{len(self.runnable)}] {text}; elapsed {_duration(elapsed)}, {eta}", flush=True)

    def start_ready(self, pool, where: str, wandb: bool) -> None:
        """Submits the jobs whose model is ready, while a worker is free; skips those whose model failed."""
        from tqdm.auto import tqdm

        for job in list(self.todo):
            if len(self.running) >= self.n_jobs:
                break
            if job.needs in self.failed:
                self.todo.remove(job)
                self.failed[job.name] = f"its model {job.needs} failed"
                self.announce(f"skipped {job.name}: {self.failed[job.name]}", job, ran=False)
            elif job.needs is None or job.needs in self.finished:
                self.todo.remove(job)
                slot = next(i for i, bar in enumerate(self.slots) if bar is None)
                self.slots[slot] = tqdm(desc=job.name, position=slot + 1, leave=False, dynamic_ncols=True, disable=not self.interactive,
                                        unit={"rl": "ep", "pretrain": "step"}.get(job.kind, "it"))
                self.running[pool.submit(job, where, self.status[job.name] == "resume", wandb)] = (job, slot)

    def collect(self, future) -> None:
        """A job that ended: finished, to retry (from its last checkpoint), or failed."""
        job, slot = self.running.pop(future)
        self.slots[slot].close()
        self.slots[slot] = None
        try:
            outcome = future.result()
        except Exception as e:  # noqa: BLE001 - the worker itself died (killed, lost node): one failed run must not stop the others
            outcome = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", "retry": True}
        log = log_path(self.root, job)
        if "wall_s" in outcome:
            self.walls[job.name] = outcome["wall_s"]
            self.finished.add(job.name)
            self.announce(f"done   {job.name} in {_duration(self.walls[job.name])}", job)
        elif outcome["retry"] and self.attempts.get(job.name, 0) < self.config.retries:
            self.attempts[job.name] = self.attempts.get(job.name, 0) + 1
            self.status[job.name] = job_status(job, self.root)  # from its last checkpoint, if it made one
            self.todo.insert(0, job)
            self.say(f"retrying {job.name} ({self.attempts[job.name]}/{self.config.retries}, "
                     f"{'resumed' if self.status[job.name] == 'resume' else 'from the start'}): it failed with {outcome['error']} (log: {log})")
        else:
            tries = f" after {self.attempts[job.name] + 1} attempts" if job.name in self.attempts else ""
            self.failed[job.name] = outcome["error"]
            self.announce(f"FAILED {job.name}{tries}: {self.failed[job.name]} (log: {log})", job)

    def show_progress(self) -> None:
        for job, slot in self.running.values():
            progress = _progress(job, self.root) if self.interactive else None
            if progress:
                self.slots[slot].total, self.slots[slot].n = progress[1], progress[0]
                self.slots[slot].refresh()

    def close_bars(self) -> None:
        for bar in self.slots:
            if bar is not None:
                bar.close()
        self.overall.close()


def run_plan(jobs: list[Job], status: dict[str, str], root: Path, n_jobs: int, gpus: int, wandb: bool,
             config: ReproduceConfig = ReproduceConfig()) -> tuple[dict, dict]:
    """Runs every job not done, up to ``n_jobs`` at a time, a job once the model it reads is ready,
    where ``config.launcher`` says; a failed job is started again up to ``config.retries`` times.
    -> ({name: wall seconds} of the jobs run, {name: error} of the failed ones)."""
    from tqdm.auto import tqdm

    run = _PlanRun(jobs, status, root, n_jobs, config)
    if not run.todo:
        return run.walls, run.failed
    threads = threads_per_job(config, n_jobs)
    where = str(root) if config.launcher == "local" else str(root.resolve())  # a remote worker's directory is not ours
    run.overall = tqdm(total=len(run.runnable), initial=len(run.finished), desc="reproduce", unit="run", position=0,
                       dynamic_ncols=True, smoothing=0, disable=not run.interactive)
    pool = start_launcher(config, root, n_jobs, gpus, threads)
    try:
        while run.todo or run.running:
            run.start_ready(pool, where, wandb)
            if not run.running:
                continue
            done, _ = wait(list(run.running), timeout=1.0, return_when=FIRST_COMPLETED)
            for future in done:
                run.collect(future)
            run.show_progress()
    except KeyboardInterrupt:
        run.overall.write("interrupted: finished runs are kept and the others resume from their last checkpoint; run the same command again")
        pool.shutdown(cancel=True)
        raise
    finally:
        run.close_bars()
    pool.shutdown()
    return run.walls, run.failed


def threads_per_job(config: ReproduceConfig, n_jobs: int) -> int:
    if config.cpus_per_job:
        return config.cpus_per_job
    return max(1, (os.cpu_count() or 1) // n_jobs) if config.launcher == "local" else 1


def _duration(seconds: float) -> str:
    minutes, s = divmod(int(round(seconds)), 60)
    return f"{minutes // 60}h{minutes % 60:02d}m{s:02d}s" if minutes >= 60 else f"{minutes}m{s:02d}s"


# --- 2. The command ---------------------------------------------------------------------------------------


def hardware() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"platform": platform.platform(), "python": platform.python_version(), "cpu": cpu, "cores": os.cpu_count(),
            "torch": torch.__version__, "gpu": gpu, "gpus": torch.cuda.device_count() if gpu else 0}


def command_line(config: ReproduceConfig) -> str:
    parts = ["critical-tokens reproduce", f"--preset {config.preset}", f"--out {config.out}"]
    parts += [f"--only {','.join(config.only)}"] if config.only else []
    parts += [f"--jobs {config.jobs}"] if config.jobs else []
    parts += [f"--seeds {config.seeds}"] if config.seeds else []
    parts += [f"--first-seed {config.first_seed}"] if config.first_seed is not None else []
    parts += [flag for flag, on in (("--pretrain", config.pretrain), ("--wandb", config.wandb)) if on]
    defaults = ReproduceConfig()
    parts += [f"--{name.replace('_', '-')} {getattr(config, name)}" for name in ("launcher", "ray_address", "slurm_partition", "slurm_minutes",
              "cpus_per_job", "gpus_per_job", "retries") if getattr(config, name) != getattr(defaults, name)]
    return " ".join(parts)


def reproduce(config: ReproduceConfig) -> Path:
    from .report import ReportConfig, report

    t0 = time.perf_counter()
    check_types(config)
    check_range(config, ("jobs", "seeds"), 0, 1000)  # 1000: far more than any machine or study, short of exhausting memory
    check_range(config, ("retries", "cpus_per_job", "gpus_per_job"), 0, 1000)
    check_range(config, ("slurm_minutes",), 1, 366 * 24 * 60)
    check_installed(config.launcher)
    root = Path(config.out)
    check_output(config.out, "--out", directory=True)
    if root.is_dir() and any(root.iterdir()) and run_kind(root) != "reproduction":
        raise UserError(f"--out {root} is {describe_kind(run_kind(root))}, not a reproduction; choose another --out")
    preset, source = load_preset(config.preset)
    if config.first_seed is not None and config.first_seed < 0:
        raise UserError(f"--first-seed must be >= 0, got {config.first_seed}")
    if config.seeds or config.first_seed is not None:
        preset = with_seeds(preset, config.seeds, config.first_seed)
    experiments = selected(config.only, preset)
    jobs, models = plan(preset, source, pretrain=config.pretrain)
    chosen = jobs_to_run(jobs, experiments)
    for job in chosen:
        if job.kind == "copy" and not (CHECKPOINTS_DIR / job.config["shipped"] / "model").is_dir() \
                and not (CHECKPOINTS_DIR / job.config["shipped"] / "config.json").exists():
            raise UserError(f"the shipped checkpoint {job.config['shipped']!r} is not in this package "
                            f"({CHECKPOINTS_DIR / job.config['shipped']}); pass --pretrain to pre-train it from scratch")
    status = {j.name: job_status(j, root) for j in chosen if j.same_as is None}
    n_jobs, gpus = default_jobs()
    if config.launcher != "local":  # the cluster's scheduler queues what it cannot start yet
        n_jobs, gpus = max(1, len(status)), 0
    n_jobs = config.jobs or n_jobs
    wandb = config.wandb and _wandb_available()

    root.mkdir(parents=True, exist_ok=True)
    write_json(root / "reproduce.json", {
        "command": command_line(config), **code_version(preset), "preset_name": preset.get("name", Path(source).stem), "preset_source": source,
        "options": asdict(config), "experiments_run": experiments, "parallel_jobs": n_jobs,
        "threads_per_job": threads_per_job(config, n_jobs), "preset": preset, "models": models,
        "jobs": [{k: v for k, v in asdict(j).items() if v is not None} for j in jobs],
    })
    counts = {s: sum(1 for v in status.values() if v == s) for s in ("done", "resume", "fresh")}
    print(f"reproduce {preset.get('name', source)}: {', '.join(experiments)}; {len(status)} runs "
          f"({counts['done']} done, {counts['resume']} to resume, {counts['fresh']} to run), "
          f"{n_jobs} in parallel" + (f" on {gpus} GPUs" if gpus else "") + (f" as {config.launcher} jobs" if config.launcher != "local" else "")
          + f"; logs in {root / 'logs'}")

    try:
        walls, failed = run_plan(chosen, status, root, n_jobs, gpus, wandb, config)
    except KeyboardInterrupt:  # the time spent still counts towards the reproduction's wall time
        _record_timing(root, config, time.perf_counter() - t0, {}, experiments, interrupted=True)
        raise
    if walls or failed:
        _record_timing(root, config, time.perf_counter() - t0, walls, experiments)
    report(ReportConfig(run=str(root)))
    if failed:
        shown = "; ".join(f"{name}: {why}" for name, why in list(failed.items())[:3])
        raise UserError(f"{len(failed)} run(s) failed ({shown}); their logs are in {root / 'logs'}; "
                        "run the same command again to retry them")
    return root


def _record_timing(root: Path, config: ReproduceConfig, wall: float, walls: dict, experiments: list[str], interrupted: bool = False) -> None:
    """OUT/timing.json: the hardware and every invocation that ran something (a resumed
    reproduction's wall time is the sum of its invocations)."""
    path = root / "timing.json"
    timing = read_json(path) if path.exists() else {"invocations": []}
    timing["hardware"] = hardware()
    timing["invocations"].append({"command": command_line(config), "git_commit": git_commit(), "finished": now(), "wall_s": round(wall, 1),
                                  "experiments": experiments, "runs": len(walls), "run_wall_s": round(sum(walls.values()), 1),
                                  **({"interrupted": True} if interrupted else {})})
    timing["wall_s"] = round(sum(i["wall_s"] for i in timing["invocations"]), 1)
    write_json(path, timing)


def code_version(preset: dict) -> dict:
    """The git commit of the code that runs (``-dirty`` if tracked files differ from it), and for a
    pre-registered study the commit that first added its pre-registration; None outside a checkout."""
    version = {"git_commit": git_commit()}
    document = preset["experiments"].get("confirm", {}).get("preregistration")
    if document:
        version["preregistration_commit"] = git_commit(document)
    return version


def _wandb_available() -> bool:
    try:
        import wandb  # noqa: F401
    except ImportError:
        print("--wandb: wandb is not installed (pip install 'critical-tokens[wandb]'); logging to TensorBoard only", file=sys.stderr)
        return False
    return True
