"""Routed experts with weight-only int8 / int4 weights, for decoding on a CPU.

Same contract as every experts module (``model/moe.py``: ``forward(x [T, D], weights [T, k] fp32,
topk [T, k] int64) -> [T, D]``), put in place from outside as ``model.layers[i].mlp.experts = ...``
(:func:`dsv3.quant.weight_only.quantize_weight_only`).

Per expert ``e`` the gate and up projections are stored as one ``[2I, D]`` matrix (one kernel call
gives both halves), the down projection as ``[D, I]``; experts are stacked along dim 0:

    int8: gate_up [E, 2I, D] int8 + scale [E, 2I];  down [E, D, I] int8 + scale [E, D]
    int4: gate_up [E, 2I, D/2] uint8 (two codes a byte) + scale_and_zeros [E, D/g, 2I, 2]; down likewise

Forward: token slots are grouped by expert, and each expert that received tokens runs
``down(silu(gate) * up * route_w)`` through torch's weight-only GEMM kernels (``quant/int_weights.py``)
once on all its tokens, reading its weights once (1 or 0.5 bytes a weight). The loop needs the
per-expert counts on the host, so it runs inside a custom op (``dsv3::int8_experts`` /
``dsv3::int4_experts``): ``torch.compile`` (also ``fullgraph=True``) sees one opaque call with a known
output shape and compiles the rest of the step around it.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .int_weights import (KernelFormatBuffers, check_int4_shape, fbgemm_available, kernel_dtype, pack_int4, packed_int8,
                          quantize_int4, quantize_int8)


def _expert_loop(x: torch.Tensor, weights: torch.Tensor, topk: torch.Tensor, n_experts: int, cd: torch.dtype,
                 gate_up: Callable[[torch.Tensor, int], torch.Tensor],
                 down: Callable[[torch.Tensor, int], torch.Tensor]) -> torch.Tensor:
    """``sum_k weights[t, k] * expert_{topk[t, k]}(x[t])`` -> [T, D] in x's dtype, one pass per used expert.

    ``gate_up(chunk [n, D], e) -> [n, 2I]`` and ``down(h [n, I], e) -> [n, D]`` are expert ``e``'s
    kernel calls, on contiguous rows in the kernel dtype ``cd``. Only those two run per expert: the
    casts, the SwiGLU and the scatter back to the tokens run once on all ``T*k`` rows (per-expert small
    ops used to cost more than the GEMMs at batch 8). The route weight scales the I-wide hidden state,
    as the reference does (down is linear).
    """
    if x.shape[0] == 0:
        return torch.zeros_like(x)
    k = topk.shape[1]
    flat = topk.flatten()
    order = flat.argsort(stable=True)                         # token slots grouped by expert
    token = order // k                                        # [T*k]
    counts = torch.bincount(flat, minlength=n_experts).tolist()
    xs = x.index_select(0, token).to(cd)                      # [T*k, D], rows grouped by expert
    used = [(e, n) for e, n in enumerate(counts) if n]
    bounds = [0]
    for _, n in used:
        bounds.append(bounds[-1] + n)
    gu = torch.cat([gate_up(xs[bounds[i]:bounds[i + 1]], e) for i, (e, _) in enumerate(used)])   # [T*k, 2I]
    g, u = gu.float().chunk(2, dim=-1)
    route_w = weights.flatten()[order].unsqueeze(-1).float()  # [T*k, 1]
    h = (F.silu(g) * u * route_w).to(cd)                      # [T*k, I]
    y = torch.cat([down(h[bounds[i]:bounds[i + 1]], e) for i, (e, _) in enumerate(used)])      # [T*k, D]
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    return out.index_add_(0, token, y.float()).to(x.dtype)


@torch.library.custom_op("dsv3::int8_experts", mutates_args=())
def int8_experts(x: torch.Tensor, weights: torch.Tensor, topk: torch.Tensor, gate_up: torch.Tensor,
                 gate_up_scale: torch.Tensor, down: torch.Tensor, down_scale: torch.Tensor) -> torch.Tensor:
    """Routed SwiGLU experts with int8 weights (layout in the module docstring) -> [T, D]."""
    mm = torch.ops.aten._weight_int8pack_mm
    return _expert_loop(x, weights, topk, gate_up.shape[0], gate_up_scale.dtype,
                        lambda c, e: mm(c, gate_up[e], gate_up_scale[e]),
                        lambda h, e: mm(h, down[e], down_scale[e]))


@int8_experts.register_fake
def _(x, weights, topk, gate_up, gate_up_scale, down, down_scale):
    return torch.empty_like(x)                                # [T, D]


@torch.library.custom_op("dsv3::int8_dynamic_experts", mutates_args=())
def int8_dynamic_experts(x: torch.Tensor, weights: torch.Tensor, topk: torch.Tensor, gate_up: torch.Tensor,
                         gate_up_scale: torch.Tensor, down: torch.Tensor, down_scale: torch.Tensor) -> torch.Tensor:
    """:func:`int8_experts` with int8 activations: each expert's two products are fbgemm's dynamic linear
    (``int_weights.int8_dynamic_mm``: its rows rounded to 7 bits with one scale per call) -> [T, D]."""
    mm = torch.ops.quantized.linear_dynamic
    return _expert_loop(x, weights, topk, gate_up.shape[0], torch.float32,
                        lambda c, e: mm(c.contiguous(), packed_int8(gate_up, gate_up_scale, e), True),
                        lambda h, e: mm(h.contiguous(), packed_int8(down, down_scale, e), True))


@int8_dynamic_experts.register_fake
def _(x, weights, topk, gate_up, gate_up_scale, down, down_scale):
    return torch.empty_like(x)                                # [T, D]


@torch.library.custom_op("dsv3::int4_experts", mutates_args=())
def int4_experts(x: torch.Tensor, weights: torch.Tensor, topk: torch.Tensor, gate_up: torch.Tensor,
                 gate_up_sz: torch.Tensor, down: torch.Tensor, down_sz: torch.Tensor, group_size: int) -> torch.Tensor:
    """Routed SwiGLU experts with int4 weights (layout in the module docstring) -> [T, D]."""
    mm = torch.ops.aten._weight_int4pack_mm_for_cpu
    return _expert_loop(x, weights, topk, gate_up.shape[0], gate_up_sz.dtype,
                        lambda c, e: mm(c, gate_up[e], group_size, gate_up_sz[e]),
                        lambda h, e: mm(h, down[e], group_size, down_sz[e]))


@int4_experts.register_fake
def _(x, weights, topk, gate_up, gate_up_sz, down, down_sz, group_size):
    return torch.empty_like(x)                                # [T, D]


def stacked_weights(experts: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate_up [E, 2I, D], down [E, D, I]) of an experts module with stacked gate/up/down tensors."""
    gate, up, down = (getattr(experts, n).detach() for n in ("gate_proj", "up_proj", "down_proj"))
    if gate.dim() != 3 or gate.shape != up.shape or down.shape != (gate.shape[0], gate.shape[2], gate.shape[1]):
        raise ValueError(f"expected stacked experts gate/up [E, I, D] and down [E, D, I], got "
                         f"{tuple(gate.shape)}, {tuple(up.shape)}, {tuple(down.shape)}")
    return torch.cat([gate, up], dim=1), down


