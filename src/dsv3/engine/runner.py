"""Runs one scheduled batch through the model over the paged cache and samples next tokens.

The new tokens of all scheduled sequences are packed into one row ``[1, N]`` with explicit
positions; :class:`PagedBatch` routes each layer's attention through the block tables. Logits are
computed only for sequences whose last scheduled token is their newest one (a finished prompt or a
decode step) — a prompt chunk in the middle needs none.
"""

from __future__ import annotations

import torch

from ..model import Transformer
from .paged_cache import PagedBatch, PagedLatentCache, SeqSlice
from .sampling import SampleOutput, penalty_inputs, sample
from .sequence import Sequence


class ModelRunner:
    def __init__(self, model: Transformer, cache: PagedLatentCache):
        self.model, self.cache = model, cache
        self.device = model.embed_tokens.weight.device

    @torch.inference_mode()
    def run(self, batch: list[tuple[Sequence, int]]) -> tuple[list[Sequence], SampleOutput | None]:
        """Compute ``n`` more tokens of each sequence; returns the sequences that got a next token
        sampled (in order) and the sample."""
        ids, pos, write, slices, last_rows, to_sample = [], [], [], [], [], []
        for seq, n in batch:
            start, end = seq.num_computed, seq.num_computed + n
            toks = seq.tokens
            q_start = len(ids)
            ids += toks[start:end]
            pos += range(start, end)
            write += self.cache.slots(seq.block_table, start, end)
            ctx = torch.tensor(self.cache.slots(seq.block_table, 0, end), dtype=torch.long, device=self.device)
            slices.append(SeqSlice(q_start, n, ctx))
            if end == len(seq):
                last_rows.append(len(ids) - 1)
                to_sample.append(seq)
        meta = PagedBatch(self.cache, torch.tensor(write, dtype=torch.long, device=self.device), slices)
        input_ids = torch.tensor([ids], device=self.device)
        positions = torch.tensor(pos, device=self.device)
        h, _, _ = self.model.hidden_states(input_ids, cache=meta, absorb=True, positions=positions)
        for seq, n in batch:
            seq.num_computed += n
        if not to_sample:
            return [], None
        logits = self.model.lm_head(h[0, last_rows]).float()                 # [B, V]
        params = [s.params for s in to_sample]
        counts = mask = None
        if any(p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0 for p in params):
            counts, mask = penalty_inputs([s.prompt for s in to_sample], [s.output for s in to_sample],
                                          logits.shape[-1], device=self.device)
        out = sample(logits, params, [s.generator for s in to_sample], counts, mask)
        return to_sample, out
