"""Load balance for DeepSeekMoE (DESIGN.md §2, DeepSeek-V3 §2.1.2, arXiv 2408.15664).

- Aux-loss-free: after every optimizer step, per MoE layer, ``b_i += gamma * sign(mean(c) - c_i)``
  where ``c_i`` counts the tokens routed to expert i over the whole (global) batch. ``b`` only
  shifts which experts are selected; gate weights never see it.
- Complementary sequence-wise loss: per sequence of T tokens,
  ``f_i = N_r / (K_r * T) * #{t: i in topk(t)}``, ``P_i = mean_t(s_i,t / sum_j s_j,t)``,
  ``L = alpha * sum_i f_i * P_i``, averaged over sequences.
- Classic auxiliary loss (for comparison, DeepSeek-V2 style): the same product over the whole batch.
- MaxVio = (max_i c_i - mean c) / mean c.
"""

from __future__ import annotations

import torch

from ..model.moe import Router


def routers(model: torch.nn.Module) -> list[tuple[str, Router]]:
    """Every router in the model (main MoE layers, then MTP), with its module name."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, Router)]


@torch.no_grad()
def update_bias(router: Router, counts: torch.Tensor, gamma: float) -> None:
    """Aux-loss-free step: raise the bias of under-loaded experts, lower over-loaded ones by gamma."""
    if router.e_score_correction_bias is None or gamma == 0:
        return
    c = counts.float()
    router.e_score_correction_bias.add_(gamma * torch.sign(c.mean() - c))


def max_violation(counts: torch.Tensor) -> torch.Tensor:
    """counts [..., E] -> MaxVio [...]: how far the busiest expert is above a perfectly even load."""
    c = counts.float()
    mean = c.mean(-1)
    return (c.amax(-1) - mean) / mean.clamp_min(1e-9)


def _normalized(scores: torch.Tensor) -> torch.Tensor:
    return scores / scores.sum(-1, keepdim=True)


def _selected(topk: torch.Tensor, n_experts: int) -> torch.Tensor:
    """topk [..., k] -> one-hot counts [..., E] (float)."""
    out = torch.zeros(*topk.shape[:-1], n_experts, device=topk.device)
    return out.scatter_add_(-1, topk, torch.ones_like(topk, dtype=out.dtype))


def sequence_balance_loss(scores: torch.Tensor, topk: torch.Tensor, batch_size: int) -> torch.Tensor:
    """scores [B*T, E] (the router's fp32 affinities), topk [B*T, K] -> the (unweighted) sequence-wise loss."""
    E, K = scores.shape[-1], topk.shape[-1]
    s = _normalized(scores).view(batch_size, -1, E)                     # [B, T, E]
    T = s.shape[1]
    f = _selected(topk.view(batch_size, T, K), E).sum(1) * (E / (K * T))  # [B, E]
    P = s.mean(1)                                                        # [B, E]
    return (f * P).sum(-1).mean()


def batch_balance_loss(scores: torch.Tensor, topk: torch.Tensor) -> torch.Tensor:
    """The classic expert-level auxiliary loss over all tokens of the batch (unweighted)."""
    E, K = scores.shape[-1], topk.shape[-1]
    T = scores.shape[0]
    f = _selected(topk, E).sum(0) * (E / (K * T))
    P = _normalized(scores).mean(0)
    return (f * P).sum()
