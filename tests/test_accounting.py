"""The accounting formulas against real models (parameter counts) and the published V3/V2-Lite numbers."""

import json

import pytest
import torch
from torch import nn

import dsv3
from dsv3 import ModelConfig, Transformer, preset
from dsv3.accounting import (cache_bytes_per_token, flops_per_token, format_summary,
                             full_kv_cache_bytes_per_token, param_counts, summary)
from dsv3.model.moe import MoE, Router

from conftest import tiny_config


def small_config(**changes) -> ModelConfig:
    """The shared tiny test config, with the four-layer shape (one dense, three MoE) the variants assume."""
    base = dict(num_hidden_layers=4, num_nextn_predict_layers=1, first_k_dense_replace=1, moe_layer_freq=1,
                n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2, n_shared_experts=1)
    base.update(changes)
    if "num_attention_heads" in changes:
        base["num_key_value_heads"] = changes["num_attention_heads"]
    return tiny_config(**base)


VARIANTS = {
    "v3-like": {},
    "no-q-lora": dict(q_lora_rank=None),
    "q-lora-zero": dict(q_lora_rank=0),
    "dense-only": dict(n_routed_experts=0),
    "all-moe": dict(first_k_dense_replace=0),
    "all-dense-by-k": dict(first_k_dense_replace=9),  # main layers and the MTP block (index 4) dense
    "mtp-off": dict(num_nextn_predict_layers=0),
    "mtp-2": dict(num_nextn_predict_layers=2),
    "no-shared": dict(n_shared_experts=0),
    "two-shared": dict(n_shared_experts=2),
    "freq-2": dict(moe_layer_freq=2, num_hidden_layers=5, num_nextn_predict_layers=2),  # MTP idx 5 dense, 6 MoE
    "tied": dict(tie_word_embeddings=True),
    "biases": dict(attention_bias=True, mlp_bias=True),
    "biases-no-q-lora": dict(attention_bias=True, mlp_bias=True, q_lora_rank=None),
    "v2-softmax": dict(model_type="deepseek_v2", scoring_func="softmax", topk_method="greedy",
                       norm_topk_prob=False, n_group=1, topk_group=1),
    "heads-3": dict(num_attention_heads=3, v_head_dim=12),
}


def measured(model: Transformer) -> dict:
    main = model.num_params(include_mtp=False)
    buffers = sum(m.e_score_correction_bias.numel() for m in model.modules()
                  if isinstance(m, Router) and m.e_score_correction_bias is not None)
    return {"total": main, "mtp": model.num_params() - main, "router_bias_buffer": buffers}


def active_matmul(model: Transformer) -> int:
    """Matmul weights one token uses in the main model, counted from the modules (not the formula)."""
    n = 0
    main = [model.lm_head, *model.layers]
    for top in main:
        for m in top.modules():
            if isinstance(m, nn.Linear):
                n += m.weight.numel()
            elif isinstance(m, Router):
                n += m.weight.numel()
            elif isinstance(m, MoE):
                e = m.experts
                n += sum(p.numel() for p in e.parameters()) * model.config.num_experts_per_tok // e.gate_proj.shape[0]
    return n


@pytest.mark.parametrize("name", list(VARIANTS))
def test_formula_matches_built_model(name):
    cfg = small_config(**VARIANTS[name])
    model = Transformer(cfg)
    p = param_counts(cfg)
    got = measured(model)
    assert p["total"] == got["total"]
    assert p["mtp"] == got["mtp"]
    assert p["router_bias_buffer"] == got["router_bias_buffer"]
    # The pieces add up, and per-token numbers are consistent with the module structure.
    assert p["total"] == (p["embedding"] + p["head"] + p["attention"] + p["dense_mlp"] + p["moe"] + p["norms"])
    assert p["moe"] == p["moe_routed_experts"] + p["moe_shared_experts"] + p["moe_router"]
    unused = p["moe_layers"] * (cfg.n_routed_experts - cfg.num_experts_per_tok) * p["routed_expert"]
    assert p["active"] == p["total"] - unused
    assert p["checkpoint_total"] == p["total"] + p["mtp"] + p["mtp_shared_copies"]
    assert flops_per_token(cfg, 16)["matmul_params"] == active_matmul(model)


def test_component_counts_match_modules():
    cfg = small_config(n_shared_experts=2, attention_bias=True)
    model = Transformer(cfg)
    p = param_counts(cfg)

    def count(attr):
        return sum(sum(q.numel() for q in getattr(layer, attr).parameters()) for layer in model.layers)

    assert p["attention"] == count("self_attn")
    assert p["embedding"] == model.embed_tokens.weight.numel()
    assert p["head"] == model.lm_head.weight.numel()
    moes = model.moe_layers()
    assert p["moe_layers"] == len(moes) == 3 and p["dense_layers"] == 1
    assert p["moe_routed_experts"] == sum(sum(q.numel() for q in m.experts.parameters()) for m in moes)
    assert p["moe_shared_experts"] == sum(sum(q.numel() for q in m.shared_experts.parameters()) for m in moes)
    assert p["moe_router"] == sum(m.gate.weight.numel() for m in moes)


