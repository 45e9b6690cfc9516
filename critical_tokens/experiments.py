"""Reproduce the paper in one command: presets, the plan of runs, and running it (SPEC section 7).

A preset (``presets/<name>.json``, or any JSON file of the same shape) fixes every hyper-parameter:

- ``models``: name -> `PretrainConfig` fields. ``{"shipped": "tiny-n4", ...fields}`` means the
  checkpoint shipped in the package at ``critical_tokens/checkpoints/tiny-n4/`` (the fields say how
  it was made, so that ``--pretrain`` can redo it from scratch);
- ``evaluate``: `EvaluateConfig` fields (tables 4-5); ``critical``: `CriticalConfig` fields (table 1);
- ``rl``: the `RLConfig` fields every RL run shares;
- ``experiments``, each optional (leave one out and it is "not run"):
  - ``levels`` (figure 2, tables 4-5): ``{"models": [...]}``, each evaluated on N..N+3 digits;
  - ``table1``: ``{"models": [...]}``, the certainty gap of critical tokens of each model;
  - ``kl_comparison`` (figure 4): ``{"model", "seeds", "rl": {overrides}, "arms": [{"name", ...overrides}]}``;
  - ``beta_sweep`` (figure 6): ``{"model", "seeds", "rl", "betas": [0, 10, ..., "auto"]}``, beta 0
    being the standard KL penalty (w = c^0 = 1, as in the paper's figure);
  - ``rl_levels`` (figure 3): ``{"models", "seeds", "rl"}``, one arm per pre-trained model;
  - ``tracked_tokens`` (figures 4 right and 7): ``{}``, read from the kl_comparison runs;
  - ``kl_by_model`` (beyond the paper): ``{"models", "seeds", "rl", "arms"}``, the arms of figure 4
    from each of several models (e.g. pre-trained with different N+1 doses): how the gain of the
    prioritized KL depends on where RL starts. Its runs are ``OUT/kl_by_model/<model>/<arm>/seed<k>/``.
  Every experiment may carry a ``"notes"`` string; so may the preset.

`plan` turns a preset into jobs: one per model to pre-train (cached under ``OUT/pretrain/`` by a
hash of its config), per evaluation, per critical-token analysis and per RL run
(``OUT/<experiment>/<arm>/seed<k>/``), each with its fully resolved config. An RL run whose config
equals an earlier one (beta 0 of the sweep and the standard arm, say) runs once and is shared.
`run_plan` executes the jobs in parallel, in worker processes here, as Ray tasks or as SLURM jobs
(:mod:`critical_tokens.launchers`); a finished job (``DONE.json``) is skipped, an interrupted one
resumed from its checkpoint, a failed one retried a bounded number of times. The report is built
from the files by :mod:`critical_tokens.report`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import re
import shutil
import sys
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, wait
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from .config import arg, check_range, check_types
from .critical import CriticalConfig
from .evaluate import EvaluateConfig
from .launchers import LocalLauncher, RayLauncher, SlurmLauncher, check_installed
from .preset_fields import SECTIONS, section_fields, typed_fields
from .pretrain import PretrainConfig
from .rl import RLConfig
from .runs import UserError, check_output, describe_kind, read_json, run_kind, write_json

PRESETS_DIR = Path(__file__).parent / "presets"
CHECKPOINTS_DIR = Path(__file__).parent / "checkpoints"
EXPERIMENTS = ("levels", "table1", "kl_comparison", "beta_sweep", "rl_levels", "tracked_tokens", "kl_by_model")
DONE = "DONE.json"  # written in a job's directory when it has finished

# What each experiment may hold besides "notes", and the fields reproduce sets itself.
EXPERIMENT_KEYS = {
    "levels": {"models"},
    "table1": {"models"},
    "kl_comparison": {"model", "seeds", "rl", "arms"},
    "beta_sweep": {"model", "seeds", "rl", "betas"},
    "rl_levels": {"models", "seeds", "rl"},
    "tracked_tokens": set(),
    "kl_by_model": {"models", "seeds", "rl", "arms"},
}
PATH_FIELDS = ("out", "pretrained", "run", "init_from")  # relative to OUT in a job's config
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


@dataclass(frozen=True)
class ReproduceConfig:
    preset: str = arg("cpu", "smoke (tests, a minute), cpu (2 cores), paper (one GPU, the paper's scale), or the path of a preset JSON file")
    out: str = arg("runs/reproduce", "directory of the reproduction: every run, REPORT.md, plots/")
    only: tuple[str, ...] = arg((), "run only these experiments (names or a comma list): " + ", ".join(EXPERIMENTS), metavar="EXPERIMENT")
    jobs: int = arg(0, "runs in parallel (0: one per GPU, or one per CPU core without a GPU)")
    pretrain: bool = arg(False, "pre-train from scratch even the models the package ships a checkpoint for")
    seeds: int = arg(0, "seeds per experiment (0: the preset's)")
    wandb: bool = arg(False, "also log every finished run to Weights & Biases (offline unless WANDB_API_KEY is set), if wandb is installed")
    launcher: Literal["local", "ray", "slurm"] = arg("local", "where the runs run: worker processes here, Ray tasks (pip install 'critical-tokens[ray]'), or SLURM jobs through submitit ('critical-tokens[slurm]'); --out must be on a file system every node sees")
    retries: int = arg(2, "times a failed run is started again (from its last checkpoint); a problem with its input is not retried")
    cpus_per_job: int = arg(0, "CPU cores (torch threads) per run; 0: local: this machine's cores over --jobs; ray, slurm: 1")
    gpus_per_job: int = arg(0, "ray, slurm: GPUs per run (local: one per worker when this machine has GPUs)")
    ray_address: str | None = arg(None, "ray: the address of a running Ray cluster ('auto': the one this node belongs to); default: a local Ray instance")
    slurm_partition: str | None = arg(None, "slurm: the partition to submit to (default: the cluster's)")
    slurm_minutes: int = arg(24 * 60, "slurm: time limit of each run's job, in minutes (a run cut short is retried from its last checkpoint)")


# --- 1. Presets ---------------------------------------------------------------------------------------


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.json"))


def load_preset(name_or_path: str) -> tuple[dict, str]:
    """(preset, where it came from), checked: every key is a known section, experiment or config
    field, every value has its field's type and passes the command's own validation."""
    path = PRESETS_DIR / f"{name_or_path}.json"
    if not path.exists():
        path = Path(name_or_path)
        if path.suffix != ".json" or not path.is_file():
            raise UserError(f"unknown preset {name_or_path!r}: choose {', '.join(preset_names())}, or give the path of a preset JSON file")
    preset = read_json(path)
    check_preset(preset, str(path))
    return preset, str(path)


def check_preset(preset: dict, where: str) -> None:
    if not isinstance(preset, dict):
        raise UserError(f"{where}: a preset is a JSON object")
    _check_keys(preset, {"name", "description", "notes", *SECTIONS, "experiments"}, where)
    for key in ("models", "experiments"):
        if not isinstance(preset.get(key), dict) or not preset[key]:
            raise UserError(f"{where}: '{key}' must be a non-empty object")
    for name, fields in preset["models"].items():
        _check_name(name, f"{where}: model")
        model_fields(preset, name, where)
    for section in ("evaluate", "critical", "rl"):
        section_fields(preset, section, {}, where)
    for experiment, spec in preset["experiments"].items():
        if experiment not in EXPERIMENT_KEYS:
            raise UserError(f"{where}: unknown experiment {experiment!r}; choose from {', '.join(EXPERIMENTS)}")
        here = f"{where}: experiments.{experiment}"
        _check_keys(spec, EXPERIMENT_KEYS[experiment] | {"notes"}, here)
        for model in spec.get("models", []) + ([spec["model"]] if "model" in spec else []):
            if model not in preset["models"]:
                raise UserError(f"{here}: no model {model!r} in 'models' ({', '.join(preset['models'])})")
        missing = EXPERIMENT_KEYS[experiment] - {"rl"} - set(spec)
        if missing:
            raise UserError(f"{here}: missing {', '.join(sorted(missing))}")
        if "seeds" in spec and (not isinstance(spec["seeds"], int) or spec["seeds"] < 1):
            raise UserError(f"{here}: 'seeds' must be a positive integer")
    if "tracked_tokens" in preset["experiments"] and "kl_comparison" not in preset["experiments"]:
        raise UserError(f"{where}: tracked_tokens reads the kl_comparison runs; add a kl_comparison experiment")
    plan(preset, where)  # builds every config: a bad value fails here, not an hour into the run


def model_fields(preset: dict, name: str, where: str = "preset") -> dict:
    fields = dict(preset["models"][name])
    shipped = fields.pop("shipped", None)
    if shipped is not None and not (isinstance(shipped, str) and NAME.match(shipped)):
        raise UserError(f"{where}: models.{name}.shipped must be the name of a directory in {CHECKPOINTS_DIR}")
    return typed_fields(PretrainConfig, fields, SECTIONS["models"][1], f"{where}: models.{name}")


def _check_keys(obj: Any, allowed: set, where: str) -> None:
    if not isinstance(obj, dict):
        raise UserError(f"{where} must be a JSON object")
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise UserError(f"{where}: unknown key {unknown[0]!r}; expected {', '.join(sorted(allowed))}")


def _check_name(name: Any, where: str) -> None:
    if not isinstance(name, str) or not NAME.match(name):
        raise UserError(f"{where} name {name!r} must be letters, digits, '_', '.', '+' or '-' (it names a directory)")


def with_seeds(preset: dict, seeds: int) -> dict:
    """The preset with every experiment's seed count replaced (``--seeds``)."""
    preset = json.loads(json.dumps(preset))
    for spec in preset["experiments"].values():
        if "seeds" in spec:
            spec["seeds"] = seeds
    return preset


