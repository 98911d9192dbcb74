"""A per-step schedule for the aux-loss-free bias update rate gamma (``dsv3 train --bias-update-schedule``).

DeepSeek-V3 (section 4.2) does not keep gamma fixed: 0.001 for the first 14.3T tokens, then 0.0 for
the last 500B. The spec here is a comma-separated list of ``GAMMA:UNTIL`` pairs, ``UNTIL`` being a
1-based optimizer step: the bias update after step ``s`` uses the GAMMA of the first pair whose UNTIL
is ``>= s``, and ``--bias-update-rate`` after the last pair (``none``: no pairs). So

    --bias-update-schedule 0.01:50          gamma 1e-2 for steps 1..50, then --bias-update-rate
    --bias-update-schedule 0.001:14300 --bias-update-rate 0     the paper's shape, counted in steps

Why a high start helps a small run: each update moves a bias by at most gamma, while a freshly
initialised router settles on its favourite experts within a few steps (the tiny preset's experts
differ in mean score by 0.3-0.7 after ~10 steps, benchmarks/RESULTS.md); at gamma 1e-3 the bias
needs hundreds of steps to catch up, at 1e-2 tens.

The rate depends on the step alone (not on ``--max-steps`` or the time), so a resumed run applies
the same rates as an uninterrupted one and stays bit-exact.
"""

from __future__ import annotations

import argparse
import math
import re
from dataclasses import dataclass

_PAIR_RE = re.compile(r"\s*([0-9.eE+-]+)\s*:\s*(\d+)\s*\Z")


@dataclass(frozen=True)
class BiasSchedule:
    """Piecewise-constant gamma: ``segments[j] = (gamma, until)``, ``until`` strictly increasing."""

    segments: tuple[tuple[float, int], ...]

    @classmethod
    def parse(cls, spec: str) -> BiasSchedule:
        """``"GAMMA:UNTIL[,GAMMA:UNTIL...]"`` -> :class:`BiasSchedule` (ValueError on a malformed spec);
        ``"none"``: no pairs, the base rate at every step (how the command line turns a default schedule off)."""
        if str(spec).strip().lower() == "none":
            return cls(())
        parts = [p for p in str(spec).split(",")]
        if not any(p.strip() for p in parts):
            raise ValueError(f"bias update schedule {spec!r}: expected GAMMA:UNTIL[,GAMMA:UNTIL...], e.g. 0.01:50")
        segments, last = [], 0
        for part in parts:
            m = _PAIR_RE.match(part)
            if not m:
                raise ValueError(f"bias update schedule {spec!r}: {part.strip()!r} is not GAMMA:UNTIL "
                                 "(a rate and a 1-based step), e.g. 0.01:50")
            try:
                gamma = float(m.group(1))
            except ValueError:
                raise ValueError(f"bias update schedule {spec!r}: {m.group(1)!r} is not a number") from None
            until = int(m.group(2))
            if not math.isfinite(gamma) or gamma < 0:
                raise ValueError(f"bias update schedule {spec!r}: gamma {m.group(1)} must be a finite number >= 0")
            if until <= last:
                raise ValueError(f"bias update schedule {spec!r}: the steps must increase and start at >= 1 "
                                 f"({until} after {last})")
            segments.append((gamma, until))
            last = until
        return cls(tuple(segments))

    def rate(self, step: int, base: float) -> float:
        """gamma of the bias update after optimizer step ``step`` (1-based); ``base`` after the last pair."""
        for gamma, until in self.segments:
            if step <= until:
                return gamma
        return base


def bias_schedule_spec(text: str) -> str:
    """argparse ``type=`` of ``--bias-update-schedule``: validates the spec, keeps the string (it is
    saved in the run's JSON config as given)."""
    try:
        BiasSchedule.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def bias_rate(spec: str | None, step: int, base: float) -> float:
    """gamma after optimizer step ``step`` (1-based) under ``spec`` (None: ``base`` at every step)."""
    return base if not spec else BiasSchedule.parse(spec).rate(step, base)
