"""A study's preset: the JSON that fixes every hyper-parameter of a study, loaded and checked (docs/method.md section 7).

A preset (``study/presets/<name>.json``, or any JSON file of the same shape) fixes every hyper-parameter:

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
  - ``kl_by_model`` (beyond the paper): ``{"models", "seeds", "first_seed", "rl", "arms"}``, the arms of figure 4
    from each of several models (e.g. pre-trained with different N+1 doses): how the gain of the
    prioritized KL depends on where RL starts. Its runs are ``OUT/kl_by_model/<model>/<arm>/seed<k>/``.
  - ``confirm`` (a pre-registered study): ``{"models", "seeds", "first_seed", "rl", "arms",
    "hypotheses", "alpha", "preregistration", "decision", "title"}``: the arms from each model
    instance at the seeds ``first_seed .. first_seed + seeds - 1``, the same seeds in every arm
    (paired), and the hypotheses the report tests on them (a `design.Study`, tested by
    `report.paired`): each ``{"name", "arm",
    "versus", "metric", "margin", "role"}`` and optionally ``"direction"`` ("higher", the default,
    or "lower": the arm is better where the metric, e.g. a KL, is lower; the test is then on
    versus - arm) and ``"group"``. ``metric`` is a ``final/...`` key; ``margin`` is in its units
    (0.03: 3 points of accuracy). Roles: "primary", "control", "safety", "comparison",
    "superiority" (one-sided paired t-test of difference > margin, margin >= 0) and "equivalence"
    (TOST: |difference| < margin, margin > 0); Holm's correction runs over all of them.
    ``decision`` is the rule: "confirm" (one primary hypothesis, its controls and safety:
    `report.paired.decide`), "per-arm" (a verdict for each arm with a primary hypothesis, from it and
    that arm's safety hypothesis: `report.paired.decide_per_arm`) or "placement" (a verdict per group of
    "superiority", "equivalence" and "comparison" hypotheses: `report.paired.decide_placement`), which
    needs ``"placement": {"baseline": arm, "metric": "final/...", "groups": [{"name", "prioritized",
    "matched"}]}`` (each hypothesis's ``group`` names one, and compares its two arms; the share
    (P - M) / (P - baseline) on ``metric`` is reported per group). ``analysis`` is the one the
    decision reads: "pooled" (default: the (instance, seed) units) or "instances" (the per-instance
    means); both are reported. ``title`` heads its report section. Its runs are
    ``OUT/confirm/<model>/<arm>/seed<k>/``; ``preregistration`` is the path (in the repository) of
    the document that fixed the study before it ran.
  Every experiment may carry a ``"notes"`` string; so may the preset.

`load_preset` reads and checks one; `check_preset` builds its whole plan (`plan.plan`), so that a bad
value fails when the preset loads, not an hour into the study; `with_seeds` applies ``--seeds`` and ``--first-seed``.
"""

from __future__ import annotations

import copy
from pathlib import Path

from ..runs import UserError, read_json
from .design import check_study
from .plan import plan
from .preset_fields import EXPERIMENT_KEYS, EXPERIMENTS, OPTIONAL_KEYS, SECTIONS, check_keys, check_name, model_fields, section_fields

PRESETS_DIR = Path(__file__).parent / "presets"


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.json"))


def load_preset(name_or_path: str) -> tuple[dict, str]:
    """(preset, where it came from), checked: every key is a known section, experiment or config
    field, every value has its field's type and passes the command's own validation."""
    path = PRESETS_DIR / f"{name_or_path}.json"
    if not path.exists():
        path = Path(name_or_path)
        if path.suffix != ".json" and path.parent == Path("."):  # a name, not a path
            raise UserError(f"unknown preset {name_or_path!r}: choose {', '.join(preset_names())}, or give the path of a preset JSON file")
        if not path.is_file():
            raise UserError(f"preset file {path} {'is not a file' if path.exists() else 'does not exist'}")
    preset = read_json(path)
    check_preset(preset, str(path))
    return preset, str(path)


def check_preset(preset: dict, where: str) -> None:
    if not isinstance(preset, dict):
        raise UserError(f"{where}: a preset is a JSON object")
    check_keys(preset, {"name", "description", "notes", *SECTIONS, "experiments"}, where)
    for key in ("models", "experiments"):
        if not isinstance(preset.get(key), dict) or not preset[key]:
            raise UserError(f"{where}: '{key}' must be a non-empty object")
    for name in preset["models"]:
        check_name(name, f"{where}: model")
        model_fields(preset, name, where)
    for section in ("evaluate", "critical", "rl"):
        section_fields(preset, section, {}, where)
    for experiment, spec in preset["experiments"].items():
        if experiment not in EXPERIMENT_KEYS:
            raise UserError(f"{where}: unknown experiment {experiment!r}; choose from {', '.join(EXPERIMENTS)}")
        here = f"{where}: experiments.{experiment}"
        check_keys(spec, EXPERIMENT_KEYS[experiment] | {"notes"}, here)
        for model in spec.get("models", []) + ([spec["model"]] if "model" in spec else []):
            if model not in preset["models"]:
                raise UserError(f"{here}: no model {model!r} in 'models' ({', '.join(preset['models'])})")
        missing = EXPERIMENT_KEYS[experiment] - OPTIONAL_KEYS - set(spec)
        if missing:
            raise UserError(f"{here}: missing {', '.join(sorted(missing))}")
        if "seeds" in spec and (not isinstance(spec["seeds"], int) or spec["seeds"] < 1):
            raise UserError(f"{here}: 'seeds' must be a positive integer")
        if "first_seed" in spec and (not isinstance(spec["first_seed"], int) or spec["first_seed"] < 0):
            raise UserError(f"{here}: 'first_seed' must be an integer >= 0")
        if experiment == "confirm":
            check_study(spec, here)
    if "tracked_tokens" in preset["experiments"] and "kl_comparison" not in preset["experiments"]:
        raise UserError(f"{where}: tracked_tokens reads the kl_comparison runs; add a kl_comparison experiment")
    plan(preset, where)  # builds every config: a bad value fails here, not an hour into the run


def with_seeds(preset: dict, seeds: int = 0, first_seed: int | None = None) -> dict:
    """The preset with every experiment's seed count (``--seeds``, unless 0) and first seed
    (``--first-seed``, unless None) replaced."""
    preset = copy.deepcopy(preset)
    for spec in preset["experiments"].values():
        if "seeds" in spec:
            spec["seeds"] = seeds or spec["seeds"]
            if first_seed is not None:
                spec["first_seed"] = first_seed
    return preset


