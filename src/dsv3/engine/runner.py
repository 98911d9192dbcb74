"""Runs packed batches through the model (or its MTP module) over the paged latent cache.

The new tokens of all scheduled sequences are packed into one row ``[1, N]`` with explicit
positions; :class:`PagedBatch` routes each layer's attention through the sequences' block tables.
"""

from __future__ import annotations

import torch

from ..model import Transformer
from .paged_cache import PagedBatch, PagedLatentCache, SeqSlice

# One sequence's share of a forward: (its new tokens, position of the first, its block table).
Item = tuple[list[int], int, list[int]]


class ModelRunner:
    def __init__(self, model: Transformer, cache: PagedLatentCache):
        self.model, self.cache = model, cache
        self.device = model.embed_tokens.weight.device

    def _pack(self, items: list[Item]) -> tuple[torch.Tensor, torch.Tensor, PagedBatch, list[slice]]:
        ids, pos, write, slices, rows = [], [], [], [], []
        for toks, start, table in items:
            end = start + len(toks)
            rows.append(slice(len(ids), len(ids) + len(toks)))
            slices.append(SeqSlice(len(ids), len(toks), torch.tensor(self.cache.slots(table, 0, end),
                                                                     dtype=torch.long, device=self.device)))
            ids += toks
            pos += range(start, end)
            write += self.cache.slots(table, start, end)
        meta = PagedBatch(self.cache, torch.tensor(write, dtype=torch.long, device=self.device), slices)
        return (torch.tensor([ids], device=self.device), torch.tensor(pos, device=self.device), meta, rows)

    @torch.inference_mode()
    def forward(self, items: list[Item]) -> list[torch.Tensor]:
        """Main model over each item's tokens -> per item the final normed hidden states [n, D]."""
        input_ids, positions, meta, rows = self._pack(items)
        h, _, _ = self.model.hidden_states(input_ids, cache=meta, absorb=True, positions=positions)
        return [h[0, r] for r in rows]

    @torch.inference_mode()
    def forward_mtp(self, items: list[Item], hidden: list[torch.Tensor]) -> list[torch.Tensor]:
        """The (first) MTP module: item tokens are t_{i+1}, ``hidden`` the matching h_i [n, D]
        -> per item the module's hidden states [n, D] (before its norm). Writes the MTP cache layer."""
        input_ids, positions, meta, rows = self._pack(items)
        module = self.model.mtp[0]
        cos, sin = self.model.rope(positions)
        out = module(torch.cat(hidden)[None], self.model.embed_tokens(input_ids), cos, sin, cache=meta, absorb=True)
        return [out[0, r] for r in rows]

    @torch.inference_mode()
    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(h).float()

    @torch.inference_mode()
    def mtp_logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(self.model.mtp[0].norm(h)).float()
