"""Absorbed MLA decode over the paged latent cache (dsv3.kernels.mla_decode).

The reference is checked against an independent float64 computation that never absorbs: per-head
keys and values are materialized from the latents with ``kv_b_proj`` (the naive path of DESIGN.md
§2), in contiguous per-sequence order, without block tables. The Triton kernel is checked against
the reference: on a GPU when there is one, and on the CPU through Triton's interpreter.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from dsv3.kernels.mla_decode import default_num_splits, mla_decode, mla_decode_reference

H, NOPE, ROPE, R, V = 4, 8, 8, 16, 12


def _setup(ctx_lens, block_size=4, seed=0, dtype=torch.float32, device="cpu"):
    """Random latents for sequences of the given lengths, scattered over shuffled cache blocks."""
    g = torch.Generator().manual_seed(seed)
    n = len(ctx_lens)
    blocks_per = [-(-c // block_size) for c in ctx_lens]
    num_blocks = sum(blocks_per) + 3                      # spare blocks full of junk
    perm = torch.randperm(num_blocks, generator=g).tolist()
    kv = torch.randn(num_blocks * block_size, R + ROPE, generator=g, dtype=torch.float64)
    tables, i = [], 0
    for b in blocks_per:
        tables.append(perm[i:i + b])
        i += b
    max_blocks = max(blocks_per)
    bt = torch.tensor([t + [0] * (max_blocks - len(t)) for t in tables], dtype=torch.int32)
    q_nope = torch.randn(n, H, NOPE, generator=g, dtype=torch.float64)
    q_pe = torch.randn(n, H, ROPE, generator=g, dtype=torch.float64)
    w_kv_b = torch.randn(H * (NOPE + V), R, generator=g, dtype=torch.float64) * 0.3   # kv_b_proj.weight
    return kv, tables, bt, q_nope, q_pe, w_kv_b


def _naive(kv, tables, ctx_lens, q_nope, q_pe, w_kv_b, block_size, scale):
    """float64, per sequence: k = [c_kv W_UK^T, k_pe], v = c_kv W_UV^T, softmax(q k^T) v -> [n, H, V]."""
    out = []
    for i, c in enumerate(ctx_lens):
        slots = [tables[i][p // block_size] * block_size + p % block_size for p in range(c)]
        lat = kv[slots]                                                # [c, R + ROPE] contiguous
        kvb = (lat[:, :R] @ w_kv_b.T).view(c, H, NOPE + V)
        k = torch.cat([kvb[..., :NOPE], lat[:, None, R:].expand(c, H, ROPE)], -1)    # [c, H, qk]
        q = torch.cat([q_nope[i], q_pe[i]], -1)                                      # [H, qk]
        p = (torch.einsum("hd,chd->hc", q, k) * scale).softmax(-1)
        out.append(torch.einsum("hc,chv->hv", p, kvb[..., NOPE:]))
    return torch.stack(out)


def _absorb(q_nope, q_pe, w_kv_b):
    w = w_kv_b.view(H, NOPE + V, R)
    return torch.cat([torch.einsum("nhd,hdr->nhr", q_nope, w[:, :NOPE]), q_pe], -1), w[:, NOPE:]


@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_reference_equals_naive_attention(block_size):
    ctx = [1, 7, 16, 23]
    scale = (NOPE + ROPE) ** -0.5
    kv, tables, bt, q_nope, q_pe, w = _setup(ctx, block_size)
    q, w_uv = _absorb(q_nope, q_pe, w)
    o_lat = mla_decode(q, kv, bt, torch.tensor(ctx), scale, R, block_size)
    got = torch.einsum("nhr,hvr->nhv", o_lat, w_uv)
    torch.testing.assert_close(got, _naive(kv, tables, ctx, q_nope, q_pe, w, block_size, scale), rtol=1e-10, atol=1e-10)


def test_reference_ignores_junk_beyond_context():
    ctx = [5, 9]
    kv, tables, bt, q_nope, q_pe, w = _setup(ctx, 4)
    q, _ = _absorb(q_nope, q_pe, w)
    a = mla_decode_reference(q, kv, bt, torch.tensor(ctx), 0.3, R, 4)
    kv2 = kv.clone()
    used = {tables[i][p // 4] * 4 + p % 4 for i, c in enumerate(ctx) for p in range(c)}
    for s in range(kv.shape[0]):
        if s not in used:
            kv2[s] = 1e6                                               # junk that would dominate a softmax
    b = mla_decode_reference(q, kv2, bt, torch.tensor(ctx), 0.3, R, 4)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_bad_input_names_the_problem():
    kv, _, bt, q_nope, q_pe, w = _setup([3], 4)
    q, _ = _absorb(q_nope, q_pe, w)
    with pytest.raises(ValueError, match="context_lens"):
        mla_decode(q, kv, bt, torch.tensor([3, 3]), 1.0, R, 4)
    with pytest.raises(ValueError, match="block_size"):
        mla_decode(q, kv, bt, torch.tensor([3]), 1.0, R, 5)
    with pytest.raises(ValueError, match="backend"):
        mla_decode(q, kv, bt, torch.tensor([3]), 1.0, R, 4, backend="cuda")


def test_num_splits_depends_on_shapes_only():
    assert default_num_splits(1, 16, 4096) > 1                   # batch 1: split the context
    assert default_num_splits(256, 128, 4096) == 1               # many rows fill the GPU already
    assert default_num_splits(1, 16, 8) == 1                     # never a split shorter than a tile


_INTERPRETED = textwrap.dedent("""
    import torch, sys
    sys.path.insert(0, {tests!r})
    from test_kernels_mla import _setup, _absorb, R
    from dsv3.kernels.mla_decode import mla_decode_reference, mla_decode_triton
    # int32 and int64 metadata (the engine passes int64 context lengths: positions + 1)
    for block_size, ctx, splits, itype in [(4, [1, 7, 40], 3, torch.int32), (16, [33, 5], 1, torch.int64),
                                           (1, [19], 4, torch.int64)]:
        kv, tables, bt, q_nope, q_pe, w = _setup(ctx, block_size)
        q, _ = _absorb(q_nope, q_pe, w)
        q, kv, bt = q.float(), kv.float(), bt.to(itype)
        ref = mla_decode_reference(q, kv, bt, torch.tensor(ctx, dtype=itype), 0.25, R, block_size)
        got = mla_decode_triton(q, kv, bt, torch.tensor(ctx, dtype=itype), 0.25, R, block_size, splits)
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    print("ok")
""")


def test_triton_kernel_in_interpreter_matches_reference():
    """The kernel's indexing, masking, split bounds and combine, run by Triton's CPU interpreter."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    code = _INTERPRETED.format(tests=os.path.dirname(__file__))
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    if "ok" not in res.stdout:
        pytest.fail(f"interpreted Triton kernel failed:\n{res.stdout}\n{res.stderr[-3000:]}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_matches_reference_on_gpu(dtype):
    ctx = [1, 17, 100, 333]
    kv, tables, bt, q_nope, q_pe, w = _setup(ctx, 16)
    q, _ = _absorb(q_nope, q_pe, w)
    q, kv, bt = q.to("cuda", dtype), kv.to("cuda", dtype), bt.cuda()
    lens = torch.tensor(ctx, device="cuda", dtype=torch.int32)
    ref = mla_decode(q.float(), kv.float(), bt, lens, 0.25, R, 16, backend="reference")
    got = mla_decode(q, kv, bt, lens, 0.25, R, 16, backend="triton").float()
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got, ref, rtol=tol, atol=tol)
