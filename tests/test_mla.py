"""Multi-head Latent Attention: naive vs absorbed, cached decoding, cache size, and a float64 reference."""

import math

import pytest
import torch

import dsv3
from conftest import TINY_YARN, tiny_config
from dsv3.config import preset
from dsv3.model.cache import LatentCache
from dsv3.model.mla import MLA
from dsv3.model.rope import RotaryEmbedding, rope_frequencies

CONFIGS = {
    "qlora": dict(),
    "no_qlora": dict(q_lora_rank=None),
    "qlora_yarn": dict(rope_theta=100.0, rope_scaling=dict(TINY_YARN)),
    "no_qlora_yarn": dict(q_lora_rank=None, rope_theta=100.0, rope_scaling=dict(TINY_YARN, mscale_all_dim=0.707)),
}


def random_mla(cfg, seed=0):
    """An MLA with weights large enough that attention is far from uniform, and non-trivial norm gains."""
    torch.manual_seed(seed)
    mla = MLA(cfg, layer_idx=0)
    with torch.no_grad():
        for name, p in mla.named_parameters():
            if name.endswith("layernorm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            else:  # o_proj at unit gain keeps the outputs O(1), so 1e-5 is a tight absolute bound
                gain = 1.0 if name.startswith("o_proj") else 1.5
                p.copy_(gain * torch.randn_like(p) / math.sqrt(p.shape[-1]))
    return mla


def run_mla(mla, cfg, x, start_pos=0, cache=None, absorb=False):
    rope = RotaryEmbedding(cfg)
    cos, sin = rope(torch.arange(start_pos, start_pos + x.shape[1]))
    return mla(x, cos, sin, cache=cache, start_pos=start_pos, absorb=absorb)


def reference_mla(mla, cfg, x):
    """From-scratch float64 MLA over a whole sequence (positions 0..S-1) with an explicit causal mask."""
    W = {n: p.detach().double() for n, p in mla.named_parameters()}
    x = x.double()
    B, S, _ = x.shape
    H, nope, rope, vd, r = (cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim,
                            cfg.v_head_dim, cfg.kv_lora_rank)
    eps = cfg.rms_norm_eps

    def rms(v, w):
        return v / torch.sqrt(v.pow(2).mean(-1, keepdim=True) + eps) * w

    if cfg.q_lora_rank:
        q = rms(x @ W["q_a_proj.weight"].T, W["q_a_layernorm.weight"]) @ W["q_b_proj.weight"].T
    else:
        q = x @ W["q_proj.weight"].T
    q = q.view(B, S, H, nope + rope)
    q_nope, q_pe = q[..., :nope], q[..., nope:]
    kv_a = x @ W["kv_a_proj_with_mqa.weight"].T
    c_kv, k_pe = rms(kv_a[..., :r], W["kv_a_layernorm.weight"]), kv_a[..., r:]

    inv_freq, cos_scale = rope_frequencies(cfg)
    angle = torch.arange(S, dtype=torch.float64)[:, None] * inv_freq.double()[None, :]  # [S, rope/2]
    rot = torch.polar(torch.full_like(angle, cos_scale), angle)

    def rotate(t):  # [..., S, (heads,) rope] interleaved pairs as complex numbers
        tc = torch.view_as_complex(t.reshape(*t.shape[:-1], rope // 2, 2).contiguous())
        return torch.view_as_real(tc * (rot if t.dim() == 3 else rot[:, None, :])).flatten(-2)

    q_pe, k_pe = rotate(q_pe), rotate(k_pe)
    kv = (c_kv @ W["kv_b_proj.weight"].T).view(B, S, H, nope + vd)
    k_nope, v = kv[..., :nope], kv[..., nope:]

    scale = (nope + rope) ** -0.5
    y = cfg.yarn
    if y is not None and cfg.yarn_active() and y.get("mscale_all_dim"):
        m = 0.1 * y["mscale_all_dim"] * math.log(y["factor"]) + 1
        scale *= m * m
    out = torch.zeros(B, S, H, vd, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for i in range(S):
                logits = torch.tensor([
                    (q_nope[b, i, h] @ k_nope[b, j, h] + q_pe[b, i, h] @ k_pe[b, j]).item() * scale
                    if j <= i else -math.inf for j in range(S)], dtype=torch.float64)
                p = torch.softmax(logits, dim=0)
                out[b, i, h] = p @ v[b, :, h]
    return out.reshape(B, S, H * vd) @ W["o_proj.weight"].T


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_naive_matches_absorbed(name):
    cfg = tiny_config(**CONFIGS[name])
    mla = random_mla(cfg)
    x = torch.randn(2, 13, cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        naive = run_mla(mla, cfg, x)
        absorbed = run_mla(mla, cfg, x, absorb=True)
    assert naive.abs().max() > 0.1  # non-trivial outputs
    assert (naive - absorbed).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_matches_float64_reference(name):
    cfg = tiny_config(**CONFIGS[name])
    mla = random_mla(cfg, seed=3)
    x = torch.randn(2, 7, cfg.hidden_size, generator=torch.Generator().manual_seed(4))
    ref = reference_mla(mla, cfg, x)
    with torch.no_grad():
        for absorb in (False, True):
            out = run_mla(mla, cfg, x, absorb=absorb)
            torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-5)


def test_attention_is_not_uniform_in_tests():
    # Guard for the tests above: with uniform attention the positional terms would hardly matter.
    cfg = tiny_config(**CONFIGS["qlora_yarn"])
    mla = random_mla(cfg)
    x = torch.randn(1, 13, cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        q_nope, q_pe, c_kv, k_pe = mla.project(x, *RotaryEmbedding(cfg)(torch.arange(13)))
        w_uk, _ = mla.absorbed_weights()
        s = (torch.einsum("bshn,hnr,btr->bsht", q_nope, w_uk, c_kv)
             + torch.einsum("bshd,btd->bsht", q_pe, k_pe)) * mla.softmax_scale
    p = s[0, -1].softmax(-1)  # last query sees all 13 keys
    assert p.max() > 3 / 13


@pytest.mark.parametrize("absorb", [False, True])
@pytest.mark.parametrize("name", ["qlora_yarn", "no_qlora"])
def test_module_chunked_cache_matches_reference(name, absorb):
    cfg = tiny_config(**CONFIGS[name])
    mla = random_mla(cfg, seed=5)
    S = 9
    x = torch.randn(2, S, cfg.hidden_size, generator=torch.Generator().manual_seed(6))
    ref = reference_mla(mla, cfg, x)
    cache = LatentCache(cfg, batch_size=2, max_len=12, num_layers=1)
    outs, pos = [], 0
    with torch.no_grad():
        for n in (4, 1, 3, 1):
            outs.append(run_mla(mla, cfg, x[:, pos:pos + n], start_pos=pos, cache=cache, absorb=absorb))
            pos += n
    torch.testing.assert_close(torch.cat(outs, 1).double(), ref, atol=2e-5, rtol=1e-5)


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    model = dsv3.Transformer(tiny_config(**overrides))
    model.init_weights(std=0.15)  # well away from uniform attention and uniform routing
    return model.eval()


@pytest.mark.parametrize("absorb", [False, True])
@pytest.mark.parametrize("chunks", [[1] * 12, [5, 1, 3, 2, 1], [12]], ids=["one_by_one", "mixed", "whole"])
def test_decoding_with_cache_matches_full_forward(chunks, absorb):
    model = tiny_model(rope_theta=100.0, rope_scaling=dict(TINY_YARN))
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2, 16)
        outs, pos = [], 0
        for n in chunks:
            outs.append(model(ids[:, pos:pos + n], start_pos=pos, cache=cache, absorb=absorb))
            pos += n
    assert full.std() > 0.1
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=1e-5)


def test_cache_overflow_is_an_error():
    model = tiny_model()
    cache = model.new_cache(1, 4)
    with pytest.raises(ValueError, match="cache holds 4 positions"):
        model(torch.zeros(1, 5, dtype=torch.long), cache=cache)


# ---------------------------------------------------------------------- what the cache holds
@pytest.mark.parametrize("dtype, size", [(torch.float32, 4), (torch.bfloat16, 2)])
def test_cache_holds_only_latents(dtype, size):
    B, L = 3, 20
    for heads in (4, 8):  # independent of the number of heads
        model = tiny_model(num_attention_heads=heads, num_key_value_heads=heads)
        c = model.config
        cache = model.new_cache(B, L, dtype=dtype)
        assert cache.nbytes() == c.num_hidden_layers * B * L * (c.kv_lora_rank + c.qk_rope_head_dim) * size
        assert len(cache.c_kv) == len(cache.k_pe) == c.num_hidden_layers
        assert cache.c_kv[0].shape == (B, L, c.kv_lora_rank) and cache.k_pe[0].shape == (B, L, c.qk_rope_head_dim)
        assert cache.c_kv[0].dtype == dtype


def test_v3_cache_bytes_per_token():
    c = preset("v3")
    per_token = LatentCache(c, batch_size=1, max_len=1, dtype=torch.bfloat16, device="meta").nbytes()
    assert per_token == 61 * 576 * 2 == 70272
    full_kv = 61 * 128 * (192 + 128) * 2  # per-head keys and values
    assert full_kv == 4_997_120
    assert round(100 * per_token / full_kv, 1) == 1.4


def test_cache_contents_are_normalized_ckv_and_rotated_kpe():
    model = tiny_model(seed=2)
    c = model.config
    ids = torch.randint(0, c.vocab_size, (2, 6), generator=torch.Generator().manual_seed(8))
    inputs = {}
    hooks = [layer.self_attn.register_forward_pre_hook(lambda mod, args, i=i: inputs.__setitem__(i, args[0]))
             for i, layer in enumerate(model.layers)]
    cache = model.new_cache(2, 10)
    with torch.no_grad():
        model(ids, cache=cache)
    for h in hooks:
        h.remove()
    inv_freq, _ = rope_frequencies(c)
    r = c.kv_lora_rank
    for i, layer in enumerate(model.layers):
        attn = layer.self_attn
        kv_a = inputs[i].double() @ attn.kv_a_proj_with_mqa.weight.double().T
        ckv = kv_a[..., :r]
        ckv = ckv / torch.sqrt(ckv.pow(2).mean(-1, keepdim=True) + c.rms_norm_eps) * attn.kv_a_layernorm.weight.double()
        kpe = torch.view_as_complex(kv_a[..., r:].reshape(2, 6, -1, 2).contiguous())
        kpe = torch.view_as_real(kpe * torch.polar(torch.ones(6, inv_freq.numel(), dtype=torch.float64),
                                                   torch.arange(6.0, dtype=torch.float64)[:, None] * inv_freq.double())
                                 ).flatten(-2)
        torch.testing.assert_close(cache.c_kv[i][:, :6].double(), ckv, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cache.k_pe[i][:, :6].double(), kpe, atol=1e-5, rtol=1e-5)
        assert not cache.c_kv[i][:, 6:].any() and not cache.k_pe[i][:, 6:].any()