# --- 2. The plan: one job per directory -----------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """One unit of work with its own directory (relative to OUT) and its command's whole config."""

    name: str  # "pretrain/n4", "levels/n4", "kl_comparison/standard/seed0", ...
    kind: Literal["pretrain", "copy", "evaluate", "critical", "rl"]
    experiment: str
    dir: str
    config: dict = field(hash=False)
    needs: str | None = None  # the job that makes the model this one reads
    arm: str | None = None
    seed: int | None = None
    same_as: str | None = None  # an identical RL job of another experiment: its results are shared
    same_as_dir: str | None = None


def model_dir_name(name: str, fields: dict, shipped: bool) -> str:
    """``<name>-<hash of the config>``: a model is pre-trained once per config and reused."""
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:8]
    return f"{name}-{digest}" + ("-shipped" if shipped else "")


def plan(preset: dict, where: str = "preset", pretrain: bool = False) -> tuple[list[Job], dict]:
    """All the jobs of a preset, in the order they should start, and the models' descriptions.
    Every config is built and checked by its command's own validation."""
    from . import critical, evaluate, pretrain as pretraining, rl

    models, model_jobs = {}, {}
    for name, spec in preset["models"].items():
        model_config = PretrainConfig(**model_fields(preset, name, where))
        pretraining.validate(model_config)
        fields = asdict(model_config)
        for key in ("out", "device", "resume"):
            fields.pop(key)
        shipped = spec.get("shipped") if not pretrain else None
        directory = f"pretrain/{model_dir_name(name, fields, shipped is not None)}"
        # Continued pre-training: ``init_from`` names an earlier model of the preset.
        parent = fields.get("init_from")
        if parent is not None and parent not in models:
            raise UserError(f"{where}: models.{name}.init_from must name a model listed before it, got {parent!r}")
        if shipped:
            job = Job(f"pretrain/{name}", "copy", "pretrain", directory, {"shipped": shipped, **fields})
        else:
            if parent is not None:
                fields = {**fields, "init_from": models[parent]["dir"]}
            job = Job(f"pretrain/{name}", "pretrain", "pretrain", directory, asdict(PretrainConfig(**fields, out=directory)),
                      needs=None if parent is None else f"pretrain/{parent}")
        models[name] = {"dir": directory, "shipped": shipped, "init": fields["init"], "config": fields}
        model_jobs[name] = job

    experiments = preset["experiments"]
    jobs: list[Job] = []
    for m in experiments.get("levels", {}).get("models", []):
        config = EvaluateConfig(run=models[m]["dir"], **section_fields(preset, "evaluate", {}, where))
        evaluate.validate(config)
        jobs.append(Job(f"levels/{m}", "evaluate", "levels", f"levels/{m}", asdict(config), needs=f"pretrain/{m}", arm=m))
    for m in experiments.get("table1", {}).get("models", []):
        config = CriticalConfig(run=models[m]["dir"], **section_fields(preset, "critical", {}, where))
        critical.validate(config)
        jobs.append(Job(f"table1/{m}", "critical", "table1", f"table1/{m}", asdict(config), needs=f"pretrain/{m}", arm=m))
    for experiment, arms in _rl_arms(experiments, where):
        spec = experiments[experiment]
        for seed in range(spec["seeds"]):  # seed-major: a reproduction stopped early has every arm at (about) the same seeds
            for arm, model, overrides in arms:
                directory = f"{experiment}/{arm}/seed{seed}"
                fields = section_fields(preset, "rl", {**spec.get("rl", {}), **overrides}, f"{where}: experiments.{experiment}")
                config = RLConfig(**fields, pretrained=models[model]["dir"], out=directory, seed=seed)
                rl.validate(config)
                jobs.append(Job(f"{experiment}/{arm}/seed{seed}", "rl", experiment, directory, asdict(config),
                                needs=f"pretrain/{model}", arm=arm, seed=seed))
    names = [j.name for j in jobs]
    for name in names:
        if names.count(name) > 1:
            raise UserError(f"{where}: two runs of the preset would both be {name} (the same arm or beta twice)")
    return list(model_jobs.values()) + _share_identical(jobs), models


