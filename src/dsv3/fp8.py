"""FP8 (E4M3) block quantization in the layout of the official DeepSeek-V3 checkpoints.

A weight ``W [out, in]`` is stored as ``q = float8_e4m3fn(W / s)`` with one fp32 scale per 128x128
block, saved as ``weight_scale_inv`` of shape ``[ceil(out/128), ceil(in/128)]`` (the name is the
checkpoint's: dequantization multiplies, ``W ~= q * weight_scale_inv``). Edge blocks are partial:
``kv_a_proj_with_mqa`` of V3 is 576 x 7168, so its scales are 5 x 56.
"""

from __future__ import annotations

import math

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
DEFAULT_BLOCK = (128, 128)


def scale_shape(shape: tuple[int, int], block: tuple[int, int] = DEFAULT_BLOCK) -> tuple[int, int]:
    """Shape of ``weight_scale_inv`` for a weight of ``shape``."""
    return math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1])


def _expand(scale: torch.Tensor, shape: tuple[int, int], block: tuple[int, int]) -> torch.Tensor:
    """Per-block scales [R, C] -> per-element [out, in] (edge blocks cut to size)."""
    return scale.repeat_interleave(block[0], 0)[: shape[0]].repeat_interleave(block[1], 1)[:, : shape[1]]


def quantize_blockwise(w: torch.Tensor, block: tuple[int, int] = DEFAULT_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """W [out, in] -> (q float8_e4m3fn [out, in], scale_inv fp32 [ceil(out/b0), ceil(in/b1)]).

    Each block's scale is ``amax / 448`` so its largest entry lands on the largest E4M3 value.
    """
    if w.dim() != 2:
        raise ValueError(f"blockwise FP8 quantization needs a 2-D weight, got shape {tuple(w.shape)}")
    out_f, in_f = w.shape
    R, C = scale_shape((out_f, in_f), block)
    padded = w.float().new_zeros(R * block[0], C * block[1])
    padded[:out_f, :in_f] = w.float()
    blocks = padded.view(R, block[0], C, block[1])
    amax = blocks.abs().amax(dim=(1, 3))                                   # [R, C]
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))  # all-zero block: any scale works
    q = (w.float() / _expand(scale, (out_f, in_f), block)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def dequantize_blockwise(q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = DEFAULT_BLOCK,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`quantize_blockwise`: ``q * scale_inv`` per block, in fp32, cast to ``dtype``."""
    expected = scale_shape(tuple(q.shape), block)
    if tuple(scale_inv.shape) != expected:
        raise ValueError(f"scale shape {tuple(scale_inv.shape)} does not match weight {tuple(q.shape)} "
                         f"with block {block} (expected {expected})")
    return (q.float() * _expand(scale_inv.float(), tuple(q.shape), block)).to(dtype)
