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
    """Per-forward metadata; ``attend`` writes the new latents and runs attention per sequence.

    When every sequence brings at most ``MAX_BATCHED_QUERIES`` tokens (decoding, and verifying
    speculative drafts), attention runs for all of them at once over padded ``[B, T_max]`` latents;
    longer prompt chunks go one sequence at a time.
    """

    MAX_BATCHED_QUERIES = 16

    def __init__(self, cache: PagedLatentCache, write_slots: torch.Tensor, seqs: list[SeqSlice]):
        self.cache, self.write_slots, self.seqs = cache, write_slots, seqs
        self.batched = all(s.q_len <= self.MAX_BATCHED_QUERIES for s in seqs)
        if self.batched:
            dev = write_slots.device
            B, Q = len(seqs), max(s.q_len for s in seqs)
            T = max(len(s.context_slots) for s in seqs)
            idx = torch.zeros(B, T, dtype=torch.long, device=dev)                # context slots, padded
            rows = torch.zeros(B, Q, dtype=torch.long, device=dev)               # query rows of the packed batch
            valid = torch.zeros(B, Q, dtype=torch.bool, device=dev)
            ctx_len = torch.zeros(B, 1, 1, dtype=torch.long, device=dev)
            q_len = torch.zeros(B, 1, 1, dtype=torch.long, device=dev)
            for i, s in enumerate(seqs):
                idx[i, : len(s.context_slots)] = s.context_slots
                rows[i, : s.q_len] = torch.arange(s.q_start, s.q_start + s.q_len, device=dev)
                valid[i, : s.q_len] = True
                ctx_len[i], q_len[i] = len(s.context_slots), s.q_len
            qi = torch.arange(Q, device=dev)[None, :, None]
            t = torch.arange(T, device=dev)[None, None, :]
            # query i of a sequence sits at position ctx_len - q_len + i and sees keys up to it
            mask = (t <= ctx_len - q_len + qi) & (qi < q_len)
            mask[:, :, 0] |= ~valid  # padded query rows look at one key (no all -inf row); discarded
            self.padded_idx, self.q_rows, self.q_valid, self.padded_mask = idx, rows, valid, mask

    def attend(self, mla, q_nope, q_pe, c_kv, k_pe, start_pos: int, absorb: bool) -> torch.Tensor:
        """q_nope [1,N,H,nope], q_pe [1,N,H,rope], new c_kv [1,N,r], k_pe [1,N,rope] -> [1,N,H,v]."""
        layer = mla.layer_idx
        store_c, store_k = self.cache.c_kv[layer], self.cache.k_pe[layer]
        store_c[self.write_slots] = c_kv[0].to(store_c.dtype)
        store_k[self.write_slots] = k_pe[0].to(store_k.dtype)
        if self.batched:
            # Absorbed attention for all sequences at once: [B,Q,H,*] queries over [B,T,*] latents.
            out = mla.absorbed_attention(q_nope[0][self.q_rows], q_pe[0][self.q_rows],
                                         store_c[self.padded_idx], store_k[self.padded_idx], self.padded_mask)
            return out[self.q_valid].unsqueeze(0)                                # [1,N,H,v], packed order
        outs = []
        for s in self.seqs:
            q = slice(s.q_start, s.q_start + s.q_len)
            outs.append(mla.attend(q_nope[:, q], q_pe[:, q], store_c[s.context_slots][None],
                                   store_k[s.context_slots][None], absorb))
        return torch.cat(outs, dim=1)