def _rl_arms(experiments: dict, where: str):
    """(experiment, [(arm, model, RLConfig overrides)]) of each RL experiment."""
    if "kl_comparison" in experiments:
        spec = experiments["kl_comparison"]
        yield "kl_comparison", [(name, spec["model"], overrides) for name, overrides in _kl_arms(spec, "kl_comparison", where)]
    if "beta_sweep" in experiments:
        spec = experiments["beta_sweep"]
        arms = []
        for beta in spec["betas"]:
            text = beta if beta == "auto" else _beta_text(beta, where)
            if text == "0":  # w = c^0 = 1: the standard KL penalty, as the paper's figure 6 labels it
                arms.append(("beta0", spec["model"], {"kl": "standard"}))
            else:
                arms.append((f"beta-{text}" if text == "auto" else f"beta{text}", spec["model"], {"kl": "prioritized", "beta": text}))
        yield "beta_sweep", arms
    if "rl_levels" in experiments:
        spec = experiments["rl_levels"]
        yield "rl_levels", [(m, m, {}) for m in spec["models"]]
    if "kl_by_model" in experiments:
        spec = experiments["kl_by_model"]
        yield "kl_by_model", [(f"{m}/{name}", m, overrides) for m in spec["models"] for name, overrides in _kl_arms(spec, "kl_by_model", where)]


