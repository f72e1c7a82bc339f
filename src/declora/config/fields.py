"""Field helpers of the config dataclasses: a field with help text, and the one-line checks they share."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import field
from typing import Any

from declora.errors import ConfigError


def _f(default: Any, help: str, **kw: Any) -> Any:  # noqa: A002 - "help" mirrors argparse
    """A dataclass field with help text (mutable defaults go through ``default_factory``)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


def _choice(name: str, value: Any, choices: tuple[Any, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not one of {', '.join(map(str, choices))}")


# train.lr_scheduler: names of transformers.get_scheduler (declora.client.lr_schedule builds them)
_SCHEDULERS = ("constant", "linear", "cosine", "cosine_with_restarts", "polynomial", "inverse_sqrt")


def _fraction(name: str, value: float, *, one: bool = True) -> None:
    """A probability/fraction in [0, 1] (``one=False``: [0, 1)); NaN and inf fail the comparison."""
    if not (0.0 <= value <= 1.0 and (one or value < 1.0)):
        raise ConfigError(f"{name}={value} must be in [0, {'1]' if one else '1)'}")


def _positive(name: str, value: float, *, allow_zero: bool = False) -> None:
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{name}={value} must be a finite number {'>= 0' if allow_zero else '> 0'}")


def _int_at_least(name: str, value: int | None, low: int, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if value is None or value < low:
        raise ConfigError(f"{name}={value} must be an integer >= {low}{' or null' if optional else ''}")


def _seed(name: str, value: int | None) -> None:
    """Seeds feed numpy (>= 0) and torch (< 2**64); 0 .. 2**32 - 1 works everywhere."""
    if value is not None and not 0 <= value < 2**32:
        raise ConfigError(f"{name}={value} must be an integer in 0..{2**32 - 1}")


def _check_finite(obj: Any, prefix: str) -> None:
    """Every float of every section (and inside lists) is finite: NaN and inf never pass, new options too."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _check_finite(value, f"{prefix}{f.name}.")
            continue
        stack = [value]
        while stack:
            item = stack.pop()
            if isinstance(item, (list, tuple)):
                stack.extend(item)
            elif isinstance(item, float) and not math.isfinite(item):
                raise ConfigError(f"{prefix}{f.name}={value} must be finite (not NaN or infinity)")
