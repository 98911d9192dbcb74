"""Absorbed MLA decode attention over the paged latent cache.

Each query row (a decoding token, or one of the tokens a speculative verification step checks) has
already been absorbed: ``q = [q_nope @ W_UK, rotated q_pe]`` per head, ``[H, r + rope]``. The cache of
one layer is ``kv [num_slots, r + rope]`` (normalized ``c_kv`` then rotated ``k_pe``, FlashMLA's
layout), slot ``block * block_size + offset``; a row sees the first ``context_lens[n]`` positions of
its sequence, found through its block table. Per head (DESIGN.md §2, absorbed path):

    scores[t] = (q[:r] . c_kv[t] + q[r:] . k_pe[t]) * scale      (= q . kv[t], one dot product)
    o_lat     = softmax_t(scores) @ c_kv                          fp32 softmax, [H, r] (latent space)

The caller maps ``o_lat`` back with ``W_UV``. :func:`mla_decode` is the one entry point:
``reference`` is the pure-PyTorch definition (any device; what the CPU engine runs), ``triton`` a
split-KV (flash-decoding) Triton kernel for CUDA: each program takes one row, a block of heads and
one slice of the context with an online softmax, and a small combine merges the slices by their
log-sum-exp. The number of slices is a launch constant, so the kernel has static shapes and can be
captured in a CUDA graph; the slice length is derived from ``context_lens`` on the device.
"""

from __future__ import annotations

import torch

BACKENDS = ("auto", "reference", "triton")

try:  # Triton is optional: CPU-only installs run the reference.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None


def _check(q: torch.Tensor, kv: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
           kv_lora_rank: int, block_size: int) -> None:
    if q.dim() != 3 or kv.dim() != 2 or q.shape[-1] != kv.shape[-1]:
        raise ValueError(f"mla_decode needs q [N, H, r+rope] and kv [slots, r+rope] with the same last dim, "
                         f"got q {tuple(q.shape)} and kv {tuple(kv.shape)}")
    if not 0 < kv_lora_rank < kv.shape[-1]:
        raise ValueError(f"kv_lora_rank={kv_lora_rank} must be in (0, {kv.shape[-1]}) (the width of kv)")
    if block_tables.dim() != 2 or block_tables.shape[0] != q.shape[0]:
        raise ValueError(f"block_tables must be [N={q.shape[0]}, max_blocks], got {tuple(block_tables.shape)}")
    if tuple(context_lens.shape) != (q.shape[0],):
        raise ValueError(f"context_lens must be [N={q.shape[0]}], got {tuple(context_lens.shape)}")
    if block_size < 1 or kv.shape[0] % block_size:
        raise ValueError(f"kv has {kv.shape[0]} slots, not a multiple of block_size={block_size}")


def mla_decode_reference(q: torch.Tensor, kv: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
                         scale: float, kv_lora_rank: int, block_size: int) -> torch.Tensor:
    """The definition, in plain PyTorch: q [N,H,r+rope], kv [slots, r+rope] -> o_lat [N,H,r] (q's dtype).

    Gathers every row's ``max_blocks * block_size`` slots, so callers trim ``block_tables`` to the
    blocks actually in use. ``context_lens`` must be >= 1 (a padding row reads one slot of any block).
    """
    N, H, _ = q.shape
    T = block_tables.shape[1] * block_size
    offsets = torch.arange(block_size, device=kv.device)
    slots = (block_tables.long()[:, :, None] * block_size + offsets).view(N, T)     # [N, T]
    keys = kv[slots]                                                                # [N, T, r+rope]
    acc_dtype = torch.promote_types(q.dtype, torch.float32)                         # softmax in >= fp32
    scores = torch.bmm(q, keys.transpose(1, 2)).to(acc_dtype) * scale               # [N, H, T]
    beyond = torch.arange(T, device=kv.device) >= context_lens.view(N, 1, 1)       # [N, 1, T]
    p = scores.masked_fill_(beyond, float("-inf")).softmax(dim=-1).to(kv.dtype)
    return torch.bmm(p, keys[..., :kv_lora_rank]).to(q.dtype)                       # [N, H, r]


