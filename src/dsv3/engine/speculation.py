"""MTP speculative decoding for :class:`dsv3.LLM`: DeepSeek-V3's multi-token-prediction module drafts
tokens, the main model verifies them in its next forward.

After every step the speculator catches the MTP module up on the sequence's new positions (the main
model's hidden states it has not consumed, ``Sequence.pending_hidden``) and drafts ``num_tokens``
tokens by applying the module to its own output. The engine then runs the last token plus the drafts
through the main model in one forward, and :meth:`MTPSpeculator.verify` keeps the accepted prefix
plus one token: greedy verification at temperature 0, rejection sampling otherwise, which keeps the
target distribution exactly (:func:`dsv3.engine.sampling.rejection_sample`).
"""

from __future__ import annotations

import torch

from .block_manager import BlockManager
from .runner import ModelRunner
from .sampling import greedy_verify, probs_after_processing, rejection_sample
from .sequence import Sequence


class MTPSpeculator:
    """Drafts and verification for the sequences of one engine.

    Args:
        runner: the engine's model runner (its MTP forward and heads).
        block_manager: grows a sequence's block table for the draft positions.
        num_tokens: tokens drafted per step, ``>= 1``.
        max_model_len: no drafts past this length.
    """

    def __init__(self, runner: ModelRunner, block_manager: BlockManager, num_tokens: int, max_model_len: int):
        self.runner, self.block_manager = runner, block_manager
        self.num_tokens, self.max_model_len = num_tokens, max_model_len
        self.counts = {"drafted": 0, "accepted": 0, "verify_steps": 0, "emitted": 0}

    @staticmethod
    def eligible(seq: Sequence) -> bool:
        """Whether drafts can serve this request: penalties change the distribution token by token,
        logprobs are reported per sampled token, and neither the drafts nor greedy verification see
        logits processors or a logit bias; such requests decode one token at a time."""
        p = seq.params
        return not p.uses_penalties and p.logprobs is None and not p.logits_processors and not p.logit_bias

    def verify(self, seq: Sequence, logits: torch.Tensor) -> list[int]:
        """logits ``[k+1, V]`` of the main model after the last token and each draft -> tokens to emit."""
        k = len(seq.draft)
        if seq.params.greedy:
            out = greedy_verify(seq.draft, logits)
        else:
            target = probs_after_processing(logits, [seq.params] * (k + 1))
            out = rejection_sample(seq.draft, seq.draft_probs, target, seq.generator)
        st = self.counts
        st["drafted"] += k
        st["accepted"] += len(out) - 1
        st["verify_steps"] += 1
        st["emitted"] += len(out)
        seq.draft, seq.draft_probs = [], None
        return out

    def draft(self, seqs: list[Sequence]) -> None:
        """Catch the MTP module up on every new position, then draft ``num_tokens`` tokens recursively."""
        k = self.num_tokens
        seqs = [s for s in seqs if self.eligible(s) and len(s) + k <= self.max_model_len
                and self.block_manager.grow(s.block_table, len(s) + k)]
        if not seqs:
            return
        # Depth-1 input at position i is (h_i, token i+1): all known up to num_computed - 1.
        items = [(s.tokens[s.mtp_computed + 1: s.num_computed + 1], s.mtp_computed, s.block_table) for s in seqs]
        hs = [torch.cat(s.pending_hidden) for s in seqs]
        outs = self.runner.forward_mtp(items, hs)
        last = torch.stack([o[-1] for o in outs])                              # [B, D]
        for s in seqs:
            s.mtp_computed = s.num_computed
            s.pending_hidden.clear()
        drafts: list[list[int]] = [[] for _ in seqs]
        probs: list[list[torch.Tensor]] = [[] for _ in seqs]
        for j in range(k):
            logits = self.runner.mtp_logits(last)                              # [B, V]
            for i, s in enumerate(seqs):
                if s.params.greedy:
                    drafts[i].append(int(logits[i].argmax()))
                else:
                    q = probs_after_processing(logits[i:i + 1], [s.params])[0]   # [V]
                    drafts[i].append(int(torch.multinomial(q, 1, generator=s.generator)))
                    probs[i].append(q)
            if j + 1 < k:  # reuse the module on its own output and the token it drafted
                items = [([d[-1]], s.num_computed + j, s.block_table) for s, d in zip(seqs, drafts)]
                last = torch.stack([o[-1] for o in self.runner.forward_mtp(items, list(last[:, None]))])
        for s, d, p in zip(seqs, drafts, probs):
            s.draft = d
            s.draft_probs = torch.stack(p) if p else None                     # [k, V] when sampling

    @property
    def stats(self) -> dict:
        """Drafted/accepted counts, acceptance rate and mean tokens emitted per verification step."""
        return stats_of(self.counts)


def stats_of(counts: dict) -> dict:
    """``counts`` (drafted, accepted, verify_steps, emitted) plus the rates derived from them."""
    return {**counts, "acceptance_rate": counts["accepted"] / counts["drafted"] if counts["drafted"] else None,
            "mean_accepted_length": counts["emitted"] / counts["verify_steps"] if counts["verify_steps"] else None}
