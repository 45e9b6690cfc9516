"""Frozen dataclasses as the single source of truth for every command's hyper-parameters.

Each field's ``help`` becomes its ``--help`` text (as in cleanrl's ``Args``); the command line is
generated from the dataclass, so a default lives in exactly one place.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any, Literal, get_args, get_origin


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
        kwargs: dict[str, Any] = {"help": meta.get("help", "")}
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
            if "help" in kwargs and f.default is not dataclasses.MISSING and kind is not bool:
                kwargs["help"] += f" (default: {f.default})"
            parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, **kwargs)


def from_namespace(config_class: type, ns: argparse.Namespace):
    values = {f.name: getattr(ns, f.name) for f in dataclasses.fields(config_class)}
    for f in dataclasses.fields(config_class):
        if isinstance(values[f.name], list):
            values[f.name] = tuple(values[f.name])
        elif values[f.name] is None and f.default is not dataclasses.MISSING:
            values[f.name] = f.default
    return config_class(**values)