class Int8Experts(KernelFormatBuffers):
    """Routed experts with int8 weights, symmetric per output channel of each expert.

    ``activations="int8"``: the products also round their inputs to 7 bits (fbgemm's dynamic linear),
    see ``int_weights.int8_dynamic_mm``.
    """

    _kernel_buffers = ("gate_up", "gate_up_scale", "down", "down_scale")

    def __init__(self, experts: nn.Module, activations: str = "float"):
        super().__init__()
        if activations not in ("float", "int8"):
            raise ValueError(f"activations={activations!r}: must be 'float' (weight-only) or 'int8'")
        if activations == "int8" and not fbgemm_available():
            raise ValueError("activations='int8' needs torch's fbgemm engine (x86 builds of torch)")
        self.activations = activations
        gate_up, down = stacked_weights(experts)
        # fp32 scales for fbgemm (packed from them once per expert); bf16 for _weight_int8pack_mm
        cd = torch.float32 if activations == "int8" else kernel_dtype(gate_up.device, gate_up.dtype)
        for name, w in (("gate_up", gate_up), ("down", down)):
            qs = [quantize_int8(w[e]) for e in range(w.shape[0])]
            self.register_buffer(name, torch.stack([q for q, _ in qs]))                   # [E, N, K] int8
            self.register_buffer(name + "_scale", torch.stack([s for _, s in qs]).to(cd))  # [E, N]

    def forward(self, x: torch.Tensor, weights: torch.Tensor, topk: torch.Tensor) -> torch.Tensor:
        """x [T, D], weights/topk [T, k] -> sum_k weight * expert_k(x)  [T, D]."""
        op = torch.ops.dsv3.int8_dynamic_experts if self.activations == "int8" else torch.ops.dsv3.int8_experts
        return op(x, weights, topk, self.gate_up, self.gate_up_scale, self.down, self.down_scale)

    def extra_repr(self) -> str:
        E, two_i, hidden = self.gate_up.shape
        return f"experts={E}, hidden={hidden}, intermediate={two_i // 2}, int8, activations={self.activations}"


class Int4Experts(KernelFormatBuffers):
    """Routed experts with int4 weights, asymmetric per group of ``group_size`` input channels."""

    _kernel_buffers = ("gate_up", "gate_up_sz", "down", "down_sz")

    def __init__(self, experts: nn.Module, group_size: int = 32):
        super().__init__()
        gate_up, down = stacked_weights(experts)
        for w in (gate_up, down):
            why = check_int4_shape(w.shape[1], w.shape[2], group_size)
            if why:
                raise ValueError(f"experts of shape {tuple(w.shape)} cannot be int4: {why}")
        self.group_size = group_size
        cd = kernel_dtype(gate_up.device, gate_up.dtype)
        for name, w in (("gate_up", gate_up), ("down", down)):
            packed = [pack_int4(*quantize_int4(w[e], group_size), dtype=cd) for e in range(w.shape[0])]
            self.register_buffer(name, torch.stack([p for p, _ in packed]))               # [E, N, K/2] uint8
            self.register_buffer(name + "_sz", torch.stack([sz for _, sz in packed]))     # [E, K/g, N, 2]

    def forward(self, x: torch.Tensor, weights: torch.Tensor, topk: torch.Tensor) -> torch.Tensor:
        """x [T, D], weights/topk [T, k] -> sum_k weight * expert_k(x)  [T, D]."""
        return torch.ops.dsv3.int4_experts(x, weights, topk, self.gate_up, self.gate_up_sz, self.down,
                                           self.down_sz, self.group_size)

    def extra_repr(self) -> str:
        E, two_i, _ = self.gate_up.shape
        return f"experts={E}, hidden={self.down.shape[1]}, intermediate={two_i // 2}, int4, group={self.group_size}"

