"""The grouped-GEMM experts fast path (CUDA, bf16) against the reference expert loop."""

import pytest
import torch

from dsv3.kernels.grouped_experts import grouped_mm_usable, grouped_swiglu
from dsv3.model.moe import RoutedExperts


def test_fast_path_is_not_taken_when_training_on_cpu():
    experts = RoutedExperts(4, 16, 8)
    assert not grouped_mm_usable(torch.zeros(2, 16), experts.gate_proj)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("skew", [False, True])
def test_grouped_swiglu_matches_loop_forward_and_backward(skew):
    torch.manual_seed(0)
    E, D, I, T, k = 16, 64, 32, 96, 4
    experts = RoutedExperts(E, D, I).cuda()
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(T, D, device="cuda")
    if skew:  # most tokens on experts 0..k-1, several experts with zero tokens
        topk = torch.stack([torch.randperm(k if t % 4 else E, device="cuda")[:k] for t in range(T)])
    else:
        topk = torch.stack([torch.randperm(E, device="cuda")[:k] for _ in range(T)])
    weights = torch.rand(T, k, device="cuda")
    outs, grads = [], []
    for fast in (True, False):
        experts.zero_grad()
        xi = x.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            assert grouped_mm_usable(xi, experts.gate_proj)
            if fast:
                y = grouped_swiglu(xi, weights, topk, experts.gate_proj, experts.up_proj, experts.down_proj)
            else:  # the reference loop, forced by running it in fp32 (autocast off)
                with torch.autocast("cuda", enabled=False):
                    y = RoutedExperts.forward(experts, xi, weights, topk)
        y.float().pow(2).sum().backward()
        outs.append(y.float())
        grads.append([xi.grad.float()] + [p.grad.float() for p in experts.parameters()])
    rel = (outs[0] - outs[1]).norm() / outs[1].norm()
    assert rel < 1e-2, rel  # bf16 operands vs fp32 reference
    for g_fast, g_ref in zip(grads[0], grads[1]):
        assert torch.isfinite(g_fast).all()
        assert (g_fast - g_ref).norm() / g_ref.norm() < 2e-2


def test_cpu_inference_grouped_path_matches_loop():
    torch.manual_seed(0)
    E, D, I, T, k = 8, 16, 12, 40, 3
    experts = RoutedExperts(E, D, I)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(T, D)
    topk = torch.stack([torch.randperm(4)[:k] for _ in range(T)])   # experts 4..7 get no tokens
    weights = torch.rand(T, k)
    with torch.no_grad():
        assert grouped_mm_usable(x, experts.gate_proj)
        fast = grouped_swiglu(x, weights, topk, experts.gate_proj, experts.up_proj, experts.down_proj)
    ref = experts(x, weights, topk)   # grad enabled: the loop
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
