"""FP8 (E4M3) block quantization in the layout of the official DeepSeek-V3 checkpoints.

A weight ``W [out, in]`` is stored as ``q = float8_e4m3fn(W / s)`` with one fp32 scale per 128x128
block, saved as ``weight_scale_inv`` of shape ``[ceil(out/128), ceil(in/128)]`` (the name is the
checkpoint's: dequantization multiplies, ``W ~= q * weight_scale_inv``). Edge blocks are partial:
``kv_a_proj_with_mqa`` of V3 is 576 x 7168, so its scales are 5 x 56.

Activations are quantized on the fly per ``1 x 128`` tile (one scale per token per 128 channels),
the scheme of DeepSeek-V3's inference and training kernels. Every scale is ``amax / 448`` so the
tile's largest entry lands on the largest E4M3 value; ``scale_fmt="ue8m0"`` (DeepSeek-V3.1) rounds
it up to a power of two, so scaling is exact in the exponent and no entry overflows.
"""

from __future__ import annotations

import math

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
DEFAULT_BLOCK = (128, 128)
DEFAULT_TILE = 128                             # activation tile width (1 x 128)
SCALE_FMTS = (None, "ue8m0")


def scale_shape(shape: tuple[int, int], block: tuple[int, int] = DEFAULT_BLOCK) -> tuple[int, int]:
    """Shape of ``weight_scale_inv`` for a weight of ``shape``."""
    return math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1])


def check_scale_fmt(scale_fmt: str | None) -> None:
    """``ValueError`` unless ``scale_fmt`` is one of :data:`SCALE_FMTS`."""
    if scale_fmt not in SCALE_FMTS:
        raise ValueError(f"scale_fmt={scale_fmt!r}: must be one of {SCALE_FMTS}")


def amax_to_scale(amax: torch.Tensor, scale_fmt: str | None = None) -> torch.Tensor:
    """Per-tile/block ``amax`` -> fp32 dequantization scale ``amax / 448`` (1 where the tile is all zero).

    ``ue8m0``: the scale rounded *up* to a power of two (``2 ** ceil(log2(amax / 448))``), as
    DeepSeek-V3.1 stores it; rounding up keeps every quantized entry within +-448.
    """
    check_scale_fmt(scale_fmt)
    amax = amax.float()
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))  # all-zero tile: any scale works
    if scale_fmt == "ue8m0":
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    return scale


def _expand(scale: torch.Tensor, shape: tuple[int, int], block: tuple[int, int]) -> torch.Tensor:
    """Per-block scales [R, C] -> per-element [out, in] (edge blocks cut to size)."""
    return scale.repeat_interleave(block[0], 0)[: shape[0]].repeat_interleave(block[1], 1)[:, : shape[1]]


def quantize_blockwise(w: torch.Tensor, block: tuple[int, int] = DEFAULT_BLOCK,
                       scale_fmt: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """W [out, in] -> (q float8_e4m3fn [out, in], scale_inv fp32 [ceil(out/b0), ceil(in/b1)]).

    Each block's scale is ``amax / 448`` (see :func:`amax_to_scale` for ``scale_fmt``).
    """
    if w.dim() != 2:
        raise ValueError(f"blockwise FP8 quantization needs a 2-D weight, got shape {tuple(w.shape)}")
    out_f, in_f = w.shape
    R, C = scale_shape((out_f, in_f), block)
    padded = w.float().new_zeros(R * block[0], C * block[1])
    padded[:out_f, :in_f] = w.float()
    blocks = padded.view(R, block[0], C, block[1])
    scale = amax_to_scale(blocks.abs().amax(dim=(1, 3)), scale_fmt)          # [R, C]
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


def quantize_tiles(x: torch.Tensor, tile: int = DEFAULT_TILE,
                   scale_fmt: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (q float8_e4m3fn [..., K], scale fp32 [..., ceil(K/tile)]): one scale per 1 x ``tile``.

    This is how activations (and, in training, output gradients) enter an FP8 GEMM: per token, per
    ``tile`` channels along the reduction dimension; the last tile may be partial.
    """
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"tile quantization needs a non-empty last dimension, got shape {tuple(x.shape)}")
    if tile < 1:
        raise ValueError(f"tile={tile}: must be >= 1")
    K = x.shape[-1]
    C = math.ceil(K / tile)
    xf = x.float()
    if C * tile != K:
        xf = torch.nn.functional.pad(xf, (0, C * tile - K))
    tiles = xf.unflatten(-1, (C, tile))                                     # [..., C, tile]
    scale = amax_to_scale(tiles.abs().amax(dim=-1), scale_fmt)              # [..., C]
    q = (tiles / scale.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).flatten(-2)[..., :K]
    return q, scale


def dequantize_tiles(q: torch.Tensor, scale: torch.Tensor, tile: int = DEFAULT_TILE,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`quantize_tiles`: ``q * scale`` per 1 x ``tile``, in fp32, cast to ``dtype``."""
    K = q.shape[-1]
    if tuple(scale.shape) != (*q.shape[:-1], math.ceil(K / tile)):
        raise ValueError(f"tile scale shape {tuple(scale.shape)} does not match {tuple(q.shape)} with tile {tile}")
    return (q.float() * scale.float().repeat_interleave(tile, dim=-1)[..., :K]).to(dtype)
