"""The sections and experiments of a preset, and their typed fields (read by `preset`, `plan` and the report).

Each section of a preset fills one command's frozen config; a JSON value is converted to its field's
type (``150`` -> ``"150"`` for ``--beta``, a list -> a tuple) and an unknown key is a UserError.
`EXPERIMENT_KEYS` says what each experiment may hold; a name (a model's, an arm's) names a directory.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from ..critical.command import CriticalConfig
from ..evaluate import EvaluateConfig
from ..pretrain import PretrainConfig
from ..rl.config import RLConfig
from ..runs import UserError

CHECKPOINTS_DIR = Path(__file__).parents[1] / "checkpoints"  # the pre-trained models the package ships
EXPERIMENTS = ("levels", "table1", "kl_comparison", "beta_sweep", "rl_levels", "tracked_tokens", "kl_by_model", "confirm")
# What each experiment may hold besides "notes", and the fields reproduce sets itself.
EXPERIMENT_KEYS = {
    "levels": {"models"},
    "table1": {"models"},
    "kl_comparison": {"model", "seeds", "rl", "arms"},
    "beta_sweep": {"model", "seeds", "rl", "betas"},
    "rl_levels": {"models", "seeds", "rl"},
    "tracked_tokens": set(),
    "kl_by_model": {"models", "seeds", "first_seed", "rl", "arms"},
    "confirm": {"models", "seeds", "first_seed", "rl", "arms", "hypotheses", "alpha", "preregistration", "decision", "title",
                "analysis", "placement"},
}
OPTIONAL_KEYS = {"rl", "first_seed", "alpha", "preregistration", "decision", "title", "analysis", "placement"}
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")

SECTIONS = {  # preset section -> (config class, fields reproduce sets)
    "models": (PretrainConfig, {"out", "device", "resume"}),
    "evaluate": (EvaluateConfig, {"run", "out", "n_digits"}),
    "critical": (CriticalConfig, {"run", "out", "n_digits", "html", "png"}),
    "rl": (RLConfig, {"pretrained", "out", "device", "resume", "seed"}),
}


def model_fields(preset: dict, name: str, where: str = "preset") -> dict:
    """The `PretrainConfig` fields of the preset's model ``name`` (``shipped`` aside)."""
    fields = dict(preset["models"][name])
    shipped = fields.pop("shipped", None)
    if shipped is not None and not (isinstance(shipped, str) and NAME.match(shipped)):
        raise UserError(f"{where}: models.{name}.shipped must be the name of a directory in {CHECKPOINTS_DIR}")
    return typed_fields(PretrainConfig, fields, SECTIONS["models"][1], f"{where}: models.{name}")


def check_name(name: Any, where: str) -> None:
    if not isinstance(name, str) or not NAME.match(name):
        raise UserError(f"{where} name {name!r} must be letters, digits, '_', '.', '+' or '-' (it names a directory)")


def section_fields(preset: dict, section: str, overrides: dict, where: str = "preset") -> dict:
    config_class, reserved = SECTIONS[section]
    return typed_fields(config_class, {**preset.get(section, {}), **overrides}, reserved, f"{where}: {section}")


def typed_fields(config_class: type, values: dict, reserved: set, where: str) -> dict:
    """``values`` with each JSON value converted to its field's type; a UserError for a key that is
    not a field of ``config_class`` (a typo) or that reproduce sets itself."""
    if not isinstance(values, dict):
        raise UserError(f"{where} must be a JSON object")
    hints = typing.get_type_hints(config_class)
    allowed = [f.name for f in dataclasses.fields(config_class) if f.name not in reserved]
    out = {}
    for key, value in values.items():
        if key not in allowed:
            why = "is set by reproduce" if key in reserved else f"is not a {config_class.__name__} field"
            raise UserError(f"{where}: {key!r} {why}; a preset can set {', '.join(allowed)}")
        out[key] = _coerce(hints[key], value, f"{where}.{key}")
    return out


def _coerce(kind: Any, value: Any, where: str) -> Any:
    if get_origin(kind) is typing.Union or type(kind).__name__ == "UnionType":
        if value is None:
            return None
        kind = next(a for a in get_args(kind) if a is not type(None))
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if get_origin(kind) is Literal:
        if value in get_args(kind) and type(value) is type(get_args(kind)[0]):
            return value
        raise UserError(f"{where}: {value!r} is not one of {', '.join(map(repr, get_args(kind)))}")
    if kind is bool and isinstance(value, bool):
        return value
    if kind is int and number and float(value).is_integer():
        return int(value)
    if kind is float and number:
        return float(value)
    if kind is str and (isinstance(value, str) or number):
        return value if isinstance(value, str) else format(value, "g")  # beta 150 -> "150"
    if get_origin(kind) is tuple and isinstance(value, list):
        return tuple(value)
    raise UserError(f"{where}: {value!r} is not of type {getattr(kind, '__name__', kind)}")


def check_keys(obj: Any, allowed: set, where: str) -> None:
    if not isinstance(obj, dict):
        raise UserError(f"{where} must be a JSON object")
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise UserError(f"{where}: unknown key {unknown[0]!r}; expected {', '.join(sorted(allowed))}")