def _kl_arms(spec: dict, experiment: str, where: str) -> list[tuple[str, dict]]:
    """(name, RLConfig overrides) of each arm of a KL comparison."""
    arms = []
    for arm in spec["arms"]:
        if not isinstance(arm, dict):
            raise UserError(f"{where}: experiments.{experiment}: each arm is an object with a name and RLConfig fields")
        _check_name(arm.get("name"), f"{where}: experiments.{experiment} arm")
        arms.append((arm["name"], {k: v for k, v in arm.items() if k != "name"}))
    return arms


def _beta_text(beta: Any, where: str) -> str:
    try:
        value = float(beta)
    except (TypeError, ValueError):
        raise UserError(f"{where}: experiments.beta_sweep: beta {beta!r} is not a number or 'auto'") from None
    if value < 0:
        raise UserError(f"{where}: experiments.beta_sweep: beta must be >= 0, got {beta}")
    return format(value, "g")


def comparable(config: dict) -> dict:
    """A job's config as it decides the results: paths by their last part, no device or resume."""
    out = {k: v for k, v in config.items() if k not in ("out", "device", "resume")}
    for key in ("pretrained", "run"):
        if out.get(key):
            out[key] = Path(out[key]).name
    return out


def _share_identical(jobs: list[Job]) -> list[Job]:
    """An RL job identical to an earlier one (in everything but its directory) reads that one's results."""
    first: dict[str, Job] = {}
    out = []
    for job in jobs:
        key = json.dumps(comparable(job.config), sort_keys=True) if job.kind == "rl" else job.name
        if key in first:
            job = dataclasses.replace(job, same_as=first[key].name, same_as_dir=first[key].dir)
        else:
            first[key] = job
        out.append(job)
    return out


