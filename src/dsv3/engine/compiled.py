"""A decode step that ``torch.compile`` can take whole (CPU: inductor generates C++ for it).

Decoding a small model on a CPU is bound by per-operation overhead (hundreds of tiny kernels per
token), which only fusing the step removes. ``model.hidden_states`` itself cannot be compiled as one
graph there: its routed experts run either a Python loop over experts (token counts read on the
host) or ``torch._grouped_mm``, which inductor accepts only in bf16 on CUDA. :func:`decode_hidden`
composes the same modules (embedding, RoPE, each block's norms, MLA and router, the final norm) and,
unless the grouped GEMMs apply (CUDA, bf16, sm90+), computes the routed experts with
:func:`gathered_experts` instead: each (token, expert) pair is a
gather-multiply-reduce over that expert's weights, which inductor fuses into loops that read only
the chosen experts (no weight copies, no host sync). That is cheap only for the few tokens of a
decode step (``T * k`` products of one expert each), which is all it is used for.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kernels.grouped_experts import grouped_mm_usable
from ..model import Transformer
from ..model.moe import MoE, RoutedExperts


def gathered_experts(experts: RoutedExperts, x: torch.Tensor, weights: torch.Tensor, topk: torch.Tensor) -> torch.Tensor:
    """``sum_k weights[t,k] * expert_{topk[t,k]}(x[t])`` for x ``[T, D]`` -> ``[T, D]``, as
    ``RoutedExperts.forward`` (gate weight applied to the hidden state, as there)."""
    xg = x[:, None, None, :]                                               # [T, 1, 1, D]
    gate = (xg * experts.gate_proj[topk]).sum(-1)                          # [T, k, I]
    up = (xg * experts.up_proj[topk]).sum(-1)                              # [T, k, I]
    h = F.silu(gate) * up * weights.unsqueeze(-1).to(x.dtype)              # [T, k, I]
    y = (h[:, :, None, :] * experts.down_proj[topk]).sum(-1)               # [T, k, D]
    return y.sum(1)


def decode_hidden(model: Transformer, input_ids: torch.Tensor, positions: torch.Tensor, meta) -> torch.Tensor:
    """``model.hidden_states`` for the packed decode rows ``input_ids [N]`` at ``positions [N]``
    with attention metadata ``meta`` -> final normed hidden states ``[N, D]``."""
    h = model.embed_tokens(input_ids)[None]                                # [1, N, D]
    cos, sin = model.rope(positions)
    for layer in model.layers:
        h = h + layer.self_attn(layer.input_layernorm(h), cos, sin, meta, 0, True)
        x = layer.post_attention_layernorm(h)
        mlp = layer.mlp
        if isinstance(mlp, MoE):
            flat = x.reshape(-1, x.shape[-1])
            weights, topk = mlp.gate(flat)
            if flat.is_cuda and grouped_mm_usable(flat, mlp.experts.gate_proj):
                y = mlp.experts(flat, weights, topk).view_as(x)           # grouped GEMMs (bf16, sm90+)
            else:
                y = gathered_experts(mlp.experts, flat, weights, topk).view_as(x)
            if mlp.shared_experts is not None:
                y = y + mlp.shared_experts(x)
        else:
            y = mlp(x)
        h = h + y
    return model.norm(h)[0]
