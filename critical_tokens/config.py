"""Frozen dataclasses as the single source of truth for every command's hyper-parameters.

Each field's ``help`` becomes its ``--help`` text (as in cleanrl's ``Args``); the command line is
generated from the dataclass, so a default lives in exactly one place.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import typing
from typing import Any, Literal, get_args, get_origin

from . import checks
from .addition import MAX_DIGITS
from .runs import UserError

MAX_SEED = 2**32 - 1  # numpy's and torch's range, less the small offsets the commands add
DEVICE = re.compile(r"auto|cpu|cuda(:[0-9]+)?")


def arg(default: Any, help: str, positional: bool = False, metavar: str | None = None) -> Any:
    """A dataclass field with its ``--help`` text."""
    return dataclasses.field(default=default, metadata={"help": help, "positional": positional, "metavar": metavar})


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_arguments(parser: argparse.ArgumentParser, config_class: type) -> None:
    hints = typing.get_type_hints(config_class)
    for f in dataclasses.fields(config_class):
        kind = hints[f.name]
        meta = f.metadata
        kwargs: dict[str, Any] = {"help": meta.get("help", "").replace("%", "%%")}  # argparse formats help with %: "5%" is text
        if get_origin(kind) is typing.Union or str(get_origin(kind)) == "<class 'types.UnionType'>":
            kind = next(a for a in get_args(kind) if a is not type(None))
        if get_origin(kind) is Literal:
            kwargs["choices"] = list(get_args(kind))
            kwargs["type"] = type(get_args(kind)[0])
        elif kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif get_origin(kind) is tuple:
            kwargs["type"] = get_args(kind)[0]
            kwargs["nargs"] = "+"
            kwargs["action"] = "extend"  # --only a --only b and --only a b both give (a, b)
        else:
            kwargs["type"] = kind
        if meta.get("metavar"):
            kwargs["metavar"] = meta["metavar"]
        if meta.get("positional"):
            if f.default is not dataclasses.MISSING:
                kwargs["nargs"] = "?"
                kwargs["default"] = f.default
            parser.add_argument(f.name, **kwargs)
        else:
            kwargs["default"] = None if kwargs.get("action") == "extend" else f.default
            if f.default is not dataclasses.MISSING and "(default" not in kwargs["help"]:
                shown = ("on" if f.default else "off") if kind is bool else f.default
                kwargs["help"] += f" (default: {shown})"
            parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, **kwargs)


def from_namespace(config_class: type, ns: argparse.Namespace):
    values = {f.name: getattr(ns, f.name) for f in dataclasses.fields(config_class)}
    for f in dataclasses.fields(config_class):
        if isinstance(values[f.name], list):
            values[f.name] = tuple(values[f.name])
        elif values[f.name] is None and f.default is not dataclasses.MISSING:
            values[f.name] = f.default
    return config_class(**values)


def flag(config_class: type, name: str) -> str:
    """How a field is written on the command line: ``--n-digits``, or a positional's ``RUN_DIR``."""
    meta = {f.name: f.metadata for f in dataclasses.fields(config_class)}[name]
    return (meta.get("metavar") or name.upper()) if meta.get("positional") else "--" + name.replace("_", "-")


def check_fields(config) -> None:
    """What every command's validation starts with: the field types (`check_types`), then the
    fields several commands share: --seed, --device, --n-digits."""
    check_types(config)
    fields = {f.name for f in dataclasses.fields(config)}
    if "seed" in fields:
        check_range(config, ("seed",), 0, MAX_SEED)
    if "n_digits" in fields:
        check_range(config, ("n_digits",), 1, MAX_DIGITS)
    if "device" in fields and not DEVICE.fullmatch(config.device):
        raise UserError(f"--device must be auto, cpu, cuda or cuda:N, got {config.device!r}")


def check_types(config) -> None:
    """What every command's validation starts with, read from the field types: an int field holds
    an int, a float field a finite number (argparse takes "nan" and "inf"), a str a str, a Literal
    one of its choices, and None only where the type allows it."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        kind, value, name = hints[f.name], getattr(config, f.name), flag(type(config), f.name)
        if get_origin(kind) is typing.Union or str(get_origin(kind)) == "<class 'types.UnionType'>":
            if value is None:
                continue
            kind = next(a for a in get_args(kind) if a is not type(None))
        if get_origin(kind) is Literal:
            if value not in get_args(kind):
                raise UserError(f"{name} must be one of {', '.join(map(str, get_args(kind)))}, got {value!r}")
        elif get_origin(kind) is tuple:
            if not isinstance(value, tuple) or not all(isinstance(v, get_args(kind)[0]) for v in value):
                raise UserError(f"{name} must be a list of {get_args(kind)[0].__name__}, got {value!r}")
        elif kind is float:
            checks.number(name, value)
        elif kind is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise UserError(f"{name} must be an integer, got {value!r}")
        elif kind in (str, bool) and not isinstance(value, kind):
            raise UserError(f"{name} must be a {kind.__name__}, got {value!r}" if value is not None else f"give {name}")


def check_range(config, names: tuple[str, ...], low: float | None = None, high: float | None = None, *,
                low_open: bool = False, high_open: bool = False) -> None:
    """A UserError for the first field of ``names`` outside [low, high], an end left out where it
    is None and excluded where asked (``low=0, low_open=True``: positive). None values are skipped."""
    for name in names:
        value = getattr(config, name)
        if value is not None:
            checks.in_range(flag(type(config), name), value, low, high, low_open=low_open, high_open=high_open)