def selected(only: tuple[str, ...], preset: dict) -> list[str]:
    """The experiments to run: ``--only`` (names or comma lists, '-' for '_'), or all the preset's."""
    names = [n.strip().replace("-", "_") for item in only for n in item.split(",") if n.strip()]
    for n in names:
        if n not in EXPERIMENTS:
            raise UserError(f"--only: unknown experiment {n!r}; choose from {', '.join(EXPERIMENTS)}")
        if n not in preset["experiments"]:
            raise UserError(f"--only: the preset has no {n} experiment (it has {', '.join(preset['experiments'])})")
    chosen = names or list(preset["experiments"])
    if "tracked_tokens" in chosen and "kl_comparison" not in chosen:
        chosen.append("kl_comparison")  # figure 7 is read from the kl_comparison runs
    return [e for e in EXPERIMENTS if e in chosen]


def jobs_to_run(jobs: list[Job], experiments: list[str]) -> list[Job]:
    """The jobs of the chosen experiments, the jobs they share results with, and their models."""
    by_name = {j.name: j for j in jobs}
    chosen = [j for j in jobs if j.experiment in experiments]
    chosen += [by_name[j.same_as] for j in chosen if j.same_as]
    names = {j.name for j in chosen}
    while True:  # the models they read, and the models those are continued from
        needed = {j.needs for j in jobs if j.name in names and j.needs} - names
        if not needed:
            break
        names |= needed
    return [j for j in jobs if j.name in names]


# --- 3. Where each job stands, and running one ------------------------------------------------------------


def job_status(job: Job, root: Path) -> Literal["done", "resume", "fresh"]:
    """done: DONE.json with the same config; resume: a checkpoint of an interrupted run; fresh: start
    over. A directory made with other hyper-parameters is a UserError (never silently mixed)."""
    directory = root / job.dir
    if (directory / DONE).exists():
        _check_same(job, read_json(directory / DONE)["config"], directory / DONE)
        return "done"
    if job.kind in ("pretrain", "rl") and (directory / "config.json").exists():
        _check_same(job, read_json(directory / "config.json")["config"], directory / "config.json")
        if (directory / "model" / "trainer_state.pt").exists():
            return "resume"
    return "fresh"


