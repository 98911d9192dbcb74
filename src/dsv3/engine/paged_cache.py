"""The paged latent cache and the attention that reads it.

Storage per layer is ``c_kv [num_blocks * block_size, kv_lora_rank]`` and ``k_pe [.., qk_rope_head_dim]``:
only MLA's normalized latent and rotated shared key, never per-head keys or values. A forward pass of
the engine packs the new tokens of every scheduled sequence into one row ``[1, N]``;
:class:`PagedBatch` tells each layer where those tokens go (slots) and which cached positions each
sequence attends over, and implements the ``cache.attend`` protocol of :class:`dsv3.model.mla.MLA`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import ModelConfig


class PagedLatentCache:
    """``num_layers`` layers of ``num_blocks`` blocks of ``block_size`` latent slots."""

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int, num_layers: int,
                 dtype: torch.dtype, device: torch.device):
        self.block_size, self.num_blocks = block_size, num_blocks
        n = num_blocks * block_size
        self.c_kv = torch.zeros(num_layers, n, config.kv_lora_rank, dtype=dtype, device=device)
        self.k_pe = torch.zeros(num_layers, n, config.qk_rope_head_dim, dtype=dtype, device=device)

    def slots(self, table: list[int], start: int, end: int) -> list[int]:
        """Slot indices of positions ``[start, end)`` of a sequence with block table ``table``."""
        bs = self.block_size
        return [table[p // bs] * bs + p % bs for p in range(start, end)]

    def nbytes(self) -> int:
        return self.c_kv.numel() * self.c_kv.element_size() + self.k_pe.numel() * self.k_pe.element_size()


@dataclass
class SeqSlice:
    """One sequence's part of a packed batch: query tokens ``[q_start, q_start+q_len)`` of the row,
    attending over ``context_slots`` (its positions ``0..ctx_len-1``, the queries being the last)."""

    q_start: int
    q_len: int
    context_slots: torch.Tensor  # [ctx_len] long


class PagedBatch:
    """Per-forward metadata; ``attend`` writes the new latents and runs attention per sequence."""

    def __init__(self, cache: PagedLatentCache, write_slots: torch.Tensor, seqs: list[SeqSlice]):
        self.cache, self.write_slots, self.seqs = cache, write_slots, seqs
        self.decode_only = all(s.q_len == 1 for s in seqs)
        if self.decode_only:
            # One padded gather for the whole batch: [B, T_max] slots and a validity mask.
            T = max(len(s.context_slots) for s in seqs)
            idx = torch.zeros(len(seqs), T, dtype=torch.long, device=write_slots.device)
            mask = torch.zeros(len(seqs), 1, T, dtype=torch.bool, device=write_slots.device)
            for i, s in enumerate(seqs):
                idx[i, : len(s.context_slots)] = s.context_slots
                mask[i, 0, : len(s.context_slots)] = True
            self.padded_idx, self.padded_mask = idx, mask

    def attend(self, mla, q_nope, q_pe, c_kv, k_pe, start_pos: int, absorb: bool) -> torch.Tensor:
        """q_nope [1,N,H,nope], q_pe [1,N,H,rope], new c_kv [1,N,r], k_pe [1,N,rope] -> [1,N,H,v]."""
        layer = mla.layer_idx
        store_c, store_k = self.cache.c_kv[layer], self.cache.k_pe[layer]
        store_c[self.write_slots] = c_kv[0].to(store_c.dtype)
        store_k[self.write_slots] = k_pe[0].to(store_k.dtype)
        if self.decode_only:
            # Absorbed attention for all sequences at once: [B,1,H,*] queries over [B,T,*] latents.
            out = mla.absorbed_attention(q_nope[0].unsqueeze(1), q_pe[0].unsqueeze(1),
                                         store_c[self.padded_idx], store_k[self.padded_idx], self.padded_mask)
            return out.transpose(0, 1)                                           # [1,B,H,v]
        outs = []
        for s in self.seqs:
            q = slice(s.q_start, s.q_start + s.q_len)
            outs.append(mla.attend(q_nope[:, q], q_pe[:, q], store_c[s.context_slots][None],
                                   store_k[s.context_slots][None], absorb))
        return torch.cat(outs, dim=1)
