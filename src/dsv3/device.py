"""The one rule for which device a run uses when the user names none: CUDA when torch sees a GPU.

Training, SFT, GRPO, distributed setup, experiments and benchmarks all resolve ``--device`` here,
so "the default device" means the same thing everywhere.
"""

from __future__ import annotations

import torch


def resolve_device(spec: str | torch.device | None = None) -> torch.device:
    """``spec`` as a :class:`torch.device`; ``None`` or ``""``: ``cuda`` when available, else ``cpu``.

    A device string torch does not know (e.g. ``"gpu"``) raises torch's ``RuntimeError``, which names it.
    """
    if isinstance(spec, torch.device):
        return spec
    if spec:
        return torch.device(spec)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
