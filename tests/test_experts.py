"""Routed-experts implementations against the reference loop, and the engine's module swap.

``GatheredExperts`` (kernels/gathered_experts.py) and ``GroupedExperts`` (kernels/grouped_experts.py)
must compute what ``RoutedExperts``' per-expert loop (model/moe.py) computes, for any routing: one
token, experts that get no token, many tokens on few experts. ``use_experts`` / ``swap_experts``
(engine/experts.py) replace modules without copying or renaming a Parameter.
"""

from __future__ import annotations

import pytest
import torch

import dsv3
from conftest import tiny_config
from dsv3.engine.experts import (GATHERED_MAX_READS_PER_EXPERT, build_experts, choose_experts, swap_experts,
                                 use_experts)
from dsv3.kernels.gathered_experts import GatheredExperts
from dsv3.kernels.grouped_experts import GroupedExperts
from dsv3.model.moe import MoE, RoutedExperts, dispatch_experts, swiglu_expert

E, D, I, K = 8, 16, 8, 3


def _experts(dtype: torch.dtype) -> RoutedExperts:
    torch.manual_seed(0)
    experts = RoutedExperts(E, D, I).to(dtype)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return experts


def _routing(T: int, skew: bool, dtype: torch.dtype):
    """x [T, D], weights [T, K] fp32, topk [T, K]: distinct experts per token; ``skew`` puts every
    token on experts 0..K (so experts K+1.. get none)."""
    g = torch.Generator().manual_seed(T)
    x = torch.randn(T, D, generator=g, dtype=dtype)
    pool = K + 1 if skew else E
    topk = torch.stack([torch.randperm(pool, generator=g)[:K] for _ in range(T)])
    weights = torch.rand(T, K, generator=g)
    return x, weights, topk


def _loop(experts: RoutedExperts, x, weights, topk):
    """The reference: RoutedExperts' per-expert loop, called directly (whatever its own dispatch)."""
    per_expert = list(zip(experts.gate_proj.unbind(0), experts.up_proj.unbind(0), experts.down_proj.unbind(0)))
    return dispatch_experts(x, weights, topk, per_expert, swiglu_expert)


@pytest.mark.parametrize("T", [1, 2, 7, 40])
@pytest.mark.parametrize("skew", [False, True])
def test_gathered_experts_equal_the_loop_values_and_gradients(T, skew):
    ref_experts = _experts(torch.float64)
    x, weights, topk = _routing(T, skew, torch.float64)
    fast = GatheredExperts(ref_experts)
    outs, grads = [], []
    for run in (lambda *a: _loop(ref_experts, *a), fast):
        ref_experts.zero_grad()
        xi, wi = x.clone().requires_grad_(), weights.double().requires_grad_()
        y = run(xi, wi, topk)
        (y * torch.linspace(-1, 1, D, dtype=y.dtype)).sum().backward()
        outs.append(y.detach())
        grads.append([xi.grad, wi.grad] + [p.grad.clone() for p in ref_experts.parameters()])
    torch.testing.assert_close(outs[1], outs[0])
    for g_fast, g_ref in zip(grads[1], grads[0]):
        torch.testing.assert_close(g_fast, g_ref)
    if skew:  # experts without tokens get exactly zero gradient
        assert not ref_experts.gate_proj.grad[K + 1:].any()


@pytest.mark.parametrize("T", [1, 2, 7, 40])
@pytest.mark.parametrize("skew", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_experts_equal_the_loop(T, skew, dtype):
    experts = _experts(torch.float64)
    x, weights, topk = _routing(T, skew, torch.float64)
    ref = _loop(experts, x, weights, topk).detach()                       # float64
    low = RoutedExperts(E, D, I).to(dtype)
    low.load_state_dict(experts.state_dict())
    with torch.no_grad():
        y = GroupedExperts(low)(x.to(dtype), weights, topk)
    assert y.dtype == dtype and y.shape == (T, D)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol * ref.abs().max().item())


def test_grouped_experts_refuse_gradients_on_cpu():
    experts = _experts(torch.float32)
    x, weights, topk = _routing(3, False, torch.float32)
    with pytest.raises(RuntimeError, match="inference-only"):
        GroupedExperts(experts)(x, weights, topk)


def test_use_experts_replaces_modules_sharing_the_parameters():
    model = dsv3.Transformer(tiny_config())                       # one MoE layer + the MTP block's
    before = dict(model.state_dict(keep_vars=True))
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    originals = {m: m.experts for m in moes}
    assert len(moes) == 2
    previous = use_experts(model, "gathered")
    assert previous == originals
    for m in moes:
        assert type(m.experts) is GatheredExperts
        assert m.experts.gate_proj is originals[m].gate_proj and m.experts.down_proj is originals[m].down_proj
    after = dict(model.state_dict(keep_vars=True))
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)   # same names, same objects
    swap_experts(previous)
    assert all(m.experts is originals[m] for m in moes)
    # Experts that are already another implementation (quantized, FP8, ...) are left alone.
    use_experts(model, GroupedExperts)
    assert build_experts(model, "gathered") == {}
    with pytest.raises(ValueError, match="unknown experts implementation"):
        build_experts(model, "nope")


def test_expert_choice_switches_once_from_gathered_to_grouped_as_the_batch_grows():
    gate = torch.empty(64, 4, 4)
    tokens = range(1, 300)
    choices = [choose_experts(t, 6, gate) for t in tokens]
    switch = choices.index("grouped")                           # tokens[switch] is the first grouped size
    assert set(choices[:switch]) == {"gathered"} and set(choices[switch:]) == {"grouped"}
    assert tokens[switch - 1] * 6 <= GATHERED_MAX_READS_PER_EXPERT * 64 < tokens[switch] * 6
    # No CPU grouped GEMM for float64, nor for rows that are not a multiple of 16 bytes: gathered.
    assert choose_experts(256, 6, gate.double()) == "gathered"
    assert choose_experts(256, 6, torch.empty(64, 4, 12, dtype=torch.bfloat16)) == "gathered"