JOB_CONFIGS = {"pretrain": PretrainConfig, "rl": RLConfig, "evaluate": EvaluateConfig, "critical": CriticalConfig}


def _check_same(job: Job, saved: dict, path: Path) -> None:
    want, have = comparable(job.config), comparable(saved)
    # A field added to the command after the run was made is no difference while it keeps its default
    # (the run behaved as the default does).
    config_class = JOB_CONFIGS.get(job.kind)
    defaults = {f.name: f.default for f in dataclasses.fields(config_class)} if config_class else {}
    want = {k: v for k, v in want.items() if k in have or k not in defaults or v != defaults[k]}
    if want != have:
        diff = [k for k in sorted(set(want) | set(have)) if want.get(k) != have.get(k)]
        shown = ", ".join(f"{k}: {have.get(k)!r} there, {want.get(k)!r} now" for k in diff[:3])
        raise UserError(f"{path} was made with other hyper-parameters ({shown}); choose another --out or delete {path.parent}")


def _absolute(config: dict, root: Path) -> dict:
    return {k: (str(root / v) if k in PATH_FIELDS and isinstance(v, str) else v) for k, v in config.items()}


def _run_pretrain(job: Job, root: Path, resume: bool) -> None:
    from .pretrain import pretrain

    pretrain(dataclasses.replace(PretrainConfig(**_absolute(job.config, root)), resume=resume))


def _run_copy(job: Job, root: Path, resume: bool) -> None:
    from .runs import atomic_dir

    source = CHECKPOINTS_DIR / job.config["shipped"]
    with atomic_dir(root / job.dir) as tmp:
        shutil.copytree(source, tmp, dirs_exist_ok=True)
    print(f"copied the shipped checkpoint {source} to {root / job.dir}")


def _run_evaluate(job: Job, root: Path, resume: bool) -> None:
    from .evaluate import evaluate_model, table_markdown
    from .model import load_pretrained, pick_device
    from .runs import atomic_write_text

    config = EvaluateConfig(**_absolute(job.config, root))
    model, tokenizer, n_digits = load_pretrained(config.run, config.n_digits)
    model.to(pick_device("auto"))
    result = evaluate_model(model, tokenizer, n_digits, config)
    write_json(root / job.dir / "table.json", {"model": job.arm, **result})
    atomic_write_text(root / job.dir / "table.md", table_markdown(result) + "\n")


def _run_critical(job: Job, root: Path, resume: bool) -> None:
    from .critical import critical

    config = CriticalConfig(**_absolute(job.config, root))
    critical(config)  # writes RUN/critical/report.json beside the model; the experiment keeps a copy
    (root / job.dir).mkdir(parents=True, exist_ok=True)
    for name in ("report.json", "report.md"):
        shutil.copyfile(Path(config.run) / "critical" / name, root / job.dir / name)


def _run_rl(job: Job, root: Path, resume: bool) -> None:
    from .rl import train

    train(dataclasses.replace(RLConfig(**_absolute(job.config, root)), resume=resume))


RUNNERS = {"pretrain": _run_pretrain, "copy": _run_copy, "evaluate": _run_evaluate, "critical": _run_critical, "rl": _run_rl}


def log_path(root: Path, job: Job) -> Path:
    return root / "logs" / (job.name.replace("/", "__") + ".log")


