"""The checks of a number a user gives, one per concept, shared by every place a value enters: the
commands' options (`config.check_range`), the presets (through the commands' validation), the TRL
configs (`trl.PrioritizedKLOptions`) and the example scripts, so that they cannot disagree.

Each raises `BadValue`: a `UserError` (the command line prints it as one line) that is also the
`ValueError` a config's ``__post_init__`` raises for a bad field.
"""

from __future__ import annotations

import math
from numbers import Real

from .runs import UserError


class BadValue(UserError, ValueError):
    """A value outside what its option means: one line for the user, a ValueError for a library caller."""


def number(name: str, value, integer: bool = False) -> float:
    """``value`` if it is a finite real number (an int with ``integer``); argparse's float() takes "nan"
    and "inf", and a NaN passes every comparison-based range check, so finiteness is checked first (an
    int is finite however large: math.isfinite would overflow converting it)."""
    kind = "an integer" if integer else "a finite number"
    if isinstance(value, bool) or not isinstance(value, int if integer else Real) or (not isinstance(value, int) and not math.isfinite(value)):
        raise BadValue(f"{name} must be {kind}, got {value!r}")
    return value


def in_range(name: str, value, low: float | None = None, high: float | None = None, *,
             low_open: bool = False, high_open: bool = False, integer: bool = False) -> float:
    """``value`` if it is a finite number in [low, high] (an end left out where None, excluded where
    ``*_open``: ``low=0, low_open=True`` is "positive")."""
    number(name, value, integer)
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        if high is None:
            span = f"{'>' if low_open else '>='} {low}"
        elif low is None:
            span = f"{'<' if high_open else '<='} {high}"
        else:
            span = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise BadValue(f"{name} must be {span}, got {value}")
    return value


def parse_beta(name: str, value) -> float | None:
    """The prioritized KL exponent beta of w = c^beta: a finite number >= 0 (a number or its text), or
    'auto' (None: calibrated on the reference's certainties). An infinite beta would give every token
    of certainty below 1 the weight 0, that is no KL at all."""
    if value == "auto":
        return None
    try:
        beta = float(value)
    except (TypeError, ValueError):
        raise BadValue(f"{name} must be a number >= 0 or 'auto', got {value!r}") from None
    if not 0 <= beta < math.inf:
        raise BadValue(f"{name} must be a finite number >= 0 or 'auto', got {value}")
    return beta


def quantile_and_weight(quantile_name: str, quantile: float, weight_name: str, weight: float) -> None:
    """beta 'auto''s two numbers: the certainty quantile and the weight it gets, each in (0, 1)."""
    in_range(quantile_name, quantile, 0, 1, low_open=True, high_open=True)
    in_range(weight_name, weight, 0, 1, low_open=True, high_open=True)
