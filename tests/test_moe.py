"""DeepSeekMoE: the router against a brute-force per-token reference, the experts against a naive loop."""

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_config
from dsv3.model.moe import MoE, RoutedExperts, Router


# ---------------------------------------------------------------------- brute-force references
def reference_route(x, weight, bias, cfg):
    """Per token, straight from DESIGN.md §2. Returns a list of {expert: gate weight} dicts."""
    logits = x.double() @ weight.double().T
    E, G, k = cfg.n_routed_experts, cfg.n_group, cfg.num_experts_per_tok
    per = E // G
    out = []
    for t in range(x.shape[0]):
        if cfg.scoring_func == "sigmoid":
            s = [1 / (1 + math.exp(-v)) for v in logits[t].tolist()]
        else:
            z = [math.exp(v) for v in logits[t].tolist()]
            s = [v / sum(z) for v in z]
        sel = [s[e] + (0.0 if bias is None else float(bias[e])) for e in range(E)]
        candidates = list(range(E))
        if cfg.topk_method in ("noaux_tc", "group_limited_greedy"):
            group_score = []
            for g in range(G):
                members = sorted(sel[g * per:(g + 1) * per], reverse=True)
                group_score.append(sum(members[:2]) if cfg.topk_method == "noaux_tc" else members[0])
            kept = sorted(range(G), key=lambda g: -group_score[g])[:cfg.topk_group]
            candidates = [e for e in range(E) if e // per in kept]
        chosen = sorted(candidates, key=lambda e: -sel[e])[:k]
        w = {e: s[e] for e in chosen}  # unbiased scores
        if cfg.scoring_func == "sigmoid":
            if cfg.norm_topk_prob:
                total = sum(w.values())
                w = {e: v / total for e, v in w.items()}
            w = {e: v * cfg.routed_scaling_factor for e, v in w.items()}
        elif cfg.norm_topk_prob and k > 1:
            total = sum(w.values())
            w = {e: v / total for e, v in w.items()}
        else:
            w = {e: v * cfg.routed_scaling_factor for e, v in w.items()}
        out.append(w)
    return out


def as_dicts(weights, topk):
    return [dict(zip(ids.tolist(), ws.tolist())) for ws, ids in zip(weights, topk)]


def assert_same_routing(got, ref, tol=1e-5):
    assert len(got) == len(ref)
    for t, (g, r) in enumerate(zip(got, ref)):
        assert set(g) == set(r), f"token {t}: experts {sorted(g)} != reference {sorted(r)}"
        for e in r:
            assert g[e] == pytest.approx(r[e], abs=tol), f"token {t}, expert {e}"


def expert_ffn(experts, e, x):
    return experts.down_proj[e] @ (F.silu(experts.gate_proj[e] @ x) * (experts.up_proj[e] @ x))


def naive_routed(experts, x, routing):
    y = torch.zeros_like(x)
    for t, choice in enumerate(routing):
        for e, w in choice.items():
            y[t] += w * expert_ffn(experts, e, x[t])
    return y


def random_router(cfg, seed=0, bias_std=0.0):
    torch.manual_seed(seed)
    router = Router(cfg)
    with torch.no_grad():
        router.weight.normal_(0, 0.4)
        if router.e_score_correction_bias is not None:
            router.e_score_correction_bias.normal_(0, bias_std)
    return router


# ---------------------------------------------------------------------- router
V3_ROUTING = {  # (n_routed_experts, n_group, topk_group, num_experts_per_tok)
    "8e_4g_keep2_top2": (8, 4, 2, 2),
    "16e_4g_keep2_top4": (16, 4, 2, 4),
    "16e_8g_keep3_top4": (16, 8, 3, 4),
    "12e_3g_keep1_top3": (12, 3, 1, 3),
    "8e_1g_top3": (8, 1, 1, 3),
}


@pytest.mark.parametrize("name", sorted(V3_ROUTING))
def test_v3_router_matches_brute_force(name):
    E, G, TG, k = V3_ROUTING[name]
    cfg = tiny_config(n_routed_experts=E, n_group=G, topk_group=TG, num_experts_per_tok=k)
    router = random_router(cfg, seed=E + G, bias_std=0.3)
    x = torch.randn(64, cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    bias = router.e_score_correction_bias.clone()
    with torch.no_grad():
        weights, topk = router(x)
    assert weights.dtype == torch.float32 and weights.shape == topk.shape == (64, k)
    ref = reference_route(x, router.weight, bias, cfg)
    assert_same_routing(as_dicts(weights, topk), ref)

    # The bias is large enough to move the selection (otherwise this test could not catch its misuse) ...
    unbiased = reference_route(x, router.weight, None, cfg)
    assert sum(set(a) != set(b) for a, b in zip(ref, unbiased)) >= 3
    # ... and the group rule binds (plain top-k over all experts would differ for some tokens).
    if TG < G:
        flat = reference_route(x, router.weight, bias, cfg.replace(n_group=1, topk_group=1))
        assert any(set(a) != set(b) for a, b in zip(ref, flat))
    # Each token's experts lie in at most topk_group groups.
    per = E // G
    assert max(len({e // per for e in row.tolist()}) for row in topk) <= TG


def test_router_bias_selects_but_never_weighs():
    cfg = tiny_config()
    router = random_router(cfg, seed=3)
    x = torch.randn(32, cfg.hidden_size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        router.e_score_correction_bias[5] = 10.0  # every token must pick expert 5
        weights, topk = router(x)
    assert bool((topk == 5).any(-1).all())
    s = torch.sigmoid(x @ router.weight.detach().T)
    chosen = s.gather(1, topk)
    expected = chosen / chosen.sum(-1, keepdim=True) * cfg.routed_scaling_factor
    torch.testing.assert_close(weights, expected, atol=1e-6, rtol=1e-5)
    # With the bias in the weights, expert 5 would take almost all of the scale.
    w5 = weights[topk == 5]
    assert bool((w5 < 0.9 * cfg.routed_scaling_factor).all())
    assert router.e_score_correction_bias.requires_grad is False
    assert "e_score_correction_bias" not in dict(router.named_parameters())
    assert "e_score_correction_bias" in router.state_dict()


def test_dropped_groups_lose_even_with_negative_scores():
    # Biased scores all negative: a dropped group must still never win (it is -inf, not 0).
    cfg = tiny_config()
    router = random_router(cfg, seed=4)
    x = torch.randn(32, cfg.hidden_size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        router.e_score_correction_bias.fill_(-5.0)
        router.e_score_correction_bias[:4] = -3.0  # groups 0 and 1 win
        _, topk = router(x)
    assert bool((topk < 4).all())


def test_sigmoid_without_normalization():
    cfg = tiny_config(norm_topk_prob=False, routed_scaling_factor=1.5)
    router = random_router(cfg, seed=5, bias_std=0.3)
    x = torch.randn(40, cfg.hidden_size, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        weights, topk = router(x)
    assert_same_routing(as_dicts(weights, topk),
                        reference_route(x, router.weight, router.e_score_correction_bias, cfg))


V2_ROUTING = {  # topk_method, n_group, topk_group, norm_topk_prob, k
    "greedy": ("greedy", 1, 1, False, 2),
    "greedy_norm": ("greedy", 1, 1, True, 3),
    "greedy_k1_norm": ("greedy", 1, 1, True, 1),  # V2 normalizes only when k > 1
    # With group max, top-k never leaves the best k groups, so the rule can only bind when k > topk_group.
    "group_limited": ("group_limited_greedy", 4, 2, False, 3),
    "group_limited_keep1": ("group_limited_greedy", 4, 1, False, 2),
}


@pytest.mark.parametrize("name", sorted(V2_ROUTING))
def test_v2_router_matches_brute_force(name):
    method, G, TG, norm, k = V2_ROUTING[name]
    cfg = tiny_config(model_type="deepseek_v2", scoring_func="softmax", topk_method=method, n_group=G,
                      topk_group=TG, norm_topk_prob=norm, num_experts_per_tok=k, routed_scaling_factor=1.7)
    router = random_router(cfg, seed=6)
    assert router.e_score_correction_bias is None
    x = torch.randn(48, cfg.hidden_size, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        weights, topk = router(x)
    ref = reference_route(x, router.weight, None, cfg)
    assert_same_routing(as_dicts(weights, topk), ref)
    if not norm:  # weights = softmax over all experts x routed_scaling_factor
        p = torch.softmax(x @ router.weight.detach().T, dim=-1)
        torch.testing.assert_close(weights, p.gather(1, topk) * 1.7, atol=1e-6, rtol=1e-5)
    if method == "group_limited_greedy":  # the group rule (group max) binds for some tokens
        flat = reference_route(x, router.weight, None, cfg.replace(topk_method="greedy", n_group=1, topk_group=1))
        assert any(set(a) != set(b) for a, b in zip(ref, flat))


def test_last_counts_scores_topk():
    cfg = tiny_config()
    router = random_router(cfg, seed=7, bias_std=0.3)
    T, k = 50, cfg.num_experts_per_tok
    x = torch.randn(T, cfg.hidden_size, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        _, topk = router(x)
    counts = router.last_counts
    assert counts.shape == (cfg.n_routed_experts,)
    assert int(counts.sum()) == T * k
    ref = reference_route(x, router.weight, router.e_score_correction_bias, cfg)
    expected = torch.bincount(torch.tensor([e for row in ref for e in row]), minlength=cfg.n_routed_experts)
    assert torch.equal(counts, expected)
    assert torch.equal(router.last_topk, topk)
    torch.testing.assert_close(router.last_scores, torch.sigmoid(x @ router.weight.detach().T), atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------- experts and the whole layer
def random_experts(E=8, D=32, I=16, seed=0):
    torch.manual_seed(seed)
    experts = RoutedExperts(E, D, I)
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(0, 0.3)
    return experts


@pytest.mark.parametrize("pattern", ["random", "two_experts_only", "all_to_last"])
def test_routed_experts_match_naive_loop(pattern):
    experts = random_experts()
    g = torch.Generator().manual_seed(7)
    T, k = 20, 2
    x = torch.randn(T, 32, generator=g)
    if pattern == "random":
        topk = torch.stack([torch.randperm(8, generator=g)[:k] for _ in range(T)])
    elif pattern == "two_experts_only":  # six experts receive no token
        topk = torch.tensor([[1, 5]] * T)
        topk[::2] = torch.tensor([5, 1])
    else:
        topk = torch.tensor([[7, 0]] * T)
    weights = torch.rand(T, k, generator=g)
    with torch.no_grad():
        y = experts(x, weights, topk)
        ref = naive_routed(experts, x, as_dicts(weights, topk))
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)


def random_moe(cfg, seed=0, bias_std=0.3):
    torch.manual_seed(seed)
    moe = MoE(cfg)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.3)
        moe.gate.e_score_correction_bias.normal_(0, bias_std)
    return moe


@pytest.mark.parametrize("n_shared", [0, 1, 2])
def test_moe_is_shared_plus_routed(n_shared):
    cfg = tiny_config(n_shared_experts=n_shared)
    moe = random_moe(cfg, seed=n_shared)
    x = torch.randn(2, 9, cfg.hidden_size, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        y = moe(x)
        flat = x.reshape(-1, cfg.hidden_size)
        routing = reference_route(flat, moe.gate.weight, moe.gate.e_score_correction_bias, cfg)
        expected = naive_routed(moe.experts, flat, routing).view_as(x)
        if n_shared:
            sh = moe.shared_experts
            assert sh.gate_proj.weight.shape == (n_shared * cfg.moe_intermediate_size, cfg.hidden_size)
            expected = expected + sh.down_proj(F.silu(sh.gate_proj(x)) * sh.up_proj(x))
        else:
            assert moe.shared_experts is None
    assert y.shape == x.shape
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)


def test_moe_backward():
    cfg = tiny_config()
    moe = random_moe(cfg, seed=9, bias_std=0.0)
    with torch.no_grad():
        moe.gate.e_score_correction_bias[6:] = -10.0  # the last group (experts 6, 7) never gets a token
    x = torch.randn(1, 5, cfg.hidden_size, generator=torch.Generator().manual_seed(9))
    y = moe(x)
    counts = moe.gate.last_counts
    assert counts[6:].sum() == 0 and (counts[:6] > 0).sum() >= 2
    loss = y.pow(2).sum()
    loss.backward()
    used = counts > 0
    for p in (moe.experts.gate_proj, moe.experts.up_proj, moe.experts.down_proj):
        per_expert = p.grad.flatten(1).abs().sum(-1)
        assert bool((per_expert[used] > 0).all())
        assert bool((per_expert[~used] == 0).all())
    g = moe.gate.weight.grad
    assert g is not None and bool((g[used].abs().sum(-1) > 0).all())
    # Unchosen experts' rows get no gradient with sigmoid gates (only the chosen scores enter).
    assert bool((g[~used] == 0).all())
    assert moe.gate.e_score_correction_bias.grad is None

    # The router gradient is the gradient of the gate weights: check it by central differences
    # (a small step does not change the selection).
    eps = 1e-2
    for e in torch.nonzero(used).flatten()[:2].tolist():
        with torch.no_grad():
            w = moe.gate.weight
            w[e, 0] += eps
            up = moe(x).pow(2).sum().item()
            w[e, 0] -= 2 * eps
            down = moe(x).pow(2).sum().item()
            w[e, 0] += eps
        assert (up - down) / (2 * eps) == pytest.approx(g[e, 0].item(), rel=2e-2, abs=1e-3)
