"""MTP speculative decoding for :class:`dsv3.LLM`: DeepSeek-V3's multi-token-prediction module drafts
tokens by applying itself to its own output; the main model verifies them in its next forward, keeping
the accepted prefix plus one token (greedy verification, or rejection sampling, which keeps the target
distribution exactly: :func:`rejection_sample`, Leviathan et al. 2023, Chen et al. 2023;
:func:`greedy_verify` is its temperature-0 special case)."""

from __future__ import annotations

from typing import Sequence as Seq

import torch

from .block_manager import BlockManager
from .runner import ModelRunner
from .sampling import probs_after_processing
from .sequence import Sequence


def _draw(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """One draw from the (possibly unnormalized) non-negative weights ``probs`` ``[V]``."""
    noise = torch.empty_like(probs).exponential_(generator=generator).clamp_min_(torch.finfo(probs.dtype).tiny)
    return int((probs / noise).argmax())


def rejection_sample(draft_token_ids: torch.Tensor | Seq[int], draft_probs: torch.Tensor,
                     target_probs: torch.Tensor, generator: torch.Generator | None = None) -> list[int]:
    """Verify ``k`` draft tokens against the target model, keeping the target distribution exactly.

    Args:
        draft_token_ids: ``[k]`` tokens proposed by the draft (DeepSeek-V3: the MTP module).
        draft_probs: ``[k, V]`` the distributions ``q_i`` the drafts were drawn from.
        target_probs: ``[k + 1, V]`` the target's processed distributions ``p_i`` at the same positions
            (:func:`probs_after_processing`), the last one for the bonus token after the last draft.
        generator: the request's generator (on the probs' device), or ``None`` for the global stream.

    Returns:
        The accepted draft prefix plus one token: a replacement at the first rejection, or a bonus token
        from ``p_k`` when every draft is accepted; so between 1 and ``k + 1`` tokens.

    Draft ``x_i`` is accepted with probability ``min(1, p_i(x_i) / q_i(x_i))``, tested as ``u * q < p``
    with ``u ~ U[0, 1)`` so that ``q(x) = 0`` needs no division: such a draft is accepted when
    ``p(x) > 0`` (ratio +inf) and rejected when ``p(x) = 0``, and ``p == q`` always accepts. A rejected
    position draws from ``normalize(max(0, p_i - q_i))``; if that residual is all zeros (possible only
    through round-off or a draft row that does not sum to 1) it falls back to ``p_i``.
    """
    drafts = torch.as_tensor(draft_token_ids, dtype=torch.long, device=target_probs.device).reshape(-1)  # [k]
    k = drafts.numel()
    if draft_probs.shape[0] != k or target_probs.shape[0] != k + 1 or draft_probs.shape[1] != target_probs.shape[1]:
        raise ValueError(f"expected draft_probs [k, V] and target_probs [k+1, V] for k={k}, got "
                         f"{tuple(draft_probs.shape)} and {tuple(target_probs.shape)}")
    p = target_probs.float()
    q = draft_probs.float().to(p.device)
    if k:
        p_x = p[:k].gather(1, drafts.unsqueeze(1)).squeeze(1)  # [k]
        q_x = q.gather(1, drafts.unsqueeze(1)).squeeze(1)  # [k]
        # All k uniforms up front: one kernel and one host sync instead of k of each.
        u = torch.rand(k, generator=generator, device=p.device, dtype=torch.float32)
        accepted = (u * q_x < p_x).tolist()
    else:
        accepted = []
    n_ok = next((i for i, ok in enumerate(accepted) if not ok), k)
    out = drafts[:n_ok].tolist()
    if n_ok == k:
        out.append(_draw(p[k], generator))
        return out
    residual = (p[n_ok] - q[n_ok]).clamp_min(0)
    if not bool(residual.sum() > 0):
        residual = p[n_ok]
    out.append(_draw(residual, generator))
    return out


def greedy_verify(draft_token_ids: torch.Tensor | Seq[int], target_logits: torch.Tensor) -> list[int]:
    """Temperature-0 verification: accept drafts while they equal the target's argmax.

    Args:
        draft_token_ids: ``[k]`` draft tokens.
        target_logits: ``[k + 1, V]`` target logits (or probabilities) at the draft positions plus one.

    Returns:
        The matching draft prefix followed by the target's argmax at the first mismatch, or by the
        bonus argmax at position ``k`` when all ``k`` match (``k + 1`` tokens).
    """
    target = target_logits.argmax(dim=-1).tolist()  # [k + 1]
    drafts = torch.as_tensor(draft_token_ids, dtype=torch.long).reshape(-1).tolist()
    if len(target) != len(drafts) + 1:
        raise ValueError(f"target_logits needs k+1 = {len(drafts) + 1} rows, got {len(target)}")
    n_ok = next((i for i, (d, t) in enumerate(zip(drafts, target)) if d != t), len(drafts))
    return drafts[:n_ok] + [target[n_ok]]


class MTPSpeculator:
    """Drafts and verification for the sequences of one engine.

    Args:
        runner: the engine's model runner (its MTP forward and heads).
        block_manager: grows a sequence's block table for the draft positions.
        num_tokens: tokens drafted per step (``0``: no speculation, the stats stay zero).
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
        seqs = [s for s in seqs if k and self.eligible(s) and len(s) + k <= self.max_model_len
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
        st = self.counts
        return {**st, "acceptance_rate": st["accepted"] / st["drafted"] if st["drafted"] else None,
                "mean_accepted_length": st["emitted"] / st["verify_steps"] if st["verify_steps"] else None}
