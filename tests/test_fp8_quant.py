"""Activation tile quantization (1 x 128), ue8m0 scales, and their error bounds per tile/block."""

import math

import pytest
import torch

from dsv3 import fp8

E4M3_REL = 2.0 ** -4        # 3 mantissa bits: round-to-nearest error <= half an ulp = 2^-4 relative
E4M3_SUBNORMAL_ULP = 2.0 ** -9


def _tile_loop_bounds(x, q, s, tile, scale_fmt):
    """Check every 1 x tile of x [M, K] against an explicit float64 loop."""
    M, K = x.shape
    for m in range(M):
        for c in range(math.ceil(K / tile)):
            sl = slice(c * tile, min((c + 1) * tile, K))
            xt = x[m, sl].double()
            amax = xt.abs().max()
            scale = float(s[m, c])
            if scale_fmt == "ue8m0":
                assert math.log2(scale) == round(math.log2(scale))          # a power of two
                assert amax / 448 <= scale < 2 * amax / 448 + 1e-30         # the smallest one >= amax/448
            else:
                assert scale == pytest.approx(float(amax) / 448, rel=1e-6)
            back = q[m, sl].double() * scale
            assert q[m, sl].double().abs().max() <= 448
            bound = torch.maximum(xt.abs() * E4M3_REL, torch.full_like(xt, scale * E4M3_SUBNORMAL_ULP))
            assert ((xt - back).abs() <= bound * (1 + 1e-9)).all(), (m, c)


@pytest.mark.parametrize("shape,tile", [((5, 300), 128), ((3, 7 * 16 + 5), 16), ((4, 128), 128)])
@pytest.mark.parametrize("scale_fmt", [None, "ue8m0"])
def test_tile_quantization_error_bounded_per_tile_including_partial_last_tile(shape, tile, scale_fmt):
    g = torch.Generator().manual_seed(1)
    # channels with very different ranges, so tiles get very different scales
    x = torch.randn(shape, generator=g) * torch.logspace(-4, 2, shape[1])
    q, s = fp8.quantize_tiles(x, tile, scale_fmt)
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape
    assert s.dtype == torch.float32 and tuple(s.shape) == (shape[0], math.ceil(shape[1] / tile))
    _tile_loop_bounds(x, q, s, tile, scale_fmt)
    back = fp8.dequantize_tiles(q, s, tile)
    ref = q.double() * s.double().repeat_interleave(tile, 1)[:, : shape[1]]
    assert torch.equal(back, ref.float())   # the float64 product is exact; fp32 rounds it once


def test_tiles_run_over_leading_dims_and_zero_tiles():
    x = torch.randn(2, 3, 40)
    x[1, 2, :32] = 0
    q, s = fp8.quantize_tiles(x, 16)
    assert s.shape == (2, 3, 3)
    assert s[1, 2, 0] == 1 and s[1, 2, 1] == 1          # all-zero tiles: a harmless scale of 1
    q2, s2 = fp8.quantize_tiles(x.reshape(6, 40), 16)
    assert torch.equal(q.reshape(6, 40).float(), q2.float()) and torch.equal(s.reshape(6, 3), s2)


def test_ue8m0_blockwise_weights_and_largest_entry():
    w = torch.randn(200, 130, generator=torch.Generator().manual_seed(2)) * 3
    q, s = fp8.quantize_blockwise(w, (128, 128), "ue8m0")
    assert torch.equal(torch.exp2(torch.log2(s).round()), s)
    back = fp8.dequantize_blockwise(q, s)
    per_elem = s.repeat_interleave(128, 0)[:200].repeat_interleave(128, 1)[:, :130]
    # relative bound in E4M3's normal range, half a subnormal step (times the scale) below it
    assert ((w - back).abs() <= torch.maximum(w.abs() * E4M3_REL, per_elem * 2.0 ** -10)).all()
    assert (q.float().abs() <= 448).all()
    # amax/448 scales put each block's largest entry exactly on 448
    q0, s0 = fp8.quantize_blockwise(w)
    assert q0[:128, :128].float().abs().max() == 448


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="scale_fmt"):
        fp8.quantize_tiles(torch.ones(2, 4), 2, "e5m2")
    with pytest.raises(ValueError, match="tile=0"):
        fp8.quantize_tiles(torch.ones(2, 4), 0)
    with pytest.raises(ValueError, match="non-empty"):
        fp8.quantize_tiles(torch.ones(2, 0))
    q, s = fp8.quantize_tiles(torch.ones(2, 40), 16)
    with pytest.raises(ValueError, match="tile scale shape"):
        fp8.dequantize_tiles(q, s[:, :2], 16)
