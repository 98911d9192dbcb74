"""Runs packed batches through the model (or its MTP module) over the paged latent cache.

The new tokens of all scheduled sequences are packed into one row ``[1, N]`` with explicit
positions; :class:`PagedBatch` routes each layer's attention through the sequences' block tables.
When every sequence brings at most ``max_row_queries`` tokens (decoding, verifying speculative
drafts) each token is an attention row of its own over the paged cache; longer prompt chunks are
attended sequence by sequence, over the cache in blocks of ``attention_block`` positions (the working
set of a chunk does not grow with its context). When static steps are enabled (:class:`dsv3.engine.cuda_graph.CUDAGraphDecoder`:
CUDA graphs and/or ``torch.compile``), every step whose sequences bring at most its
``max_query_len`` tokens (decoding, verifying drafts, MTP drafting) runs there instead, through the
same model forward.
"""

from __future__ import annotations

import torch

from ..model import Transformer
from .paged_cache import PagedBatch, PagedLatentCache, SeqSlice

# One sequence's share of a forward: (its new tokens, position of the first, its block table).
Item = tuple[list[int], int, list[int]]


class ModelRunner:
    """Packs items into one forward. ``max_row_queries``: the most new tokens a sequence may bring
    for the batch to run as attention rows (the speculative verify length fits comfortably).
    ``attention_block``: cached positions per key block when prompt chunks attend (512 keeps a
    score tile of 128 queries x 512 keys x 4 heads in about 1 MiB of cache)."""

    def __init__(self, model: Transformer, cache: PagedLatentCache, max_row_queries: int = 16,
                 attention_block: int = 512):
        if attention_block < 1:
            raise ValueError(f"attention_block must be >= 1, got {attention_block}")
        self.model, self.cache, self.max_row_queries = model, cache, max_row_queries
        self.attention_block = attention_block
        self.device = model.embed_tokens.weight.device
        self.graphs = None      # a CUDAGraphDecoder, set by the engine (cuda_graphs or compile)

    def _pack(self, items: list[Item]) -> tuple[torch.Tensor, torch.Tensor, PagedBatch, list[slice]]:
        """-> input_ids [1, N], positions [N], the attention metadata, each item's slice of the N rows."""
        bs = self.cache.block_size
        ids, pos, write, rows = [], [], [], []
        as_rows = all(len(toks) <= self.max_row_queries for toks, _, _ in items)
        tables, seqs = [], []
        for toks, start, table in items:
            end = start + len(toks)
            rows.append(slice(len(ids), len(ids) + len(toks)))
            if as_rows:
                tables += [table] * len(toks)
            else:
                blocks = self.cache.key_blocks(table, end, self.attention_block)
                ctx = None  # slot indices only when some block is not a plain view of the cache
                if any(first is None for _, _, first in blocks):
                    ctx = torch.tensor(self.cache.slots(table, 0, end), dtype=torch.long, device=self.device)
                seqs.append(SeqSlice(len(ids), len(toks), ctx, blocks))
            ids += toks
            pos += range(start, end)
            write += [table[p // bs] * bs + p % bs for p in range(start, end)]
        # One host->device copy for the three per-token lists.
        ids_pos_write = torch.tensor([ids, pos, write], dtype=torch.long, device=self.device)
        input_ids, positions, write_slots = ids_pos_write
        if as_rows:
            width = max(p // bs for p in pos) + 1           # blocks the longest row needs
            bt = torch.tensor([t[:width] + [0] * (width - len(t[:width])) for t in tables],
                              dtype=torch.int32, device=self.device)
            meta = PagedBatch(self.cache, write_slots, block_tables=bt, context_lens=positions + 1)
        else:
            meta = PagedBatch(self.cache, write_slots, seqs)
        return input_ids[None], positions, meta, rows

    @torch.inference_mode()
    def forward(self, items: list[Item]) -> list[torch.Tensor]:
        """Main model over each item's tokens -> per item the final normed hidden states [n, D]."""
        if self.graphs is not None and self.graphs.fits(items):
            return list(self.graphs.run(items).split([len(toks) for toks, _, _ in items]))
        input_ids, positions, meta, rows = self._pack(items)
        h, _, _ = self.model.hidden_states(input_ids, cache=meta, absorb=True, positions=positions)
        return [h[0, r] for r in rows]

    @torch.inference_mode()
    def forward_mtp(self, items: list[Item], hidden: list[torch.Tensor]) -> list[torch.Tensor]:
        """The (first) MTP module: item tokens are t_{i+1}, ``hidden`` the matching h_i [n, D]
        -> per item the module's hidden states [n, D] (before its norm). Writes the MTP cache layer."""
        if self.graphs is not None and self.graphs.fits(items):
            return list(self.graphs.run_mtp(items, torch.cat(hidden)).split([len(toks) for toks, _, _ in items]))
        input_ids, positions, meta, rows = self._pack(items)
        out = self.model.mtp_states(input_ids, torch.cat(hidden)[None], positions, cache=meta, absorb=True)
        return [out[0, r] for r in rows]

    @torch.inference_mode()
    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(h).float()

    @torch.inference_mode()
    def mtp_logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(self.model.mtp[0].norm(h)).float()
