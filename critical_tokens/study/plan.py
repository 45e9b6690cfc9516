"""A study's plan: the jobs a preset makes, each with its fully resolved config (docs/method.md section 7).

`plan` turns a preset into jobs: one per model to pre-train (cached under ``OUT/pretrain/`` by a
hash of its config), per evaluation, per critical-token analysis and per RL run
(``OUT/<experiment>/<arm>/seed<k>/``), each with its fully resolved config. An RL run whose config
equals an earlier one (beta 0 of the sweep and the standard arm, say) runs once and is shared.
The arms of a pre-registered study that no hypothesis names run after the others (`design.Study`).
`selected` and `jobs_to_run` narrow the plan to the experiments of ``--only``. Running the jobs is
`jobs` (one job) and :mod:`critical_tokens.reproduce` (the whole plan).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from .. import checks, evaluate, pretrain as pretraining
from ..critical import command as critical_command
from ..critical.command import CriticalConfig
from ..evaluate import EvaluateConfig
from ..pretrain import PretrainConfig
from ..rl import config as rl_config
from ..rl.config import RLConfig
from ..runs import UserError
from .design import Arm, Study
from .preset_fields import EXPERIMENTS, model_fields, section_fields


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


# PretrainConfig fields added after reproductions were made, with their defaults: a model at the
# default has the directory (config hash) and the job config it had before the field existed.
LATER_FIELDS = {"compile": True, "max_minutes": None}


def model_dir_name(name: str, fields: dict, shipped: bool) -> str:
    """``<name>-<hash of the config>``: a model is pre-trained once per config and reused."""
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:8]
    return f"{name}-{digest}" + ("-shipped" if shipped else "")


def plan(preset: dict, where: str = "preset", pretrain: bool = False) -> tuple[list[Job], dict]:
    """All the jobs of a preset, in the order they should start, and the models' descriptions.
    Every config is built and checked by its command's own validation."""
    models, model_jobs = {}, {}
    for name, spec in preset["models"].items():
        model_config = PretrainConfig(**model_fields(preset, name, where))
        _checked(pretraining.validate, model_config, f"{where}: models.{name}")
        fields = asdict(model_config)
        for key in ("out", "device", "resume"):
            fields.pop(key)
        for key, default in LATER_FIELDS.items():  # at their default they leave the directory names as they were
            if fields[key] == default:
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
    study = Study.from_spec(experiments["confirm"], f"{where}: experiments.confirm") if "confirm" in experiments else None
    jobs: list[Job] = []
    for m in experiments.get("levels", {}).get("models", []):
        config = EvaluateConfig(run=models[m]["dir"], **section_fields(preset, "evaluate", {}, where))
        _checked(evaluate.validate, config, f"{where}: evaluate")
        jobs.append(Job(f"levels/{m}", "evaluate", "levels", f"levels/{m}", asdict(config), needs=f"pretrain/{m}", arm=m))
    for m in experiments.get("table1", {}).get("models", []):
        config = CriticalConfig(run=models[m]["dir"], **section_fields(preset, "critical", {}, where))
        _checked(critical_command.validate, config, f"{where}: critical")
        jobs.append(Job(f"table1/{m}", "critical", "table1", f"table1/{m}", asdict(config), needs=f"pretrain/{m}", arm=m))
    for experiment, arms in _rl_arms(experiments, study, where):
        spec = experiments[experiment]
        first = spec.get("first_seed", 0)
        # A study's arms that no hypothesis names (context, e.g. no KL) run after all the others: a
        # study stopped by the clock has its hypotheses' pairs complete at as many seeds as it could.
        tested = study.analysed_arms() if experiment == "confirm" else set()
        passes = [[a for a in arms if a[0].split("/")[-1] in tested], [a for a in arms if a[0].split("/")[-1] not in tested]] if tested else [arms]
        order = [(*a, seed) for part in passes for seed in range(first, first + spec["seeds"]) for a in part]  # seed-major: a
        # reproduction stopped early has every arm at (about) the same seeds
        for arm, model, overrides, seed in order:
            directory = f"{experiment}/{arm}/seed{seed}"
            fields = section_fields(preset, "rl", {**spec.get("rl", {}), **overrides}, f"{where}: experiments.{experiment}")
            config = RLConfig(**fields, pretrained=models[model]["dir"], out=directory, seed=seed)
            _checked(rl_config.validate, config, f"{where}: experiments.{experiment}, arm {arm}")
            jobs.append(Job(f"{experiment}/{arm}/seed{seed}", "rl", experiment, directory, asdict(config),
                            needs=f"pretrain/{model}", arm=arm, seed=seed))
    names = [j.name for j in jobs]
    for name in names:
        if names.count(name) > 1:
            raise UserError(f"{where}: two runs of the preset would both be {name} (the same arm or beta twice)")
    return list(model_jobs.values()) + _share_identical(jobs), models


def _checked(validate, config, where: str) -> None:
    """A command's own validation of a config the preset builds; its error says where in the preset."""
    try:
        validate(config)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None


def _rl_arms(experiments: dict, study: Study | None, where: str):
    """(experiment, [(arm, model, RLConfig overrides)]) of each RL experiment (``study``: the ``confirm`` one's)."""
    # rl_levels first: its run from the least trained model is the longest (its rollouts run to the
    # maximum length); started last, it would run alone at the end with the other cores idle.
    if "rl_levels" in experiments:
        spec = experiments["rl_levels"]
        yield "rl_levels", [(m, m, {}) for m in spec["models"]]
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
    if "kl_by_model" in experiments:
        spec = experiments["kl_by_model"]
        yield "kl_by_model", [(f"{m}/{name}", m, overrides) for m in spec["models"] for name, overrides in _kl_arms(spec, "kl_by_model", where)]
    if study is not None:
        yield "confirm", [(f"{m}/{arm.name}", m, _for_model(arm.overrides, m, f"{where}: experiments.confirm arm {arm.name}"))
                          for m in study.instances for arm in study.arms]


def _for_model(overrides: dict, model: str, where: str) -> dict:
    """An arm's overrides for one model: ``kl_coef_by_model`` ({model: coefficient}, a strength matched
    per model instance, fixed in a pre-registration) becomes that model's ``kl_coef``."""
    by_model = overrides.get("kl_coef_by_model")
    if by_model is None:
        return overrides
    if "kl_coef" in overrides:
        raise UserError(f"{where}: give kl_coef or kl_coef_by_model, not both")
    if not isinstance(by_model, dict) or model not in by_model:
        raise UserError(f"{where}: kl_coef_by_model must give a coefficient for every model of the study (missing {model!r})")
    rest = {k: v for k, v in overrides.items() if k != "kl_coef_by_model"}
    return {**rest, "kl_coef": by_model[model]}


def _kl_arms(spec: dict, experiment: str, where: str) -> list[tuple[str, dict]]:
    """(name, RLConfig overrides) of each arm of a KL comparison."""
    return [(arm.name, arm.overrides) for arm in Arm.parse_all(spec["arms"], f"{where}: experiments.{experiment}")]


def _beta_text(beta: Any, where: str) -> str:
    try:
        return format(checks.parse_beta("beta", beta), "g")
    except UserError as e:
        raise UserError(f"{where}: experiments.beta_sweep: {e}") from None


def comparable(config: dict) -> dict:
    """A job's config as it decides the results: paths by their last part, no device or resume."""
    out = {k: v for k, v in config.items() if k not in ("out", "device", "resume")}
    for key in ("pretrained", "run", "init_from"):  # a worker writes them under OUT, the plan relative to it
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