# ------------------------------------------------------------------------------------------ Triton
if triton is not None:

    @triton.jit
    def _mla_decode_split_kernel(Q, KV, BT, CL, ACC, MAX, SUM,
                                 stride_qn, stride_qh, stride_kv, stride_btn,
                                 stride_an, stride_as, stride_ah, stride_mn, stride_ms,
                                 H, scale,
                                 R: tl.constexpr, P: tl.constexpr, PAGE: tl.constexpr,
                                 BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
                                 BLOCK_T: tl.constexpr, NUM_SPLITS: tl.constexpr, PRECISION: tl.constexpr):
        n = tl.program_id(0)
        head_block = tl.program_id(1)
        split = tl.program_id(2)
        ctx = tl.load(CL + n)
        # Each split owns a whole number of BLOCK_T tiles of this row's context.
        per_split = tl.cdiv(tl.cdiv(ctx, NUM_SPLITS), BLOCK_T) * BLOCK_T
        start = split * per_split
        end = tl.minimum(start + per_split, ctx)

        heads = head_block * BLOCK_H + tl.arange(0, BLOCK_H)
        r = tl.arange(0, BLOCK_R)
        p = tl.arange(0, BLOCK_P)
        h_ok = heads < H
        q_row = Q + n * stride_qn + heads[:, None] * stride_qh
        q_lat = tl.load(q_row + r[None, :], mask=h_ok[:, None] & (r[None, :] < R), other=0.0)        # [BH, BR]
        q_pe = tl.load(q_row + R + p[None, :], mask=h_ok[:, None] & (p[None, :] < P), other=0.0)     # [BH, BP]

        m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
        acc = tl.zeros([BLOCK_H, BLOCK_R], dtype=tl.float32)
        for t0 in range(start, end, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            t_ok = t < end
            block = tl.load(BT + n * stride_btn + t // PAGE, mask=t_ok, other=0)
            slot = (block.to(tl.int64) * PAGE + t % PAGE) * stride_kv
            c = tl.load(KV + slot[:, None] + r[None, :], mask=t_ok[:, None] & (r[None, :] < R), other=0.0)      # [BT, BR]
            kp = tl.load(KV + slot[:, None] + R + p[None, :], mask=t_ok[:, None] & (p[None, :] < P), other=0.0)  # [BT, BP]
            s = tl.dot(q_lat, tl.trans(c), input_precision=PRECISION)
            s += tl.dot(q_pe, tl.trans(kp), input_precision=PRECISION)                                        # [BH, BT]
            # fp32 whatever the scale arrives as (torch.compile passes Python floats as fp64)
            s = tl.where(t_ok[None, :], (s * scale).to(tl.float32), float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp(m_i - m_new)
            e = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(e, axis=1)
            acc = acc * alpha[:, None] + tl.dot(e.to(c.dtype), c, input_precision=PRECISION)
            m_i = m_new

        # Unnormalized partials; an empty split leaves max -inf and sum 0, which the combine ignores.
        tl.store(ACC + n * stride_an + split * stride_as + heads[:, None] * stride_ah + r[None, :], acc,
                 mask=h_ok[:, None] & (r[None, :] < R))
        tl.store(MAX + n * stride_mn + split * stride_ms + heads, m_i, mask=h_ok)
        tl.store(SUM + n * stride_mn + split * stride_ms + heads, l_i, mask=h_ok)


def _pow2(x: int, at_least: int = 16) -> int:
    return max(at_least, 1 << (int(x) - 1).bit_length())


def default_num_splits(num_rows: int, num_heads: int, max_context: int, block_h: int = 16,
                       block_t: int = 32, device: torch.device | None = None) -> int:
    """Slices of the context per row: enough programs to fill the GPU about twice, no slice shorter
    than one tile. Depends only on shapes, so a captured graph keeps its launch grid."""
    sms = 132
    if device is not None and device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    programs = num_rows * -(-num_heads // block_h)
    return max(1, min(-(-2 * sms // programs), -(-max_context // block_t), 64))


def mla_decode_triton(q: torch.Tensor, kv: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
                      scale: float, kv_lora_rank: int, block_size: int, num_splits: int | None = None) -> torch.Tensor:
    """The split-KV Triton kernel plus its log-sum-exp combine; same contract as the reference."""
    if triton is None:
        raise RuntimeError("mla_decode backend 'triton' needs the triton package")
    N, H, W = q.shape
    R, P = kv_lora_rank, W - kv_lora_rank
    if q.stride(-1) != 1 or kv.stride(-1) != 1:
        raise ValueError("mla_decode (triton) needs q and kv contiguous in their last dim")
    block_h, block_t = 16, 32 if R <= 256 else 16
    if num_splits is None:
        num_splits = default_num_splits(N, H, block_tables.shape[1] * block_size, block_h, block_t, q.device)
    acc = torch.empty(N, num_splits, H, R, dtype=torch.float32, device=q.device)
    mx = torch.empty(N, num_splits, H, dtype=torch.float32, device=q.device)
    sm = torch.empty_like(mx)
    grid = (N, triton.cdiv(H, block_h), num_splits)
    # fp32 inputs would otherwise go through TF32 tensor cores (10-bit mantissa).
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    _mla_decode_split_kernel[grid](
        q, kv, block_tables, context_lens, acc, mx, sm,
        q.stride(0), q.stride(1), kv.stride(0), block_tables.stride(0),
        acc.stride(0), acc.stride(1), acc.stride(2), mx.stride(0), mx.stride(1),
        H, float(scale),
        R=R, P=P, PAGE=block_size, BLOCK_H=block_h, BLOCK_R=_pow2(R), BLOCK_P=_pow2(P), BLOCK_T=block_t,
        NUM_SPLITS=num_splits, PRECISION=precision, num_warps=4)
    # Combine: o = sum_s e^{m_s - M} acc_s / sum_s e^{m_s - M} l_s, with M the max over splits.
    weight = torch.exp(mx - mx.amax(dim=1, keepdim=True))                                   # [N, S, H]
    out = (acc * weight[..., None]).sum(dim=1) / (sm * weight).sum(dim=1)[..., None]        # [N, H, R]
    return out.to(q.dtype)


def mla_decode(q: torch.Tensor, kv: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
               scale: float, kv_lora_rank: int, block_size: int, backend: str = "auto") -> torch.Tensor:
    """Absorbed MLA attention of ``N`` query rows over the paged latent cache of one layer.

    Args:
        q: ``[N, H, r + rope]`` absorbed queries (``q_nope @ W_UK`` then rotated ``q_pe``).
        kv: ``[num_slots, r + rope]`` one layer's cache (normalized ``c_kv`` then rotated ``k_pe``).
        block_tables: ``[N, max_blocks]`` int, row ``n``'s cache blocks in position order.
        context_lens: ``[N]`` int >= 1, how many positions row ``n`` attends over (itself included).
        scale: softmax scale. kv_lora_rank: ``r``. block_size: slots per cache block.
        backend: ``auto`` (Triton on CUDA when installed, else the reference), ``reference``, ``triton``.

    Returns:
        ``o_lat [N, H, r]``, the attention output in latent space (apply ``W_UV`` for the heads' values).
    """
    if backend not in BACKENDS:
        raise ValueError(f"mla_decode backend must be one of {BACKENDS}, got {backend!r}")
    _check(q, kv, block_tables, context_lens, kv_lora_rank, block_size)
    if backend == "auto":
        backend = "triton" if (q.is_cuda and triton is not None) else "reference"
    if backend == "triton":
        return mla_decode_triton(q, kv, block_tables, context_lens, scale, kv_lora_rank, block_size)
    return mla_decode_reference(q, kv, block_tables, context_lens, scale, kv_lora_rank, block_size)
