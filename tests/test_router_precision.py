"""The router runs in fp32 even under autocast (DESIGN.md §2; issue 17).

Under ``torch.autocast(..., dtype=torch.bfloat16)`` autocast recasts ``F.linear`` to bf16, which rounds
the sigmoid scores by ~4e-3 (more than the aux-loss-free bias step) and flips expert choices. The
reference here is an independent float64 computation of the logits and scores, so the test checks the
values the gate uses, not only that it agrees with itself outside autocast.
"""

import pytest
import torch
import torch.nn.functional as F

from dsv3.config import preset
from dsv3.model.moe import MoE, Router


def tiny_router(seed: int = 0, bias_scale: float = 0.01) -> Router:
    """The tiny preset's router with its training init (Normal(0, initializer_range)) and a small bias,
    the regime where near-equal scores make bf16 rounding flip choices."""
    cfg = preset("tiny")
    g = torch.Generator().manual_seed(seed)
    r = Router(cfg)
    with torch.no_grad():
        r.weight.copy_(torch.randn(r.weight.shape, generator=g) * cfg.initializer_range)
        if r.e_score_correction_bias is not None:
            r.e_score_correction_bias.copy_(torch.randn(cfg.n_routed_experts, generator=g) * bias_scale)
    return r


def tokens(router: Router, n: int = 512, seed: int = 1, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, router.weight.shape[1], generator=g).to(dtype)  # [T, D], like RMSNorm outputs


def test_tiny_router_is_sigmoid_noaux():
    # the premise of the other tests: the preset is V3's sigmoid + bias router
    r = tiny_router()
    assert r.scoring_func == "sigmoid" and r.e_score_correction_bias is not None


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_gate_under_cpu_bf16_autocast_equals_fp32(x_dtype):
    r = tiny_router()
    x = tokens(r, dtype=x_dtype)
    w_ref, topk_ref = r(x)                      # plain fp32 (x upcast inside)
    scores_ref = r.last_scores
    with torch.autocast("cpu", dtype=torch.bfloat16):
        w, topk = r(x)
    assert w.dtype == torch.float32, "the gate weights must be fp32 (the experts' contract)"
    assert r.last_scores.dtype == torch.float32
    torch.testing.assert_close(r.last_scores, scores_ref, rtol=0, atol=0)
    assert torch.equal(topk, topk_ref), "autocast changed which experts were chosen"
    torch.testing.assert_close(w, w_ref, rtol=0, atol=0)


def test_gate_scores_match_float64_reference_under_autocast():
    # independent of the gate's own fp32 path: float64 logits -> sigmoid, fp32 tolerance
    r = tiny_router()
    x = tokens(r)
    ref = torch.sigmoid(x.double() @ r.weight.double().T)                 # [T, E]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r(x)
    assert (r.last_scores.double() - ref).abs().max() < 1e-6  # bf16 rounding would be ~1e-3


def test_bf16_routing_would_differ():
    # Guards the tests' power: on these inputs bf16 logits really do change the (ungrouped) top-k of
    # the biased scores for some tokens, so the equalities above are not vacuous.
    r = tiny_router()
    x = tokens(r)
    bias = r.e_score_correction_bias
    fp32 = (torch.sigmoid(x @ r.weight.T) + bias).topk(r.top_k, dim=-1).indices.sort(-1).values
    bf16 = (torch.sigmoid(F.linear(x.bfloat16(), r.weight.bfloat16()).float()) + bias)
    bf16 = bf16.topk(r.top_k, dim=-1).indices.sort(-1).values
    assert int((fp32 != bf16).any(-1).sum()) > 0


def test_moe_layer_under_autocast_routes_as_fp32():
    cfg = preset("tiny")
    torch.manual_seed(0)
    moe = MoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, 0.0, cfg.initializer_range)
    x = torch.randn(2, 64, cfg.hidden_size)
    moe(x)
    topk_ref = moe.gate.last_topk
    with torch.autocast("cpu", dtype=torch.bfloat16):
        moe(x)
    assert torch.equal(moe.gate.last_topk, topk_ref)


def test_gate_compiles_with_autocast_disabled_region():
    # the trainer compiles routers (train/compile.py); the fp32 region must not break the graph
    r = tiny_router()
    x = tokens(r, n=64)
    w_ref, topk_ref = r(x)
    compiled = torch.compile(r, backend="eager", fullgraph=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        w, topk = compiled(x)
    assert w.dtype == torch.float32
    assert torch.equal(topk, topk_ref)
    torch.testing.assert_close(w, w_ref, rtol=0, atol=0)
