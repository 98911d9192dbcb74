"""Logits parity with transformers' DeepseekV3ForCausalLM / DeepseekV2ForCausalLM on random tiny configs.

Both directions: transformers.save_pretrained -> dsv3.load_pretrained, and dsv3.save_pretrained ->
transformers.from_pretrained. fp32, max |delta logits| <= 1e-4.
"""

import warnings

import pytest
import torch

import dsv3
from dsv3 import ModelConfig

transformers = pytest.importorskip("transformers")

TOL = 1e-4


def hf_config_dict(**over):
    d = dict(model_type="deepseek_v3", vocab_size=97, hidden_size=48, intermediate_size=80, moe_intermediate_size=24,
             num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1,
             n_routed_experts=16, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, v_head_dim=12,
             qk_nope_head_dim=8, n_group=4, topk_group=2, num_experts_per_tok=3, first_k_dense_replace=1,
             routed_scaling_factor=2.5, norm_topk_prob=True, scoring_func="sigmoid", topk_method="noaux_tc",
             max_position_embeddings=128, rope_scaling=None, num_nextn_predict_layers=0, torch_dtype="float32")
    d.update(over)
    return d


YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 32, "beta_slow": 1,
        "mscale": 1.0, "mscale_all_dim": 1.0}

V3_CASES = {
    "qlora_g4k2_yarn": dict(rope_scaling=YARN),
    "no_qlora_g1": dict(q_lora_rank=None, n_group=1, topk_group=1),
    "qlora_g8k3": dict(n_group=8, topk_group=3, num_experts_per_tok=4),
    "g2k1_yarn_mscale_differs": dict(n_group=2, topk_group=1,
                                     rope_scaling=dict(YARN, rope_type="yarn", mscale=0.9, mscale_all_dim=0.707)),
    "dense_first2_no_shared": dict(first_k_dense_replace=2, n_shared_experts=0, num_hidden_layers=4),
}
V2_CASES = {
    "v2_greedy": dict(model_type="deepseek_v2", scoring_func="softmax", topk_method="greedy", n_group=1, topk_group=1,
                      q_lora_rank=None, norm_topk_prob=False, routed_scaling_factor=1.0, n_shared_experts=2),
    "v2_group_limited": dict(model_type="deepseek_v2", scoring_func="softmax", topk_method="group_limited_greedy",
                             n_group=4, topk_group=2, q_lora_rank=24, norm_topk_prob=False,
                             routed_scaling_factor=16.0, rope_scaling=dict(YARN, mscale=0.707, mscale_all_dim=0.707)),
}


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random (norm weights around 1) and a routing bias big enough to matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.5 * torch.rand(b.shape, generator=g))


def build_hf(d: dict, seed: int):
    cls_cfg = transformers.DeepseekV3Config if d["model_type"] == "deepseek_v3" else transformers.DeepseekV2Config
    cls = (transformers.DeepseekV3ForCausalLM if d["model_type"] == "deepseek_v3"
           else transformers.DeepseekV2ForCausalLM)
    kwargs = {k: v for k, v in d.items() if k not in ("model_type", "torch_dtype")}
    if d["model_type"] == "deepseek_v2":
        kwargs["n_routed_experts"] = kwargs.pop("n_routed_experts")
    cfg = cls_cfg(**kwargs, attn_implementation="eager")
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    randomize_(model, seed)
    return model


def input_ids(vocab: int, seq: int = 40, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("case", sorted(V3_CASES) + sorted(V2_CASES))
def test_transformers_checkpoint_loads_with_same_logits(case, tmp_path):
    d = hf_config_dict(**{**V3_CASES, **V2_CASES}[case])
    hf = build_hf(d, seed=len(case))
    hf.save_pretrained(tmp_path)
    ours = dsv3.load_pretrained(tmp_path)
    ids = input_ids(d["vocab_size"], seq=40)  # 40 > original_max_position_embeddings=16: YaRN matters
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours(ids)
    assert got.shape == ref.shape == (2, 40, d["vocab_size"])
    assert got.dtype == torch.float32
    err = (got - ref).abs().max().item()
    assert err <= TOL, f"{case}: max |delta logits| = {err:.3g}"


def test_routing_bias_changes_selection_and_still_matches(tmp_path):
    """The bias used above really moves tokens to other experts (so the parity covers it)."""
    d = hf_config_dict(**V3_CASES["qlora_g4k2_yarn"])
    hf = build_hf(d, seed=7)
    hf.save_pretrained(tmp_path)
    ours = dsv3.load_pretrained(tmp_path)
    ids = input_ids(d["vocab_size"])
    with torch.no_grad():
        ours(ids)
        with_bias = [m.gate.last_topk.sort(-1).values.clone() for m in ours.moe_layers()]
        for m in ours.moe_layers():
            m.gate.e_score_correction_bias.zero_()
        ours(ids)
        without = [m.gate.last_topk.sort(-1).values for m in ours.moe_layers()]
    changed = sum((a != b).any(-1).sum().item() for a, b in zip(with_bias, without))
    assert changed > 0.2 * ids.numel()


@pytest.mark.parametrize("case", ["qlora_g4k2_yarn", "no_qlora_g1", "v2_group_limited"])
def test_our_checkpoint_loads_in_transformers_with_same_logits(case, tmp_path):
    d = hf_config_dict(**{**V3_CASES, **V2_CASES}[case])
    config = ModelConfig.from_hf(dict(d, num_nextn_predict_layers=1 if d["model_type"] == "deepseek_v3" else 0))
    torch.manual_seed(1)
    ours = dsv3.Transformer(config).eval()
    randomize_(ours, seed=3)
    dsv3.save_pretrained(ours, tmp_path)
    cls = (transformers.DeepseekV3ForCausalLM if d["model_type"] == "deepseek_v3"
           else transformers.DeepseekV2ForCausalLM)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers ignores our MTP layer and says so
        hf = cls.from_pretrained(tmp_path, attn_implementation="eager", dtype=torch.float32).eval()
    ids = input_ids(d["vocab_size"], seq=33, seed=5)
    with torch.no_grad():
        err = (hf(ids).logits - ours(ids)).abs().max().item()
    assert err <= TOL, f"{case}: max |delta logits| = {err:.3g}"
    # Every tensor transformers has came from our file (none left at its random init).
    sd = hf.state_dict()
    for name, p in ours.named_parameters():
        if name == "layers.1.self_attn.kv_b_proj.weight":
            assert torch.equal(sd["model.layers.1.self_attn.kv_b_proj.weight"], p)


def test_transformers_checkpoint_without_mtp_weights_loads_without_mtp(tmp_path):
    d = hf_config_dict(num_nextn_predict_layers=1)
    build_hf(d, seed=2).save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="no MTP weights"):
        ours = dsv3.load_pretrained(tmp_path)
    assert ours.config.num_nextn_predict_layers == 0 and len(ours.mtp) == 0
