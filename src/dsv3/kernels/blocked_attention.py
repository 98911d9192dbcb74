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
"""

from __future__ import annotations

import math
from typing import Iterable

import torch

LOG2E = math.log2(math.e)
# Query rows per tile: 128 queries x 512 keys x 4 heads x 4 bytes = 1 MiB, about one core's L2.
DEFAULT_Q_TILE = 128


def blocked_attention(q: torch.Tensor, blocks: Iterable[tuple[torch.Tensor, torch.Tensor, int]], scale: float,
                      q_start: int, q_tile: int = DEFAULT_Q_TILE) -> torch.Tensor:
    """Causal softmax attention, one key block at a time.

    Args:
        q: ``[G, S, d]`` queries (G groups, e.g. heads); query ``i`` sits at position ``q_start + i``.
        blocks: ``(k, v, k_start)`` in any order, ``k [G or 1, T_b, d]``, ``v [G or 1, T_b, dv]`` (the same
            leading size), key ``j`` of the block at position ``k_start + j``. A query sees a key when the
            key's position is <= its own. Blocks may be generated lazily (decompressed per block).
        scale: multiplies the scores before the softmax.
        q_start: position of the first query.
        q_tile: queries per score tile (bounds the working set).

    Returns:
        ``[G, S, dv]`` in ``q``'s dtype. The softmax runs in fp32 (or wider) whatever the input dtype.
    """
    if q.dim() != 3:
        raise ValueError(f"blocked_attention needs q [G, S, d], got {tuple(q.shape)}")
    if q_tile < 1:
        raise ValueError(f"q_tile must be >= 1, got {q_tile}")
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
        if k.dim() != 3 or v.dim() != 3 or k.shape[0] != v.shape[0] or k.shape[0] not in (1, G) \
                or k.shape[-1] != d or k.shape[1] != v.shape[1]:
            raise ValueError(f"key block {tuple(k.shape)} / value block {tuple(v.shape)} do not fit q "
                             f"{(G, S, d)}: need k [G or 1, T_b, {d}] and v [same, T_b, dv]")
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
