"""The batch-size ramp of DeepSeek-V3's pre-training (``dsv3 train --batch-ramp START:TOKENS``).

The V3 report (section 4.2) grows the batch from 3072 to 15360 sequences over the first 469B
tokens, then keeps 15360. Here: step ``i`` trains on

    b_i = START + (batch_size - START) * T_i / TOKENS     (T_i: tokens trained before step i)

sequences per micro-batch, rounded *down* to a multiple of ``granule`` (default: the number of ranks
the batch is split over, so every rank keeps an equal, whole slice; never below one granule), and
``batch_size`` once ``T_i >= TOKENS``. ``START:TOKENS:MULTIPLE`` fixes the granule (a multiple of
the ranks), so the same sizes -- and the same run -- come out at any number of ranks. Growing linearly in *tokens* (not steps) is the paper's
wording; the sizes depend only on the step, so a resumed run recomputes them and stays bit-exact
(the data loader's position is part of the checkpoint, its batch size is not).

The learning-rate schedule stays per *step* (warmup and decay are counted in optimizer steps, as
without a ramp), so the early, smaller steps take the same LR a full-size step would.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass

_SUFFIX = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}
_SPEC_RE = re.compile(r"\s*(\d+)\s*:\s*(\d+(?:\.\d*)?(?:e\d+)?)\s*([kmbgt]?)\s*(?::\s*(\d+)\s*)?\Z",
                      re.IGNORECASE)


@dataclass(frozen=True)
class BatchRamp:
    """Start at ``start`` sequences, reach the run's batch size after ``tokens`` training tokens."""

    start: int
    tokens: int
    multiple: int | None = None   # the sizes' granule; None: the number of ranks

    @classmethod
    def parse(cls, spec: str) -> BatchRamp:
        """``"START:TOKENS[:MULTIPLE]"`` (TOKENS may be ``1e6`` or carry a K/M/B/T suffix) -> :class:`BatchRamp`."""
        m = _SPEC_RE.match(str(spec))
        if not m:
            raise ValueError(f"batch ramp {spec!r}: expected START:TOKENS[:MULTIPLE], e.g. 2:200000 or 3072:469B")
        start, tokens = int(m.group(1)), int(float(m.group(2)) * _SUFFIX[m.group(3).lower()])
        if start < 1:
            raise ValueError(f"batch ramp {spec!r}: START must be >= 1 sequence")
        if tokens < 1:
            raise ValueError(f"batch ramp {spec!r}: TOKENS must be >= 1")
        multiple = int(m.group(4)) if m.group(4) is not None else None
        if multiple is not None and multiple < 1:
            raise ValueError(f"batch ramp {spec!r}: MULTIPLE must be >= 1")
        return cls(start, tokens, multiple)

    def sizes(self, batch_size: int, tokens_per_sequence: int, steps: int, granule: int = 1) -> list[int]:
        """The batch size (sequences per micro-batch, global) of steps ``0 .. steps-1``.

        ``tokens_per_sequence`` is what one sequence of the batch adds to the step's tokens
        (``seq_len * grad_accum``); ``granule`` the number of ranks the batch is split over (every
        size a multiple of it; the ramp's own ``multiple``, when set, must be one of its multiples).
        """
        if self.multiple is not None:
            if self.multiple % granule:
                raise ValueError(f"batch ramp multiple {self.multiple} is not a multiple of the {granule} ranks "
                                 "the batch is split over")
            granule = self.multiple
        if self.start > batch_size:
            raise ValueError(f"batch ramp starts at {self.start} sequences, above --batch-size {batch_size}: "
                             "the ramp grows the batch towards --batch-size")
        if granule < 1 or batch_size % granule:
            raise ValueError(f"--batch-size {batch_size} is not a multiple of the ramp's granule {granule}")
        out, seen = [], 0
        for _ in range(steps):
            if seen >= self.tokens:
                b = batch_size
            else:
                b = self.start + (batch_size - self.start) * seen // self.tokens   # exact integer floor
                b = min(batch_size, max(granule, b // granule * granule))
            out.append(b)
            seen += b * tokens_per_sequence
        return out


def batch_ramp_spec(text: str) -> str:
    """argparse ``type=`` of ``--batch-ramp``: validates ``START:TOKENS``, keeps the string (it is
    saved in the run's JSON config as given)."""
    try:
        BatchRamp.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text
