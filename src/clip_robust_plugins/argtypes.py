"""Flag helpers shared by the plugins: argparse ``type=`` validators (a bad value is argparse's
one-line usage error naming the flag rather than a failure deep inside a fit) and the mapping
from ``--<prefix><field>`` flags to a config dataclass."""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable
from typing import Any


def at_least(minimum: int) -> Callable[[str], int]:
    """An integer ``>= minimum``."""

    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def positive_float(text: str) -> float:
    """A finite float ``> 0``."""
    value = float(text)
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def fraction(text: str) -> float:
    """A float in [0, 1]."""
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value}")
    return value


def config_from_options(config_cls: type, prefix: str, options: Any, **explicit: Any) -> Any:
    """A plugin's config dataclass from its parsed flags.

    Each field takes ``--<prefix><field>`` when that flag was given (not None), else the
    field's default; ``explicit`` values (fields without a flag of that name) win.
    """
    defaults = config_cls()
    values = {}
    for f in dataclasses.fields(config_cls):
        if f.name in explicit or not f.init:
            continue
        value = getattr(options, f"{prefix}{f.name}", None)
        values[f.name] = getattr(defaults, f.name) if value is None else value
    return config_cls(**values, **explicit)
