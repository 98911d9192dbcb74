"""RoPE on interleaved pairs and YaRN frequencies, against independent float64 / complex-number references."""

import math

import pytest
import torch

import dsv3
from conftest import TINY_YARN, tiny_config
from dsv3.config import preset
from dsv3.model.mla import MLA
from dsv3.model.rope import RotaryEmbedding, apply_rope, rope_frequencies, yarn_correction_range


def complex_rope(x: torch.Tensor, pos: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """x [..., S, d] at positions pos [S]: pairs (x0,x1),(x2,x3).. as complex numbers times e^{i pos f}."""
    xc = torch.view_as_complex(x.double().reshape(*x.shape[:-1], -1, 2).contiguous())
    angle = pos.double()[:, None] * inv_freq.double()[None, :]
    rot = torch.polar(torch.ones_like(angle), angle)
    return torch.view_as_real(xc * rot).flatten(-2)


def base_inv_freq(d, theta):
    return torch.tensor([theta ** (-2 * i / d) for i in range(d // 2)], dtype=torch.float64)


def yarn_inv_freq_f64(d, theta, s, L, beta_fast, beta_slow):
    """DESIGN.md §2, written out in float64."""
    def r(b):
        return d * math.log(L / (2 * math.pi * b)) / (2 * math.log(theta))

    low = max(math.floor(r(beta_fast)), 0)
    high = min(math.ceil(r(beta_slow)), d - 1)
    width = (high - low) if high != low else 0.001
    out = []
    for i, f in enumerate(base_inv_freq(d, theta).tolist()):
        ramp = min(max((i - low) / width, 0.0), 1.0)
        out.append(f / s * ramp + f * (1 - ramp))
    return torch.tensor(out, dtype=torch.float64)


def yarn_mscale(s, m):
    return 0.1 * m * math.log(s) + 1.0


def tiny_yarn_config(**kw):
    return tiny_config(**{"rope_theta": 100.0, "rope_scaling": dict(TINY_YARN), **kw})


# ---------------------------------------------------------------------- rotation
@pytest.mark.parametrize("d", [8, 64])
def test_apply_rope_matches_complex_multiplication(d):
    g = torch.Generator().manual_seed(0)
    S = 11
    x = torch.randn(2, 3, S, d, generator=g)
    pos = torch.arange(S) * 7 + 3
    inv_freq = base_inv_freq(d, 1e4).float()
    angles = pos.float()[:, None] * inv_freq
    out = apply_rope(x, angles.cos(), angles.sin())
    ref = complex_rope(x, pos, inv_freq)
    assert out.shape == x.shape and out.dtype == x.dtype
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-5)


def test_apply_rope_is_interleaved_not_half_split():
    # One rotation by 90 degrees of the first pair only: (1, 0) -> (0, 1) in slots 0 and 1.
    x = torch.zeros(1, 4)
    x[0, 0] = 1.0
    cos = torch.tensor([[0.0, 1.0]])
    sin = torch.tensor([[1.0, 0.0]])
    out = apply_rope(x, cos, sin)
    torch.testing.assert_close(out, torch.tensor([[0.0, 1.0, 0.0, 0.0]]))


def test_rotary_embedding_tables():
    c = tiny_yarn_config(rope_scaling={**TINY_YARN, "mscale": 1.0, "mscale_all_dim": 0.707})
    rope = RotaryEmbedding(c)
    pos = torch.tensor([0, 1, 5, 100])
    cos, sin = rope(pos)
    inv = yarn_inv_freq_f64(8, 100.0, 4.0, 64, 32, 1)
    scale = yarn_mscale(4.0, 1.0) / yarn_mscale(4.0, 0.707)
    assert abs(rope.cos_scale - scale) < 1e-12
    ang = pos.double()[:, None] * inv
    torch.testing.assert_close(cos.double(), ang.cos() * scale, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sin.double(), ang.sin() * scale, atol=1e-5, rtol=1e-5)


def test_rotation_preserves_norm():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 9, 16, generator=g)
    cos, sin = RotaryEmbedding(tiny_config(qk_rope_head_dim=16))(torch.arange(1000, 1009))
    out = apply_rope(x, cos, sin)
    assert not torch.allclose(out, x)
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("yarn", [False, True])
def test_relative_position(yarn):
    c = tiny_yarn_config() if yarn else tiny_config()
    rope = RotaryEmbedding(c)
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(8, generator=g), torch.randn(8, generator=g)

    def score(m, n):
        cq, sq = rope(torch.tensor([m]))
        ck, sk = rope(torch.tensor([n]))
        return (apply_rope(q[None], cq, sq) * apply_rope(k[None], ck, sk)).sum().item()

    for m, n in [(5, 2), (9, 9), (3, 11)]:
        for shift in (1, 17, 200):
            assert score(m + shift, n + shift) == pytest.approx(score(m, n), abs=1e-4)
    # ...but it does depend on the offset itself.
    assert abs(score(5, 2) - score(6, 2)) > 1e-3


# ---------------------------------------------------------------------- YaRN frequencies
def test_yarn_correction_range_v3():
    # r(32) = 64 ln(4096/(64 pi)) / (2 ln 1e4) = 10.47..., r(1) = 22.5...
    assert yarn_correction_range(64, 1e4, 4096, 32, 1) == (10, 23)
    assert yarn_correction_range(8, 100.0, 64, 32, 1) == (0, 3)  # clamped below at 0


def test_yarn_frequencies_v3():
    c = preset("v3")
    inv, cos_scale = rope_frequencies(c)
    ref = yarn_inv_freq_f64(64, 1e4, 40.0, 4096, 32, 1)
    assert inv.dtype == torch.float32 and inv.shape == (32,)
    torch.testing.assert_close(inv.double(), ref, rtol=1e-6, atol=0)
    base = base_inv_freq(64, 1e4)
    # high-frequency dims untouched, low-frequency dims divided by s, a ramp in between
    torch.testing.assert_close(inv[:10].double(), base[:10], rtol=1e-6, atol=0)
    torch.testing.assert_close(inv[23:].double(), base[23:] / 40, rtol=1e-6, atol=0)
    ratio = base[10:24] / inv[10:24].double()
    assert bool((ratio[1:] > ratio[:-1]).all())
    assert cos_scale == 1.0  # mscale == mscale_all_dim for V3


def test_yarn_frequencies_tiny():
    inv, cos_scale = rope_frequencies(tiny_yarn_config())
    ref = yarn_inv_freq_f64(8, 100.0, 4.0, 64, 32, 1)
    torch.testing.assert_close(inv.double(), ref, rtol=1e-6, atol=0)
    # ramp = [0, 1/3, 2/3, 1]
    base = base_inv_freq(8, 100.0)
    expected = base * torch.tensor([1.0, 1 - 1 / 3 + 1 / 12, 1 - 2 / 3 + 2 / 12, 0.25], dtype=torch.float64)
    torch.testing.assert_close(inv.double(), expected, rtol=1e-6, atol=0)
    assert cos_scale == 1.0


@pytest.mark.parametrize("d, theta, s, L, beta_fast, beta_slow", [
    (64, 1e6, 8.0, 4096, 16, 2),     # r = 8.59 / 13.40: floor and ceil differ from rounding
    (16, 500.0, 4.0, 256, 32, 1),    # low clamped at 0
    (8, 100.0, 4.0, 64, 32, 0.001),  # r(beta_slow) = 8.02: high clamped at d-1 = 7 inside the ramp
    (32, 5e5, 32.0, 8192, 32, 1),
])
def test_yarn_frequencies_match_formula(d, theta, s, L, beta_fast, beta_slow):
    c = tiny_config(qk_rope_head_dim=d, rope_theta=theta, rope_scaling={
        "rope_type": "yarn", "factor": s, "original_max_position_embeddings": L,
        "beta_fast": beta_fast, "beta_slow": beta_slow, "mscale": 1.0, "mscale_all_dim": 1.0})
    inv, _ = rope_frequencies(c)
    torch.testing.assert_close(inv.double(), yarn_inv_freq_f64(d, theta, s, L, beta_fast, beta_slow), rtol=1e-6, atol=0)


def test_no_yarn_frequencies():
    inv, cos_scale = rope_frequencies(tiny_config(rope_theta=5000.0))
    torch.testing.assert_close(inv.double(), base_inv_freq(8, 5000.0), rtol=1e-6, atol=0)
    assert cos_scale == 1.0


# ---------------------------------------------------------------------- softmax scale
def test_softmax_scale_without_yarn():
    mla = MLA(tiny_config(), 0)
    assert mla.softmax_scale == pytest.approx(16 ** -0.5, rel=1e-12)


@pytest.mark.parametrize("mscale_all_dim", [1.0, 0.707])
def test_softmax_scale_with_yarn(mscale_all_dim):
    c = tiny_yarn_config(rope_scaling={**TINY_YARN, "mscale": 1.0, "mscale_all_dim": mscale_all_dim})
    m = 0.1 * mscale_all_dim * math.log(4.0) + 1
    assert MLA(c, 0).softmax_scale == pytest.approx(16 ** -0.5 * m * m, rel=1e-12)


def test_softmax_scale_v3():
    with torch.device("meta"):
        mla = MLA(preset("v3"), 0)
    m = 0.1 * 1.0 * math.log(40) + 1
    assert mla.softmax_scale == pytest.approx(192 ** -0.5 * m * m, rel=1e-12)


# ---------------------------------------------------------------------- when YaRN is on
def test_yarn_mode_past_original():
    c = tiny_yarn_config(yarn_mode="past_original", max_position_embeddings=256)  # L = 64
    plain, yarn = base_inv_freq(8, 100.0), yarn_inv_freq_f64(8, 100.0, 4.0, 64, 32, 1)
    m = 0.1 * math.log(4.0) + 1
    for max_len, on in [(16, False), (64, False), (65, True), (None, True)]:  # None -> max_position_embeddings
        assert c.yarn_active(max_len) is on
        inv, _ = rope_frequencies(c, max_len)
        torch.testing.assert_close(inv.double(), yarn if on else plain, rtol=1e-6, atol=0)
        scale = MLA(c, 0, max_seq_len=max_len).softmax_scale
        assert scale == pytest.approx(16 ** -0.5 * (m * m if on else 1.0), rel=1e-12)
    # The model passes its run length down to RoPE.
    model_short = dsv3.Transformer(c, max_seq_len=32)
    torch.testing.assert_close(model_short.rope._inv_freq.double(), plain, rtol=1e-6, atol=0)


def test_yarn_mode_always():
    c = tiny_yarn_config(yarn_mode="always")
    assert c.yarn_active(8)
    inv, _ = rope_frequencies(c, 8)
    torch.testing.assert_close(inv.double(), yarn_inv_freq_f64(8, 100.0, 4.0, 64, 32, 1), rtol=1e-6, atol=0)
    assert MLA(c, 0, max_seq_len=8).softmax_scale > 16 ** -0.5
