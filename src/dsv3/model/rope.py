"""Rotary position embedding on interleaved pairs, with YaRN context extension.

DeepSeek rotates adjacent pairs ``(x0, x1), (x2, x3), ...`` (a complex multiply on a ``(..., d/2, 2)``
view); the released checkpoints' ``q_b_proj``/``kv_a_proj_with_mqa`` rows are laid out for that.

YaRN (DESIGN.md §2): frequencies below the ``beta_slow`` correction dim are interpolated by ``factor``,
above ``beta_fast`` kept, with a linear ramp in between. cos/sin are scaled by
``mscale(factor, mscale) / mscale(factor, mscale_all_dim)`` (1 for V2/V3, where the two are equal),
and the attention softmax scale by ``mscale(factor, mscale_all_dim)**2`` (done in mla.py).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import ModelConfig, yarn_get_mscale


def yarn_correction_range(dim: int, theta: float, original_len: int, beta_fast: float, beta_slow: float) -> tuple[int, int]:
    """Dims ``[low, high]`` between which YaRN blends; ``r(b) = d*ln(L/(2*pi*b)) / (2*ln theta)``."""

    def r(b: float) -> float:
        return dim * math.log(original_len / (b * 2 * math.pi)) / (2 * math.log(theta))

    low = math.floor(r(beta_fast))
    high = math.ceil(r(beta_slow))
    return max(low, 0), min(high, dim - 1)


def rope_frequencies(config: ModelConfig, max_seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """``inv_freq [d/2]`` (fp32, on CPU) and the cos/sin scale for this config."""
    d = config.qk_rope_head_dim
    theta = float(config.rope_theta)
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float32, device="cpu") / d))
    if not config.yarn_active(max_seq_len):
        return inv_freq, 1.0
    y = config.yarn
    factor = float(y["factor"])
    low, high = yarn_correction_range(d, theta, int(y["original_max_position_embeddings"]),
                                      float(y.get("beta_fast") or 32), float(y.get("beta_slow") or 1))
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(d // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)
    if y.get("attention_factor") is not None:
        cos_scale = float(y["attention_factor"])
    else:
        # DeepSeek-V2's original formula (defaults mscale=1, mscale_all_dim=0). transformers agrees
        # whenever both are set, which every released config does.
        cos_scale = yarn_get_mscale(factor, float(y.get("mscale") or 1.0)) / yarn_get_mscale(
            factor, float(y.get("mscale_all_dim") or 0.0))
    return inv_freq, cos_scale


class RotaryEmbedding(nn.Module):
    """Maps positions to the (cos, sin) tables used by :func:`apply_rope`."""

    def __init__(self, config: ModelConfig, max_seq_len: int | None = None):
        super().__init__()
        inv_freq, self.cos_scale = rope_frequencies(config, max_seq_len)
        self._inv_freq = inv_freq  # plain CPU tensor: survives meta-device construction
        self._on_device: dict[torch.device, torch.Tensor] = {}

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions ``[..., S]`` (int) -> cos, sin ``[..., S, d/2]`` fp32."""
        dev = positions.device
        inv = self._on_device.get(dev)
        if inv is None:
            inv = self._inv_freq.to(dev)
            self._on_device[dev] = inv
        angles = positions.float().unsqueeze(-1) * inv
        return angles.cos() * self.cos_scale, angles.sin() * self.cos_scale


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of the last dim. x ``[..., d]``; cos/sin broadcast to ``[..., d/2]``."""
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).to(x.dtype)
