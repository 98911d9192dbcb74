"""Routed experts as three grouped GEMMs on CUDA (``torch._grouped_mm``), one launch per projection.

The reference is ``RoutedExperts.forward`` in ``model/moe.py``: a Python loop over experts that
needs each expert's token count on the host (one device sync) and launches 3 small GEMMs per
expert. On a GPU that loop is launch-bound (64 experts x 3 GEMMs x layers), so the model calls
``grouped_swiglu`` instead when ``grouped_mm_usable`` says the fast path applies: CUDA with bf16
compute (autocast or bf16 weights) and dimensions the kernel accepts, or CPU inference. Token slots are sorted by
expert and the per-expert offsets stay on the device, so no sync is needed either.

The gate weight multiplies the ``I``-wide hidden state, as in the reference, and the ``k`` expert
outputs of a token are summed in fp32 by a reshape (deterministic, unlike an atomic index_add).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# torch._grouped_mm wants 16-byte aligned rows: multiples of 8 bf16 values.
_ALIGN = 8
# torch._grouped_mm has a CPU kernel from torch 2.9 on (earlier versions raise NotImplementedError).
_CPU_GROUPED_MM = hasattr(torch, "_grouped_mm") and tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 9)


def _compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return weight.dtype


def grouped_mm_usable(x: torch.Tensor, gate_proj: torch.Tensor) -> bool:
    """True when ``grouped_swiglu`` should run these experts.

    CUDA (sm90+): bf16 compute with aligned dims, training or not. CPU: inference only (no grad),
    where decoding is op-overhead bound and the loop's per-expert launches dominate; for training on
    CPU the reference loop's backward is faster.
    """
    if x.device.type == "cpu":
        return _CPU_GROUPED_MM and not torch.is_grad_enabled()
    if not (x.is_cuda and hasattr(torch, "_grouped_mm")):
        return False
    if torch.cuda.get_device_capability(x.device)[0] < 9:  # the kernel targets sm90+
        return False
    _, inter, hidden = gate_proj.shape
    return _compute_dtype(x, gate_proj) == torch.bfloat16 and inter % _ALIGN == 0 and hidden % _ALIGN == 0


def grouped_swiglu(x: torch.Tensor, weights: torch.Tensor, topk: torch.Tensor, gate_proj: torch.Tensor,
                   up_proj: torch.Tensor, down_proj: torch.Tensor) -> torch.Tensor:
    """``sum_k weights[t,k] * expert_{topk[t,k]}(x[t])`` for x ``[T, D]``; experts ``[E, I, D]``/``[E, D, I]``.

    Same function as ``RoutedExperts.forward``; returns ``[T, D]`` in ``x.dtype``. GEMMs run in bf16
    on CUDA, in the weights' dtype on CPU.
    """
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
