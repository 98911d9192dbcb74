"""DeepSeekMoE: shared experts plus fine-grained routed experts behind a group-limited router.

Router (computed in fp32, DESIGN.md §2):
  V3 (sigmoid, noaux_tc): s = sigmoid(x W^T); selection uses s + b (b = e_score_correction_bias,
     never in the gate weights); a group scores the sum of its top-2; keep topk_group groups; top-k
     experts among them; gate = s of those, normalized to sum 1, times routed_scaling_factor.
  V2 (softmax, greedy | group_limited_greedy with group score = group max); normalized only when
     norm_topk_prob, otherwise scaled by routed_scaling_factor (DeepSeek-V2's own rule).
Experts are stacked ``[E, out, in]`` so a grouped matmul can run them all at once; this path
loops over the experts that received tokens (one matmul per expert and projection, no padding, so
an unbalanced batch costs nothing extra). No token is ever dropped.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..kernels.grouped_experts import grouped_mm_usable, grouped_swiglu
from .mlp import MLP


def _no_autocast(device_type: str):
    """A context with autocast switched off for ``device_type`` (a no-op where autocast doesn't exist, e.g. meta)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return nullcontext()


class Router(nn.Module):
    """Scores experts and picks ``num_experts_per_tok`` of them per token.

    After each forward, ``last_counts [E]`` holds how many tokens chose each expert (for the
    aux-loss-free bias update and MaxVio), ``last_scores [T, E]`` the fp32 affinities and
    ``last_topk [T, k]`` the chosen experts (for the sequence-wise balance loss).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        self.n_experts, self.top_k = c.n_routed_experts, c.num_experts_per_tok
        self.n_group, self.topk_group = c.n_group, c.topk_group
        self.scoring_func, self.topk_method = c.scoring_func, c.topk_method
        self.norm_topk_prob, self.scale = c.norm_topk_prob, c.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(c.n_routed_experts, c.hidden_size))
        if c.topk_method == "noaux_tc":
            # Selection-only bias, moved by the aux-loss-free balancer, not by gradients.
            self.register_buffer("e_score_correction_bias", torch.zeros(c.n_routed_experts, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None
        self.last_counts: torch.Tensor | None = None
        self.last_scores: torch.Tensor | None = None
        self.last_topk: torch.Tensor | None = None
        # The dtype of the logits and scores. Always fp32 in training and inference; only the
        # router-precision experiment (train/experiment_router.py) sets bf16, to show what an
        # autocast-recast gate would pick.
        self.compute_dtype = torch.float32

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, D] -> gate weights [T, k] (fp32), expert ids [T, k].

        The logits and scores are fp32 even inside ``torch.autocast`` (any device): autocast would
        otherwise recast this matmul to bf16, whose ~4e-3 rounding of the scores is larger than the
        balancing bias steps (gamma ~1e-3) and flips expert choices. DeepSeek's code and transformers
        keep the gate in fp32 too.
        """
        with _no_autocast(x.device.type):
            cd = self.compute_dtype
            logits = F.linear(x.to(cd), self.weight.to(cd))                     # [T, E] fp32
            if self.scoring_func == "sigmoid":
                scores = logits.sigmoid()
            else:
                scores = logits.softmax(dim=-1)
        choice = scores if self.e_score_correction_bias is None else scores + self.e_score_correction_bias
        if self.topk_method in ("noaux_tc", "group_limited_greedy") and self.n_group > 1:
            grouped = choice.view(-1, self.n_group, self.n_experts // self.n_group)  # [T, G, E/G]
            if self.topk_method == "noaux_tc":
                group_scores = grouped.topk(2, dim=-1).values.sum(-1)
            else:
                group_scores = grouped.amax(dim=-1)
            keep = group_scores.topk(self.topk_group, dim=-1).indices                 # [T, topk_group]
            drop = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, keep, False)
            # -inf (as DeepSeek's own code) so a dropped group never wins, even with negative biased scores.
            choice = grouped.masked_fill(drop.unsqueeze(-1), float("-inf")).flatten(1)
        topk = choice.topk(self.top_k, dim=-1).indices                             # [T, k]
        weights = scores.gather(1, topk)
        if self.scoring_func == "sigmoid":
            if self.norm_topk_prob:
                weights = weights / weights.sum(-1, keepdim=True)
            weights = weights * self.scale
        elif self.norm_topk_prob and self.top_k > 1:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        else:
            weights = weights * self.scale
        self.last_scores, self.last_topk = scores, topk
        # scatter_add_, not bincount: on CUDA bincount reads the max id on the host, a sync that also
        # forbids capturing the router in a CUDA graph.
        flat = topk.flatten()
        self.last_counts = torch.zeros(self.n_experts, dtype=torch.long, device=flat.device).scatter_add_(
            0, flat, torch.ones_like(flat))
        return weights, topk


class RoutedExperts(nn.Module):
    """``E`` SwiGLU experts with stacked weights: gate/up ``[E, I, D]``, down ``[E, D, I]``.

    The reference implementation. Other implementations (``kernels/gathered_experts.py``,
    ``kernels/grouped_experts.py``, quantized ones in ``quant/``) are separate modules with the same
    contract, ``forward(x [T, D], weights [T, k] fp32, topk [T, k] int64) -> [T, D]``, that take over
    these Parameters; the engine puts them in place by module replacement
    (:func:`dsv3.engine.experts.use_experts`), never through a flag in here.
    """

    def __init__(self, n_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Parameter(torch.empty(n_experts, intermediate_size, hidden_size))
        self.up_proj = nn.Parameter(torch.empty(n_experts, intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(n_experts, hidden_size, intermediate_size))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, topk: torch.Tensor) -> torch.Tensor:
        """x [T, D], weights/topk [T, k] -> sum_k weight * expert_k(x)  [T, D]."""
        # The grouped GEMMs are chosen here, not by swapping modules, because training uses them
        # too (CUDA bf16): the trainer, FSDP, expert parallel and FP8 training all work on plain
        # RoutedExperts and would otherwise each have to swap. The choice depends on the device,
        # dtype and grad mode only, never on tensor values, so a graph stays one graph.
        if grouped_mm_usable(x, self.gate_proj):  # three grouped GEMMs, same function (kernels/)
            return grouped_swiglu(x, weights, topk, self.gate_proj, self.up_proj, self.down_proj)
        stacked = (self.gate_proj, self.up_proj, self.down_proj)
        low = autocast_weight_dtype(x, self.gate_proj)
        if low is not None:
            # Left to autocast, every expert's matmuls would cast their own weight slices and their
            # own token chunk (twice: gate and up) to bf16 -- 3E weight and 2E token casts per layer
            # forward and as many in backward, each a separate op. Casting the stacked weights and
            # the gathered tokens once gives the same bf16 operands, so the same results, in 4 casts.
            stacked = tuple(w.to(low) for w in stacked)
        # unbind gives per-expert views whose backward stacks the E gradients once; indexing
        # self.gate_proj[e] instead would allocate and add a full [E, I, D] zero gradient per expert.
        per_expert = list(zip(*(w.unbind(0) for w in stacked)))
        return dispatch_experts(x, weights, topk, per_expert, swiglu_expert, compute_dtype=low)


def autocast_weight_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast would run a GEMM of ``x`` with the higher-precision ``weight`` in, or None
    (autocast off on x's device, or the weight is not wider than the autocast dtype)."""
    dev = x.device.type
    if not (torch.amp.is_autocast_available(dev) and torch.is_autocast_enabled(dev)):
        return None
    low = torch.get_autocast_dtype(dev)
    return low if weight.dtype.itemsize > low.itemsize else None


def swiglu_expert(chunk: torch.Tensor, route_w: torch.Tensor, w: tuple) -> torch.Tensor:
    """One expert on its tokens: chunk [n, D], route_w [n, 1], w = (gate [I, D], up [I, D], down [D, I]) -> [n, D].

    The gate weight scales the I-wide hidden state (down_proj is linear), which is cheaper than
    scaling the D-wide output.
    """
    w_gate, w_up, w_down = w
    h = F.silu(chunk @ w_gate.T) * (chunk @ w_up.T)            # [n, I]
    return (h * route_w.to(h.dtype)) @ w_down.T                # [n, D]


def dispatch_experts(x: torch.Tensor, weights: torch.Tensor, topk: torch.Tensor, per_expert: Sequence,
                     run: Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor],
                     compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The reference expert loop: ``sum_k weights[t,k] * run(x[t], ., per_expert[topk[t,k]])``  [T, D].

    Token slots are grouped by expert (a stable sort), each non-empty group goes through
    ``run(chunk [n, D], route_w [n, 1], per_expert[e])`` once, and the results are added straight into
    their tokens' rows, so no [T*k, D] concatenation is built (nor split again in the backward pass).
    ``compute_dtype`` (e.g. bf16 under autocast) casts the gathered rows and gate weights once, before
    the split; the sum stays in x's dtype. The FP8 variants (quant/, train/fp8.py) call this with
    their own ``run``.
    """
    k = topk.shape[1]
    flat = topk.flatten()
    order = flat.argsort(stable=True)              # token-slots grouped by expert
    token = order // k
    counts = torch.bincount(flat, minlength=len(per_expert)).tolist()
    # index_select, not x[token]: its backward is one index_add_, where advanced indexing's is an
    # accumulating index_put_ (several times slower on CPU for the T*k duplicated rows).
    xs = x.index_select(0, token)                   # [T*k, D]
    route_w = weights.flatten()[order].unsqueeze(-1)  # [T*k, 1] fp32, in the same order
    if compute_dtype is not None:
        xs, route_w = xs.to(compute_dtype), route_w.to(compute_dtype)
    out = torch.zeros_like(x)
    for chunk, rw, tok, w in zip(xs.split(counts), route_w.split(counts), token.split(counts), per_expert):
        if chunk.shape[0] == 0:
            continue
        out.index_add_(0, tok, run(chunk, rw, w).to(out.dtype))
    return out


class MoE(nn.Module):
    """``shared_experts(x) + sum_k g_k * expert_k(x)``."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        self.gate = Router(c)
        self.experts = RoutedExperts(c.n_routed_experts, c.hidden_size, c.moe_intermediate_size)
        self.shared_experts = (MLP(c.hidden_size, c.n_shared_experts * c.moe_intermediate_size, bias=c.mlp_bias)
                               if c.n_shared_experts > 0 else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, S, D] -> [B, S, D]
        flat = x.reshape(-1, x.shape[-1])
        weights, topk = self.gate(flat)
        y = self.experts(flat, weights, topk).view_as(x)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y