@contextmanager
def _output_to(path: Path):
    """Sends this process's stdout and stderr (file descriptors included) to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush(), sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "a") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            os.dup2(saved[0], 1), os.dup2(saved[1], 2)
            os.close(saved[0]), os.close(saved[1])


def execute(job: Job, root: str, resume: bool, wandb: bool) -> float:
    """Runs one job in a worker process, its output in OUT/logs/; returns its wall time in seconds."""
    from .report import log_wandb, write_tensorboard

    root = Path(root)
    directory = root / job.dir
    t0 = time.perf_counter()
    with _output_to(log_path(root, job)):
        print(f"\n=== {job.name} ({'resumed' if resume else 'started'} {_now()}) ===", flush=True)
        try:
            if not resume and job.kind in ("pretrain", "rl") and directory.exists():
                shutil.rmtree(directory)  # a run interrupted before its first checkpoint starts over
            RUNNERS[job.kind](job, root, resume)
            if job.kind in ("pretrain", "rl"):
                write_tensorboard(directory)
                if wandb:
                    log_wandb(directory, name=job.name, group=job.experiment, config=job.config)
        except BaseException:
            traceback.print_exc()
            raise
    wall = time.perf_counter() - t0
    write_json(directory / DONE, {"job": job.name, "config": job.config, "wall_s": round(wall, 2), "resumed": resume, "finished": _now()})
    return wall


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# --- 4. Running the plan in parallel ---------------------------------------------------------------------


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
    """The launcher of ``--launcher`` (launchers.py): where the jobs run."""
    if config.launcher == "ray":
        return RayLauncher(execute, config.ray_address, threads, config.gpus_per_job)
    if config.launcher == "slurm":
        return SlurmLauncher(execute, str((root / "submitit").resolve()), n_jobs, threads, config.gpus_per_job,
                             config.slurm_partition, config.slurm_minutes)
    return LocalLauncher(execute, n_jobs, gpus, threads)


def run_plan(jobs: list[Job], status: dict[str, str], root: Path, n_jobs: int, gpus: int, wandb: bool,
             config: ReproduceConfig = ReproduceConfig()) -> tuple[dict, dict]:
    """Runs every job not done, up to ``n_jobs`` at a time, a job once the model it reads is ready,
    where ``config.launcher`` says; a failed job is started again up to ``config.retries`` times.
    -> ({name: wall seconds} of the jobs run, {name: error} of the failed ones)."""
    from tqdm.auto import tqdm

    runnable = [j for j in jobs if j.same_as is None]
    todo = [j for j in runnable if status[j.name] != "done"]
    finished = {j.name for j in runnable if status[j.name] == "done"}
    walls: dict[str, float] = {}
    failed: dict[str, str] = {}
    if not todo:
        return walls, failed
    threads = threads_per_job(config, n_jobs)
    where = str(root) if config.launcher == "local" else str(root.resolve())  # a remote worker's directory is not ours
    attempts: dict[str, int] = {}
    interactive = sys.stderr.isatty()
    overall = tqdm(total=len(runnable), initial=len(finished), desc="reproduce", unit="run", position=0,
                   dynamic_ncols=True, smoothing=0, disable=not interactive)
    slots: list[Any] = [None] * n_jobs  # per-run bars, one line per worker, fed from the runs' files
    running: dict[Any, tuple[Job, int]] = {}
    t0, ended = time.perf_counter(), 0

    def announce(text: str, job: Job, ran: bool = True) -> None:
        nonlocal ended
        ended += ran and job.kind != "copy"  # copying a shipped checkpoint (or skipping) takes no time: not a run to average
        overall.update(1)
        if interactive:
            overall.write(text)
        else:  # a log file: one plain line per run, with the count and an estimate of the time left
            elapsed = time.perf_counter() - t0
            left = sum(j.kind != "copy" for j in [*todo, *(j for j, _ in running.values())])
            eta = "no run left" if not left else f"about {_duration(elapsed / ended * left)} left" if ended else "time left: known after the first run"
            print(f"[{len(finished) + len(failed)}/{len(runnable)}] {text}; elapsed {_duration(elapsed)}, {eta}", flush=True)

    pool = start_launcher(config, root, n_jobs, gpus, threads)
    try:
        while todo or running:
            for job in list(todo):
                if len(running) >= n_jobs:
                    break
                if job.needs in failed:
                    todo.remove(job)
                    failed[job.name] = f"its model {job.needs} failed"
                    announce(f"skipped {job.name}: {failed[job.name]}", job, ran=False)
                elif job.needs is None or job.needs in finished:
                    todo.remove(job)
                    slot = next(i for i, bar in enumerate(slots) if bar is None)
                    slots[slot] = tqdm(desc=job.name, position=slot + 1, leave=False, dynamic_ncols=True, disable=not interactive,
                                       unit={"rl": "ep", "pretrain": "step"}.get(job.kind, "it"))
                    future = pool.submit(job, where, status[job.name] == "resume", wandb)
                    running[future] = (job, slot)
            if not running:
                continue
            done, _ = wait(list(running), timeout=1.0, return_when=FIRST_COMPLETED)
            for future in done:
                job, slot = running.pop(future)
                slots[slot].close()
                slots[slot] = None
                try:
                    outcome = future.result()
                except Exception as e:  # noqa: BLE001 - the worker itself died (killed, lost node): one failed run must not stop the others
                    outcome = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", "retry": True}
                if "wall_s" in outcome:
                    walls[job.name] = outcome["wall_s"]
                    finished.add(job.name)
                    announce(f"done   {job.name} in {_duration(walls[job.name])}", job)
                elif outcome["retry"] and attempts.get(job.name, 0) < config.retries:
                    attempts[job.name] = attempts.get(job.name, 0) + 1
                    status[job.name] = job_status(job, root)  # from its last checkpoint, if it made one
                    todo.insert(0, job)
                    (overall.write if interactive else print)(
                        f"retrying {job.name} ({attempts[job.name]}/{config.retries}, {'resumed' if status[job.name] == 'resume' else 'from the start'}): "
                        f"it failed with {outcome['error']} (log: {log_path(root, job)})")
                else:
                    tries = f" after {attempts[job.name] + 1} attempts" if job.name in attempts else ""
                    failed[job.name] = outcome["error"]
                    announce(f"FAILED {job.name}{tries}: {failed[job.name]} (log: {log_path(root, job)})", job)
            for job, slot in running.values():
                progress = _progress(job, root) if interactive else None
                if progress:
                    slots[slot].total, slots[slot].n = progress[1], progress[0]
                    slots[slot].refresh()
    except KeyboardInterrupt:
        overall.write("interrupted: finished runs are kept and the others resume from their last checkpoint; run the same command again")
        pool.shutdown(cancel=True)
        raise
    finally:
        for bar in slots:
            if bar is not None:
                bar.close()
        overall.close()
    pool.shutdown()
    return walls, failed


def threads_per_job(config: ReproduceConfig, n_jobs: int) -> int:
    if config.cpus_per_job:
        return config.cpus_per_job
    return max(1, (os.cpu_count() or 1) // n_jobs) if config.launcher == "local" else 1


def _duration(seconds: float) -> str:
    minutes, s = divmod(int(round(seconds)), 60)
    return f"{minutes // 60}h{minutes % 60:02d}m{s:02d}s" if minutes >= 60 else f"{minutes}m{s:02d}s"


# --- 5. The command ---------------------------------------------------------------------------------------


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
    if config.seeds:
        preset = with_seeds(preset, config.seeds)
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
        "command": command_line(config), "preset_name": preset.get("name", Path(source).stem), "preset_source": source,
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
    timing["invocations"].append({"command": command_line(config), "finished": _now(), "wall_s": round(wall, 1),
                                  "experiments": experiments, "runs": len(walls), "run_wall_s": round(sum(walls.values()), 1),
                                  **({"interrupted": True} if interrupted else {})})
    timing["wall_s"] = round(sum(i["wall_s"] for i in timing["invocations"]), 1)
    write_json(path, timing)


def _wandb_available() -> bool:
    try:
        import wandb  # noqa: F401
    except ImportError:
        print("--wandb: wandb is not installed (pip install 'critical-tokens[wandb]'); logging to TensorBoard only", file=sys.stderr)
        return False
    return True
