"""Config dataclasses: fields declared as user options (help, flag, bounds: the CLI generates
its options from them), value checks, and construction from plain dicts (JSON in checkpoints),
refusing keys they do not know."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import fields
from typing import Any, TypeVar

import numpy as np

ConfigT = TypeVar("ConfigT")


def config_from_dict(cls: type[ConfigT], data: dict[str, Any], what: str) -> ConfigT:
    """``cls(**data)``, with a clear error naming unknown keys (``what`` names the config)."""
    known = {f.name for f in fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"unknown {what} keys {sorted(unknown)}; known: {sorted(known)}")
    return cls(**data)


def option(
    default: Any,
    help: str,
    *,
    flag: str | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
    min_open: bool = False,
    choices: Sequence[str] | None = None,
) -> Any:
    """A config field with what the command line needs to offer it: ``help``, the ``flag``
    (default: the field name with dashes) and the allowed values (``minimum``/``maximum``,
    ``min_open`` for a strict lower bound, or ``choices``). The config's ``__post_init__``
    still validates every value, whoever builds it."""
    meta = {
        "help": help,
        "flag": flag,
        "minimum": minimum,
        "maximum": maximum,
        "min_open": min_open,
        "choices": tuple(choices) if choices is not None else None,
    }
    return dataclasses.field(default=default, metadata={"option": meta})


def options_of(config_class: type) -> list[dataclasses.Field]:
    """The fields of a config that are user options (declared with :func:`option`)."""
    return [f for f in dataclasses.fields(config_class) if "option" in f.metadata]


def check_ints(config: Any, names: Sequence[str], minimum: int = 1) -> None:
    """Each field in ``names`` must be an integer >= ``minimum`` (not a bool)."""
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
            what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
            raise ValueError(f"{name} must be {what}, got {value!r}")


def check_finite(
    value: Any,
    name: str,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
) -> None:
    """``value`` must be a finite real number in [low, high] (``low_open``: in (low, high]);
    bounds optional."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not np.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    below = low is not None and (value <= low if low_open else value < low)
    if below or (high is not None and value > high):
        left = ("(" if low_open else "[") + (str(low) if low is not None else "-inf")
        raise ValueError(
            f"{name} must be in {left}, {high if high is not None else 'inf'}], got {value!r}"
        )