def test_tied_head_counted_once():
    tied, untied = param_counts(small_config(tie_word_embeddings=True)), param_counts(small_config())
    assert tied["head"] == 0 and untied["total"] - tied["total"] == untied["head"]
    # The tied table is the output head too: nothing is "embedding only".
    assert tied["active_no_embedding"] == tied["active"]
    assert untied["active"] - untied["active_no_embedding"] == untied["embedding"]
    # ...but the head matmul is still done.
    assert flops_per_token(small_config(tie_word_embeddings=True), 8) == flops_per_token(small_config(), 8)


@pytest.mark.parametrize("name", ["v3", "v2-lite"])
def test_formula_matches_meta_build_of_presets(name):
    cfg = preset(name)
    with torch.device("meta"):
        model = Transformer(cfg)
    got = measured(model)
    p = param_counts(cfg)
    assert (p["total"], p["mtp"], p["router_bias_buffer"]) == (got["total"], got["mtp"], got["router_bias_buffer"])


def test_v3_numbers():
    cfg = preset("v3")
    p = param_counts(cfg)
    assert p["total"] == 671_026_404_352                       # "671B"
    assert 11.5e9 < p["mtp"] < 11.7e9                          # MTP module without the shared embed/head
    assert 684e9 < p["checkpoint_total"] < 685e9               # the HF checkpoint's "685B"
    assert 671e9 + 13e9 < p["total"] + p["mtp"] + p["mtp_shared_copies"] < 671e9 + 14e9  # "+14B of MTP"
    assert 37e9 < p["active"] < 38e9                           # 37.55B with the embedding table
    assert 36e9 < p["active_no_embedding"] < 37e9              # 36.63B without
    assert p["moe_layers"] == 58 and p["dense_layers"] == 3
    assert p["routed_expert"] == 3 * 7168 * 2048
    assert p["router_bias_buffer"] == 256 * (58 + 1)

    assert cache_bytes_per_token(cfg) == 70_272
    assert cache_bytes_per_token(cfg, dtype_bytes=1) == 35_136
    assert cache_bytes_per_token(cfg, include_mtp=True) == 62 * 576 * 2
    assert full_kv_cache_bytes_per_token(cfg) == 4_997_120
    assert round(100 * cache_bytes_per_token(cfg) / full_kv_cache_bytes_per_token(cfg), 1) == 1.4

    f = flops_per_token(cfg, 4096)
    assert f["forward_attention"] == 2 * 61 * 128 * (192 + 128) * 4096
    assert f["matmul_params"] == p["active_no_embedding"] - 61 * (1536 + 512 + 2 * 7168) - 7168
    assert f["forward"] == 2 * f["matmul_params"] + f["forward_attention"]
    assert f["training"] == 3 * f["forward"]
    assert 90e9 < f["forward"] < 100e9


def test_v2_lite_numbers():
    p = param_counts(preset("v2-lite"))
    assert 15.6e9 < p["total"] < 15.8e9                    # paper: 15.7B ("16B")
    assert 2.4e9 < p["active_no_embedding"] < 2.5e9        # paper: 2.4B activated
    assert 2.6e9 < p["active"] < 2.7e9                     # with the 102400 x 2048 embedding table
    assert p["mtp"] == p["mtp_shared_copies"] == 0
    assert p["router_bias_buffer"] == 0                    # greedy softmax router: no correction bias
    assert cache_bytes_per_token(preset("v2-lite")) == 27 * 576 * 2


def test_flops_attention_grows_with_context():
    cfg = small_config()
    a, b = flops_per_token(cfg, 100), flops_per_token(cfg, 200)
    assert a["forward_matmul"] == b["forward_matmul"]
    assert b["forward_attention"] == 2 * a["forward_attention"]
    with pytest.raises(ValueError):
        flops_per_token(cfg, 0)


def test_summary_is_json_and_formats():
    for name in dsv3.config.PRESETS:
        s = summary(preset(name), seq_len=1024, dtype="fp8", name=name)
        assert json.loads(json.dumps(s)) == s
        text = format_summary(s)
        assert name in text and "active per token" in text and "YaRN" in text
    s = summary(preset("v3"))
    assert s["cache"]["latent_bytes_per_token"] == 70_272
    assert s["rope"]["yarn"] and s["rope"]["yarn_mode"] == "always" and s["rope"]["factor"] == 40
    assert "671.03B" in format_summary(s)
    past = summary(preset("v3").replace(yarn_mode="past_original"), seq_len=4096)["rope"]
    assert past["yarn_mode"] == "past_original" and past["yarn_active"] is False
    with pytest.raises(ValueError):
        summary(preset("tiny"), dtype="int3")
