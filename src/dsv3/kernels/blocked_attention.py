"""Causal attention of a chunk of queries over keys that arrive block by block (online softmax).

A long prompt is prefilled in chunks; each chunk's queries attend over every position cached so far.
Materializing that as one ``[heads, chunk, context]`` score matrix, or decompressing per-head keys
and values for the whole context, costs memory linear in the context per chunk (hundreds of MB at
16K). :func:`blocked_attention` instead consumes the keys one block at a time, keeping only a running
maximum ``m``, normalizer ``l`` and unnormalized output ``acc`` per query (FlashAttention's online
softmax, here in plain PyTorch): for each key block ``K_b, V_b`` and query tile ``Q_t``

    s     = (Q_t K_b^T) * scale * log2(e)   masked where key position > query position
    m'    = max(m, rowmax(s));   p = 2^(s - m')
    l     = l * 2^(m - m') + rowsum(p)
    acc   = acc * 2^(m - m') + p V_b
    out   = acc / l                      (after the last block)

The working set is one ``[G, q_tile, key_block]`` fp32 tile plus the caller's current key block, so
memory no longer grows with the context. The result equals ``softmax(QK^T * scale) V`` up to
floating-point reassociation.

Keys may be shared by all query groups (``k [1, T_b, d]``: MLA's absorbed form, where every head
attends over the same latent), in which case the tile is one GEMM of ``[G * q_tile, d] x [d, T_b]``.

On the CPU the same result comes faster from torch's fused flash-attention kernel
(``aten._scaled_dot_product_flash_attention_for_cpu``: scores, exp and ``P V`` per tile inside one
C++ loop with vectorized exp, instead of a dozen eager ops per tile), called once per key block
(:func:`flash_blocked_attention`). It returns each block's output normalized over that block plus the
block's log-sum-exp, and blocks merge exactly (the flash-decoding combine):

    lse   = logaddexp(lse_a, lse_b)
    out   = out_a * e^(lse_a - lse) + out_b * e^(lse_b - lse)

Causality needs no mask: a key before the chunk's first query is seen by every query (one unmasked
call per block), and the chunk's own keys (positions ``q_start ..``) are gathered into one
``[G, <= S, d]`` block whose causal call is the kernel's ``is_causal`` (query ``i`` sees own key
``j <= i``, the top-left diagonal), so the kernel skips the tiles above the diagonal. The kernel wants
one head size for q, k and v: a narrower v (MLA: v 32 vs qk 96 on the tiny preset) is padded with zero
columns (and cut off the output), which costs ``P V`` FLOPs: 1.5x the attention FLOPs at MLA's tiny
head sizes (qk 96, v 32), where on a 1-thread AVX2 CPU it ties with the eager online softmax, so the
online kernel stays the default and the fused one is ``kernel="flash"``.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn.functional as F

LOG2E = math.log2(math.e)
# Query rows per tile: 128 queries x 512 keys x 4 heads x 4 bytes = 1 MiB, about one core's L2.
DEFAULT_Q_TILE = 128
KERNELS = ("online", "flash")


def blocked_attention(q: torch.Tensor, blocks: Iterable[tuple[torch.Tensor, torch.Tensor, int]], scale: float,
                      q_start: int, q_tile: int = DEFAULT_Q_TILE, kernel: str = "online") -> torch.Tensor:
    """Causal softmax attention, one key block at a time.

    Args:
        q: ``[G, S, d]`` queries (G groups, e.g. heads); query ``i`` sits at position ``q_start + i``.
        blocks: ``(k, v, k_start)`` in any order, ``k [G or 1, T_b, d]``, ``v [G or 1, T_b, dv]`` (the same
            leading size), key ``j`` of the block at position ``k_start + j``. A query sees a key when the
            key's position is <= its own. Blocks may be generated lazily (decompressed per block).
        scale: multiplies the scores before the softmax.
        q_start: position of the first query.
        q_tile: queries per score tile (bounds the working set) of the online kernel.
        kernel: ``"online"`` (the eager online softmax over ``q_tile x T_b`` tiles, any device; the
            default) or ``"flash"`` (torch's fused CPU kernel per block, :func:`flash_blocked_attention`;
            CPU tensors only). Measured on a 1-thread AVX2 CPU the two tie (benchmarks/RESULTS.md, "Long
            prefill"): the fused kernel's fusion gain is spent on the zero-padded value columns.

    Returns:
        ``[G, S, dv]`` in ``q``'s dtype. The softmax runs in fp32 (or wider) whatever the input dtype.
    """
    if q.dim() != 3:
        raise ValueError(f"blocked_attention needs q [G, S, d], got {tuple(q.shape)}")
    if q_tile < 1:
        raise ValueError(f"q_tile must be >= 1, got {q_tile}")
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if kernel == "flash":
        return flash_blocked_attention(q, blocks, scale, q_start)
    G, S, d = q.shape
    acc_dtype = torch.promote_types(q.dtype, torch.float32)
    # Scores in base 2: exp2 is about twice as fast as exp on the CPU, and log2(e) folds into the scale
    # (softmax(x) = 2^(x log2 e) / sum 2^(x log2 e)), applied to q once instead of to every tile.
    q = q * (scale * LOG2E)
    m = torch.full((G, S), float("-inf"), dtype=acc_dtype, device=q.device)      # running max (base 2)
    l = torch.zeros(G, S, dtype=acc_dtype, device=q.device)                      # running normalizer
    acc = None                                                                    # [G, S, dv]
    q_pos = torch.arange(q_start, q_start + S, device=q.device)                   # [S]
    for k, v, k_start in blocks:
        _check_block(k, v, G, S, d)
        Tb = k.shape[1]
        if Tb == 0:
            continue
        if acc is None:
            acc = torch.zeros(G, S, v.shape[-1], dtype=acc_dtype, device=q.device)
        k_end = k_start + Tb                                                      # keys [k_start, k_end)
        shared = k.shape[0] == 1
        kt = k[0].t() if shared else k.transpose(1, 2)                            # [d, Tb] or [G, d, Tb]
        for t0 in range(0, S, q_tile):
            t1 = min(S, t0 + q_tile)
            n = t1 - t0
            if k_start > q_start + t1 - 1:            # every key of the block is after every query of the tile
                continue
            # Keys past the tile's last query are skipped (on the diagonal a block is cut, not just masked).
            nk = min(k_end, q_start + t1) - k_start
            kt_t, v_t = kt[..., :nk], v[:, :nk]                                  # views
            qt = q[:, t0:t1]                                                      # [G, n, d]
            if shared:
                s = (qt.reshape(G * n, d) @ kt_t).view(G, n, nk)                 # [G, n, nk]
            else:
                s = torch.bmm(qt, kt_t)
            s = s.to(acc_dtype)
            if k_start + nk - 1 > q_start + t0:          # some key is after some query of the tile: mask
                # An additive [n, nk] bias broadcast over G (masked_fill_ with a broadcast mask is ~40x slower).
                visible = torch.arange(k_start, k_start + nk, device=q.device)[None, :] <= q_pos[t0:t1, None]
                s.add_(torch.zeros(n, nk, dtype=acc_dtype, device=q.device).masked_fill_(~visible, float("-inf")))
            m_old = m[:, t0:t1]
            m_new = torch.maximum(m_old, s.amax(dim=-1))                          # [G, n]
            # A row that has seen no visible key yet keeps m = -inf: subtract a finite number there
            # instead (its scores are all -inf, so p = 0 and alpha = 2^-inf = 0 either way).
            m_safe = m_new.clamp(min=torch.finfo(acc_dtype).min)
            p = s.sub_(m_safe[..., None]).exp2_()                                 # [G, n, nk], in place
            alpha = torch.exp2(m_old - m_safe)                                    # [G, n]
            l[:, t0:t1].mul_(alpha).add_(p.sum(dim=-1))
            acc_t = acc[:, t0:t1].mul_(alpha[..., None])                          # [G, n, dv], a view
            if shared:
                acc_t.add_((p.view(G * n, nk).to(v.dtype) @ v_t[0]).view(G, n, -1))
            elif v.dtype == acc_dtype:
                acc_t.baddbmm_(p, v_t)
            else:
                acc_t.add_(torch.bmm(p.to(v.dtype), v_t))
            m[:, t0:t1] = m_new
    if acc is None:
        raise ValueError("blocked_attention got no key blocks")
    if bool((l == 0).any()):
        raise ValueError("a query saw no key (each query must see at least the key at its own position)")
    return (acc / l[..., None]).to(q.dtype)


def _check_block(k: torch.Tensor, v: torch.Tensor, G: int, S: int, d: int) -> None:
    if k.dim() != 3 or v.dim() != 3 or k.shape[0] != v.shape[0] or k.shape[0] not in (1, G) \
            or k.shape[-1] != d or k.shape[1] != v.shape[1]:
        raise ValueError(f"key block {tuple(k.shape)} / value block {tuple(v.shape)} do not fit q "
                         f"{(G, S, d)}: need k [G or 1, T_b, {d}] and v [same, T_b, dv]")


def flash_blocked_attention(q: torch.Tensor, blocks: Iterable[tuple[torch.Tensor, torch.Tensor, int]],
                            scale: float, q_start: int) -> torch.Tensor:
    """:func:`blocked_attention` through torch's fused CPU flash-attention kernel, one call per key block.

    Same arguments and result (``q [G, S, d]``, blocks ``(k [G or 1, T_b, d], v [same, T_b, dv], start)``
    in any order -> ``[G, S, dv]``); CPU tensors of a dtype the kernel takes (fp32, fp64, bf16, fp16).
    Keys before ``q_start`` are attended block by block as they arrive; keys at ``q_start`` or later
    (the chunk's own) are collected, cut at the last query, and attended in one causal call at the end,
    so the working set is one key block plus at most ``S`` own keys, never the whole context.
    """
    if q.dim() != 3:
        raise ValueError(f"blocked_attention needs q [G, S, d], got {tuple(q.shape)}")
    if q.device.type != "cpu":
        raise ValueError(f"the flash kernel runs on CPU tensors only, got {q.device}; use kernel='online'")
    G, S, d = q.shape
    acc_dtype = torch.promote_types(q.dtype, torch.float32)
    q4 = q[None]                                                                  # [1, G, S, d]
    out = None                                                                    # [G, S, dv], acc_dtype
    lse = torch.full((G, S), float("-inf"), dtype=acc_dtype)                      # natural log
    own = []                                                                      # (k, v, start), start >= q_start
    for k, v, k_start in blocks:
        _check_block(k, v, G, S, d)
        Tb = k.shape[1]
        if Tb == 0:
            continue
        if out is None:
            out = torch.zeros(G, S, v.shape[-1], dtype=acc_dtype)
        n_past = min(Tb, q_start - k_start)                                       # keys before every query
        if n_past > 0:
            o_b, lse_b = _flash_call(q4, k[:, :n_past], v[:, :n_past], scale, causal=False)
            _merge(out, lse, o_b, lse_b)
        lo, hi = max(k_start, q_start), min(k_start + Tb, q_start + S)            # own keys, cut at the last query
        if hi > lo:
            own.append((k[:, lo - k_start:hi - k_start], v[:, lo - k_start:hi - k_start], lo))
    if out is None:
        raise ValueError("blocked_attention got no key blocks")
    if own:
        own.sort(key=lambda b: b[2])
        ks = [b[0].expand(G, -1, -1) for b in own]
        k_own = ks[0] if len(ks) == 1 else torch.cat(ks, dim=1)                  # [G, m, d], m <= S
        v_own = own[0][1] if len(own) == 1 else torch.cat([b[1].expand(G, -1, -1) for b in own], dim=1)
        m = k_own.shape[1]
        if own[0][2] == q_start and all(a[2] + a[0].shape[1] == b[2] for a, b in zip(own, own[1:])):
            # Own keys at q_start .. q_start+m-1: query i sees own keys 0..i, the kernel's top-left
            # causal mask (queries past the last own key, when m < S, see all m, as they should).
            o_b, lse_b = _flash_call(q4, k_own, v_own, scale, causal=True)
        else:  # own keys with gaps (not what the engine gives): an explicit mask over their positions
            pos = torch.cat([torch.arange(b[2], b[2] + b[0].shape[1]) for b in own])          # [m]
            visible = pos[None, :] <= torch.arange(q_start, q_start + S)[:, None]           # [S, m]
            bias = torch.zeros(S, m, dtype=q.dtype).masked_fill_(~visible, float("-inf"))
            o_b, lse_b = _flash_call(q4, k_own, v_own, scale, causal=False, bias=bias)
            # The kernel gives a row that sees no key lse 0 and output 0: mark it as having seen none.
            lse_b = lse_b.masked_fill(~visible.any(-1), float("-inf"))
        _merge(out, lse, o_b, lse_b)
    if bool(torch.isinf(lse).any()):
        raise ValueError("a query saw no key (each query must see at least the key at its own position)")
    return out.to(q.dtype)


def _flash_call(q4: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool,
                bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One fused-kernel call: q4 [1, G, S, d], k [G or 1, T, d], v [same, T, dv] -> ([G, S, dv], lse [G, S])."""
    G, d = q4.shape[1], q4.shape[-1]
    dv = v.shape[-1]
    k, v = k.expand(G, -1, -1), v.expand(G, -1, -1)     # shared keys: a stride-0 view, the kernel takes it
    if dv < d:    # the kernel wants one head size: zero value columns add nothing but FLOPs (cut below)
        v = F.pad(v, (0, d - dv))
    elif dv > d:  # zero query/key columns add nothing to the scores
        q4, k = F.pad(q4, (0, dv - d)), F.pad(k, (0, dv - d))
    o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q4, k[None], v[None], 0.0, causal, attn_mask=bias, scale=scale)                          # [1, G, S, max(d, dv)], [1, G, S]
    return o[0, ..., :dv], lse[0]


def _merge(out: torch.Tensor, lse: torch.Tensor, o_b: torch.Tensor, lse_b: torch.Tensor) -> None:
    """Fold one block's (normalized output, log-sum-exp) into the running pair, in place."""
    new = torch.logaddexp(lse, lse_b.to(lse.dtype))                              # [G, S]
    # -inf where neither side has seen a key yet: subtract a finite number there so both weights are 0.
    safe = new.clamp(min=torch.finfo(new.dtype).min)
    out.mul_(torch.exp(lse - safe)[..., None]).add_(o_b.to(out.dtype) * torch.exp(lse_b - safe)[..., None])
    lse.copy_(new)
