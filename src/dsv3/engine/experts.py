"""Which routed-experts implementation a decode step runs, and the module swap that puts it in place.

Every implementation has the contract of :class:`dsv3.model.moe.RoutedExperts`,
``forward(x [T, D], weights [T, k] fp32, topk [T, k] int64) -> [T, D]``, and takes over an existing
``RoutedExperts``' Parameters (same objects, same ``state_dict`` names, nothing copied):

- ``"reference"``: ``RoutedExperts`` itself (its per-expert loop, or its grouped GEMMs where
  ``grouped_mm_usable`` says so), nothing swapped;
- ``"gathered"``: :class:`dsv3.kernels.gathered_experts.GatheredExperts`, one fused
  gather-multiply-reduce per (token, slot), slots sorted by expert; no host sync, compiles whole;
  ``T * k`` dot products, cheapest while few tokens share an expert;
- ``"grouped"``: :class:`dsv3.kernels.grouped_experts.GroupedExperts`, three grouped GEMMs over the
  used experts; an opaque kernel inside a compiled CPU graph; cheapest once many tokens share one.

:func:`use_experts` swaps one in for good (it is what quantized experts are applied with as well:
pass a callable ``RoutedExperts -> nn.Module``); :func:`build_experts` + :func:`swap_experts` is what
the compiled decode step uses to put the implementation :func:`choose_experts` picks for its batch
bucket in place for the duration of one call, so the model keeps its own experts everywhere else
(prompt chunks, training, other engines sharing the model object).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..kernels.gathered_experts import GatheredExperts
from ..kernels.grouped_experts import GroupedExperts, grouped_mm_supported
from ..model.moe import MoE, RoutedExperts

IMPLEMENTATIONS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "gathered": GatheredExperts,
    "grouped": GroupedExperts,
}

# CPU rule: gathered while a step's T*k expert slots are at most this many times E. Measured on the
# `small` preset's experts (64 x 768 x 256, top-6, fp32, one thread, cold cache; per MoE layer,
# compiled gathered vs the grouped GEMMs): T=32 48 vs 56 ms, T=64 (6 E) 68 vs 100 ms, T=128 (12 E)
# 100 vs 93 ms, T=256 (24 E) 255 vs 137 ms. The gathered products are dot products (no register
# blocking across tokens), so once many tokens share an expert the GEMMs win.
GATHERED_MAX_READS_PER_EXPERT = 8

Impl = str | Callable[[nn.Module], nn.Module]


def _factory(impl: Impl) -> Callable[[nn.Module], nn.Module]:
    if callable(impl):
        return impl
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"unknown experts implementation {impl!r}; choose one of {sorted(IMPLEMENTATIONS)} "
                         "or pass a callable RoutedExperts -> nn.Module")
    return IMPLEMENTATIONS[impl]


def build_experts(model: nn.Module, impl: Impl) -> dict[MoE, nn.Module]:
    """``{moe: impl(moe.experts)}`` for every MoE layer of ``model`` (main layers and MTP blocks) whose
    experts are a plain :class:`RoutedExperts`; nothing is installed yet (see :func:`swap_experts`).

    Experts already replaced (quantized, FP8, expert-parallel shards) are left out: they are their
    own implementation. ``impl``: a name in :data:`IMPLEMENTATIONS` or a callable.
    """
    make = _factory(impl)
    return {m: make(m.experts) for m in model.modules() if isinstance(m, MoE) and type(m.experts) is RoutedExperts}


def swap_experts(replacements: dict[MoE, nn.Module]) -> dict[MoE, nn.Module]:
    """Install ``replacements`` (``moe.experts = new``) and return what they replaced, in the same
    form, so that ``swap_experts(swap_experts(r))`` restores the model."""
    previous = {}
    for moe, new in replacements.items():
        previous[moe] = moe.experts
        moe.experts = new
    return previous


def use_experts(model: nn.Module, impl: Impl) -> dict[MoE, nn.Module]:
    """Replace, in place, the routed experts of every MoE layer of ``model`` by ``impl(experts)``.

    ``impl``: ``"gathered"``, ``"grouped"`` or a callable ``RoutedExperts -> nn.Module`` (for example
    a quantized experts class's constructor). Only plain ``RoutedExperts`` are replaced. Returns
    ``{moe: previous experts}``; ``swap_experts(returned)`` undoes it.
    """
    return swap_experts(build_experts(model, impl))


def choose_experts(num_tokens: int, top_k: int, gate_proj: torch.Tensor) -> str:
    """The implementation a compiled step of ``num_tokens`` rows runs, for experts with stacked
    weights ``gate_proj [E, I, D]`` and ``top_k`` experts per token.

    CPU: ``"gathered"`` while the step's ``T * k`` slots stay within
    :data:`GATHERED_MAX_READS_PER_EXPERT` times ``E``, otherwise ``"grouped"`` (measured crossover).
    CUDA: ``"grouped"`` where the
    grouped GEMMs apply (bf16, sm90+), else ``"gathered"`` (the reference loop reads token counts on
    the host, which neither compiles into one graph nor captures).
    """
    if not grouped_mm_supported(gate_proj):
        return "gathered"
    if gate_proj.is_cuda:
        return "grouped"
    return "gathered" if num_tokens * top_k <= GATHERED_MAX_READS_PER_EXPERT * gate_proj.shape[0] else "grouped"
