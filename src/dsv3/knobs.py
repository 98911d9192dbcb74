"""Config fields that are also command-line flags: :func:`knob` and the value parsers they name.

A config dataclass declares each knob once: its default, and in the field's metadata its help text
(and, where the annotation is not enough, its value parser, choices, metavar or flag spelling).
``dsv3.cli.fields`` turns those fields into argparse flags. This module is imported by the
dataclasses themselves, so it depends on nothing of dsv3 (and only on the standard library).
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Callable


def knob(default: Any = dataclasses.MISSING, help: str = "", *, default_factory: Any = dataclasses.MISSING,
         flag: str | None = None, type: Callable[[str], Any] | None = None, choices=None,
         metavar: str | tuple[str, ...] | None = None, nargs: str | int | None = None,
         aliases: tuple[str, ...] = ()) -> Any:
    """A dataclass field that is a CLI flag: ``dataclasses.field`` with the flag's help in its metadata.

    ``help`` may contain ``{default}``, replaced by the field's default (for flags whose command-line
    default is ``None``, so argparse cannot show it). The keyword arguments ``flag`` (default:
    ``--field-name``), ``type``, ``choices``, ``metavar`` and ``nargs`` go to ``add_argument``.
    ``aliases`` are old spellings of the flag (``("--steps",)``): still accepted, with a deprecation
    warning when used, and named as deprecated in the flag's help.
    """
    if not help:
        raise ValueError("a knob needs its help text")
    if isinstance(aliases, str) or not all(isinstance(a, str) and a.startswith("--") for a in aliases):
        raise ValueError(f"knob aliases must be a tuple of --flag spellings, got {aliases!r}")
    meta: dict[str, Any] = {"help": help}
    for key, value in (("flag", flag), ("type", type), ("choices", choices), ("metavar", metavar), ("nargs", nargs)):
        if value is not None:
            meta[key] = value
    if aliases:
        meta["aliases"] = tuple(aliases)
    return dataclasses.field(default=default, default_factory=default_factory, metadata=meta)


# ---------------------------------------------------------------------- value parsers
# argparse ``type=`` callables: they raise ArgumentTypeError, which argparse reports as a usage error.
def positive_int(text: str) -> int:
    """An integer > 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid positive integer: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def nonneg_float(text: str) -> float:
    """A finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number: {text!r}") from None
    if not value >= 0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def fraction(text: str) -> float:
    """A number in [0, 1]."""
    value = nonneg_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def positive_float(text: str) -> float:
    """A number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def choice_list(choices, what: str):
    """An argparse ``type=`` for ``"a,b"`` -> ("a", "b"): one or more names, each in ``choices``
    (read when called, so a registry may grow after the parser is built); ``what`` names them in errors."""
    def parse(text: str) -> tuple[str, ...]:
        values = tuple(v.strip() for v in text.split(",") if v.strip())
        allowed = tuple(choices)
        if not values or any(v not in allowed for v in values):
            raise argparse.ArgumentTypeError(f"{what} must be among {', '.join(allowed)}; got {text!r}")
        return values
    return parse


def int_list(text: str) -> tuple[int, ...]:
    """``"0,1"`` -> (0, 1): a comma-separated list of one or more integers."""
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values
