"""The paged latent cache and the attention that reads it.

Storage per layer is one tensor ``kv [num_slots, kv_lora_rank + qk_rope_head_dim]``: MLA's normalized
latent ``c_kv`` followed by the rotated shared key ``k_pe`` (FlashMLA's layout), never per-head keys
or values; ``c_kv`` and ``k_pe`` are views of it. Slot ``block * block_size + offset`` holds position
``i * block_size + offset`` of the sequence whose block table has ``block`` at index ``i``.

A forward pass of the engine packs the new tokens of every scheduled sequence into one row ``[1, N]``;
:class:`PagedBatch` tells each layer where those tokens go (slots) and what each one attends over,
and implements the ``cache.attend`` protocol of :class:`dsv3.model.mla.MLA`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import ModelConfig
from ..kernels.mla_decode import mla_decode


class PagedLatentCache:
    """``num_layers`` layers of ``num_blocks`` blocks of ``block_size`` latent slots.

    One extra block past ``num_blocks`` is a scratch area the block manager never hands out: padded
    rows of a static-shape (CUDA-graph) decode step write their latents there.
    """

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int, num_layers: int,
                 dtype: torch.dtype, device: torch.device):
        self.block_size, self.num_blocks = block_size, num_blocks
        self.kv_lora_rank = config.kv_lora_rank
        n = num_blocks * block_size
        self.kv = torch.zeros(num_layers, n + block_size, config.kv_lora_rank + config.qk_rope_head_dim,
                              dtype=dtype, device=device)
        self.c_kv = self.kv[:, :n, : config.kv_lora_rank]       # [L, slots, r]    views of kv
        self.k_pe = self.kv[:, :n, config.kv_lora_rank:]        # [L, slots, rope]
        self.scratch_slot = n

    def slots(self, table: list[int], start: int, end: int) -> list[int]:
        """Slot indices of positions ``[start, end)`` of a sequence with block table ``table``."""
        bs = self.block_size
        return [table[p // bs] * bs + p % bs for p in range(start, end)]

    def nbytes(self) -> int:
        """Bytes of the usable cache (all layers, ``num_blocks`` blocks; the scratch block excluded)."""
        return self.c_kv.numel() * self.c_kv.element_size() + self.k_pe.numel() * self.k_pe.element_size()


    def key_blocks(self, table: list[int], ctx_len: int, block_len: int) -> list[tuple[int, int, int | None]]:
        """Positions ``[0, ctx_len)`` of a sequence cut into attention blocks of ``block_len`` positions:
        ``(start, end, first_slot)`` with ``first_slot`` set when the block's slots are consecutive
        (its pages follow each other in the cache; then the block is a plain view of the cache),
        None when the block must be gathered slot by slot."""
        if block_len < 1:
            raise ValueError(f"attention block length must be >= 1, got {block_len}")
        bs, out = self.block_size, []
        for start in range(0, ctx_len, block_len):
            end = min(ctx_len, start + block_len)
            pages = table[start // bs: (end - 1) // bs + 1]
            consecutive = all(b == pages[0] + i for i, b in enumerate(pages))
            out.append((start, end, pages[0] * bs + start % bs if consecutive else None))
        return out


@dataclass
class SeqSlice:
    """One sequence's part of a packed batch: query tokens ``[q_start, q_start+q_len)`` of the row,
    attending over its positions ``0..ctx_len-1`` (the queries being the last), found at
    ``context_slots`` and attended in ``key_blocks`` (see :meth:`PagedLatentCache.key_blocks`)."""

    q_start: int
    q_len: int
    context_slots: torch.Tensor | None  # [ctx_len] long; None when every key block is consecutive
    key_blocks: list[tuple[int, int, int | None]]

    @property
    def ctx_len(self) -> int:
        return self.key_blocks[-1][1]


class PagedBatch:
    """Per-forward metadata; ``attend`` writes the new latents and runs attention.

    Two forms. *Rows* (``block_tables``/``context_lens`` given): every query token is a row with its
    sequence's block table and its own context length (its position + 1), which covers decoding and
    the verification of speculative drafts (causality comes from the per-row length); attention runs
    for all rows at once through :func:`dsv3.kernels.mla_decode.mla_decode`. *Sequences* (``seqs``
    given): longer prompt chunks, attended one sequence at a time over its latents block by block
    (:meth:`dsv3.model.mla.MLA.attend_blocks`: a block is a view of the cache when its pages are
    consecutive, else a gather of that block's slots; nothing is copied for the whole context).
    """

    def __init__(self, cache: PagedLatentCache, write_slots: torch.Tensor, seqs: list[SeqSlice] | None = None,
                 block_tables: torch.Tensor | None = None, context_lens: torch.Tensor | None = None):
        if (seqs is None) == (block_tables is None):
            raise ValueError("PagedBatch needs either seqs (prompt chunks) or block_tables + context_lens (rows)")
        self.cache, self.write_slots, self.seqs = cache, write_slots, seqs
        self.block_tables, self.context_lens = block_tables, context_lens

    def attend(self, mla, q_nope, q_pe, c_kv, k_pe, start_pos: int, absorb: bool) -> torch.Tensor:
        """q_nope [1,N,H,nope], q_pe [1,N,H,rope], new c_kv [1,N,r], k_pe [1,N,rope] -> [1,N,H,v].

        Rows always run absorbed; sequences take the path with fewer FLOPs for their query count and
        context (:meth:`dsv3.model.mla.MLA.absorbed_is_cheaper`; both are exact), so ``absorb`` is
        not consulted here."""
        new = torch.cat([c_kv[0], k_pe[0]], dim=-1).to(self.cache.kv.dtype)     # [N, r+rope]
        # One write into the whole [layers, slots, r+rope] tensor by (layer, slot) index: torch.compile
        # keeps it in place. The same write through the per-layer view made inductor copy the entire
        # cache every step (functionalized view mutation): with max_model_len 2048 a compiled tiny-model
        # step at batch 8 took 122 ms instead of 6.6 ms.
        layer = torch.full_like(self.write_slots, mla.layer_idx)
        self.cache.kv.index_put_((layer, self.write_slots), new)
        kv = self.cache.kv[mla.layer_idx]                                        # [slots, r+rope]
        r = self.cache.kv_lora_rank
        if self.block_tables is not None:
            q = torch.cat([mla.absorb_query(q_nope[0]), q_pe[0]], dim=-1)        # [N,H,r+rope]
            o_lat = mla_decode(q, kv, self.block_tables, self.context_lens, mla.softmax_scale, r,
                               self.cache.block_size)                            # [N,H,r]
            return mla.absorb_output(o_lat).unsqueeze(0)                         # [1,N,H,v]
        outs = []
        for s in self.seqs:
            q = slice(s.q_start, s.q_start + s.q_len)
            # The path (naive per block, or absorbed) is chosen by FLOPs for this chunk and context.
            outs.append(mla.attend_blocks(q_nope[0, q], q_pe[0, q], self._latent_blocks(kv, s),
                                          s.ctx_len - s.q_len))                  # [q_len,H,v]
        return torch.cat(outs, dim=0).unsqueeze(0)

    def _latent_blocks(self, kv: torch.Tensor, s: SeqSlice):
        """Yield ``(c_kv [T_b, r], k_pe [T_b, rope], start)`` for one sequence's key blocks of layer ``kv``."""
        r = self.cache.kv_lora_rank
        for start, end, first in s.key_blocks:
            if first is not None:
                lat = kv[first: first + end - start]                                  # a view, no copy
            else:
                lat = kv.index_select(0, s.context_slots[start:end])                  # one block's gather
            yield lat[:, :r], lat[:, r:], start
