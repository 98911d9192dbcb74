"""Routed experts as three grouped GEMMs (``torch._grouped_mm``), one launch per projection.

The reference is ``RoutedExperts.forward`` in ``model/moe.py``: a Python loop over experts that
needs each expert's token count on the host (one device sync) and launches 3 small GEMMs per
expert. On a GPU that loop is launch-bound (64 experts x 3 GEMMs x layers), and on a CPU decoding
is op-overhead bound, so ``RoutedExperts`` calls :func:`grouped_swiglu` itself when
:func:`grouped_mm_usable` says the fast path applies: CUDA with bf16 compute (autocast or bf16
weights) and dimensions the kernel accepts, or CPU inference. Token slots are sorted by expert and
the per-expert offsets stay on the device, so no sync is needed either. :class:`GroupedExperts`
is the same computation as an explicit experts module, which the engine swaps in where it wants
the grouped GEMMs whatever the grad mode (:mod:`dsv3.engine.experts`).

Under ``torch.compile`` on a CPU, ``torch._grouped_mm`` cannot be traced (its meta function accepts
only bf16), so there :func:`grouped_swiglu` runs as the custom op ``dsv3::grouped_swiglu``, which
inductor calls as one opaque kernel: the rest of the step is still compiled around it, the values
are the eager ones bit for bit.

The gate weight multiplies the ``I``-wide hidden state, as in the reference, and the ``k`` expert
outputs of a token are summed in fp32 by a reshape (deterministic, unlike an atomic index_add).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# torch._grouped_mm wants 16-byte aligned rows: multiples of 8 bf16 values.
_ALIGN = 8
# torch._grouped_mm has a CPU kernel from torch 2.9 on (earlier versions raise NotImplementedError).
_CPU_GROUPED_MM = hasattr(torch, "_grouped_mm") and tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 9)
_CPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)     # what its CPU kernel takes (no float64)


def _compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return weight.dtype


def grouped_mm_usable(x: torch.Tensor, gate_proj: torch.Tensor) -> bool:
    """True when ``RoutedExperts`` should run these experts through ``grouped_swiglu``.

    CUDA (sm90+): bf16 compute with aligned dims, training or not. CPU: inference only (no grad),
    where decoding is op-overhead bound and the loop's per-expert launches dominate; for training on
    CPU the reference loop's backward is faster.
    """
    if x.device.type == "cpu":
        return _cpu_kernel_accepts(gate_proj) and not torch.is_grad_enabled()
    return x.is_cuda and _cuda_kernel_accepts(x.device, _compute_dtype(x, gate_proj), gate_proj)


def grouped_mm_supported(gate_proj: torch.Tensor) -> bool:
    """Whether :class:`GroupedExperts` can run experts with these weights, computing in their own
    dtype (no autocast), in any grad mode: a CPU with torch >= 2.9, or CUDA sm90+ in bf16."""
    if gate_proj.device.type == "cpu":
        return _cpu_kernel_accepts(gate_proj)
    return gate_proj.is_cuda and _cuda_kernel_accepts(gate_proj.device, gate_proj.dtype, gate_proj)


def _cpu_kernel_accepts(gate_proj: torch.Tensor) -> bool:
    # The CPU kernel wants fp32/bf16/fp16 and, like the CUDA one, rows of a multiple of 16 bytes.
    _, inter, hidden = gate_proj.shape
    size = gate_proj.element_size()
    return (_CPU_GROUPED_MM and gate_proj.dtype in _CPU_DTYPES
            and (inter * size) % 16 == 0 and (hidden * size) % 16 == 0)


def _cuda_kernel_accepts(device: torch.device, dtype: torch.dtype, gate_proj: torch.Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm") or torch.cuda.get_device_capability(device)[0] < 9:  # sm90+ kernel
        return False
    _, inter, hidden = gate_proj.shape
    return dtype == torch.bfloat16 and inter % _ALIGN == 0 and hidden % _ALIGN == 0


def grouped_swiglu(x: torch.Tensor, weights: torch.Tensor, topk: torch.Tensor, gate_proj: torch.Tensor,
                   up_proj: torch.Tensor, down_proj: torch.Tensor) -> torch.Tensor:
    """``sum_k weights[t,k] * expert_{topk[t,k]}(x[t])`` for x ``[T, D]``; experts ``[E, I, D]``/``[E, D, I]``.

    Same function as ``RoutedExperts.forward``; returns ``[T, D]`` in ``x.dtype``. GEMMs run in bf16
    on CUDA, in the weights' dtype on CPU.
    """
    if x.device.type == "cpu":
        if torch.is_grad_enabled() and any(t.requires_grad for t in (x, weights, gate_proj, up_proj, down_proj)):
            raise RuntimeError("grouped_swiglu on a CPU is inference-only (torch._grouped_mm has no CPU backward "
                               "for these layouts); run it under torch.no_grad() or use RoutedExperts' loop")
        # Opaque to torch.compile (see the module docstring), the same computation eagerly.
        return torch.ops.dsv3.grouped_swiglu(x, weights, topk, gate_proj, up_proj, down_proj)
    return _grouped_swiglu(x, weights, topk, gate_proj, up_proj, down_proj)


def _grouped_swiglu(x: torch.Tensor, weights: torch.Tensor, topk: torch.Tensor, gate_proj: torch.Tensor,
                    up_proj: torch.Tensor, down_proj: torch.Tensor) -> torch.Tensor:
    T, k = topk.shape
    dtype = torch.bfloat16 if x.is_cuda else _compute_dtype(x, gate_proj)
    expert_sorted, order = topk.flatten().sort(stable=True)   # token slots grouped by expert
    # End row of each expert's group, found on the device (bincount would read its max on the host).
    ids = torch.arange(gate_proj.shape[0], device=x.device, dtype=expert_sorted.dtype)
    offs = torch.searchsorted(expert_sorted, ids, right=True).to(torch.int32)       # [E]
    xs = x.index_select(0, order // k).to(dtype)               # [T*k, D]
    # _grouped_mm(A [S, K], B [E, K, N]) -> [S, N]; our weights are [E, N, K], so pass transposed views.
    gate = torch._grouped_mm(xs, gate_proj.to(dtype).transpose(1, 2), offs=offs)   # [T*k, I]
    up = torch._grouped_mm(xs, up_proj.to(dtype).transpose(1, 2), offs=offs)       # [T*k, I]
    route_w = weights.flatten()[order].unsqueeze(-1)           # [T*k, 1] fp32
    h = (F.silu(gate.float()) * up.float() * route_w).to(dtype)
    y = torch._grouped_mm(h, down_proj.to(dtype).transpose(1, 2), offs=offs)       # [T*k, D]
    # Undo the sort, then add each token's k rows in fp32.
    unsorted = torch.empty_like(y).index_copy_(0, order, y)    # row t*k+j = slot (t, j)
    return unsorted.view(T, k, -1).float().sum(1).to(x.dtype)


@torch.library.custom_op("dsv3::grouped_swiglu", mutates_args=())
def _grouped_swiglu_op(x: torch.Tensor, weights: torch.Tensor, topk: torch.Tensor, gate_proj: torch.Tensor,
                       up_proj: torch.Tensor, down_proj: torch.Tensor) -> torch.Tensor:
    return _grouped_swiglu(x, weights, topk, gate_proj, up_proj, down_proj)


@_grouped_swiglu_op.register_fake
def _(x, weights, topk, gate_proj, up_proj, down_proj):
    return torch.empty_like(x)                                                        # [T, D]


class GroupedExperts(nn.Module):
    """Routed experts computed by :func:`grouped_swiglu`, on an existing experts module's Parameters.

    Takes over ``experts.gate_proj``/``up_proj``/``down_proj`` (the same Parameter objects: same
    ``state_dict`` names, nothing copied). ``forward(x [T, D], weights [T, k] fp32, topk [T, k] int64)
    -> [T, D]``. Reads each used expert once whatever the batch. Runs where
    :func:`grouped_mm_supported` says so (a CPU with torch >= 2.9: inference only; CUDA sm90+ with
    bf16 compute: differentiable too).
    """

    def __init__(self, experts: nn.Module):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = experts.gate_proj, experts.up_proj, experts.down_proj

    def forward(self, x: torch.Tensor, weights: torch.Tensor, topk: torch.Tensor) -> torch.Tensor:
        return grouped_swiglu(x, weights, topk, self.gate_proj, self.up_proj, self.down_proj)

    def extra_repr(self) -> str:
        E, inter, hidden = self.gate_proj.shape
        return f"experts={E}, hidden={hidden}, intermediate={inter}"
