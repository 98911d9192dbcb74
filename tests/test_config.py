"""ModelConfig: validation messages, config.json round trips (DeepSeek and transformers-5 layouts), presets."""

import json

import pytest
import torch

import dsv3
from conftest import tiny_config
from dsv3.config import PRESETS, ConfigError, ModelConfig, preset


def test_tiny_config_is_valid_and_small():
    c = tiny_config()
    assert c.uses_q_lora and c.n_routed_experts == 8 and c.num_nextn_predict_layers == 1
    assert c.latent_dim == 16 + 8
    assert [c.is_moe_layer(i) for i in range(c.num_hidden_layers)] == [False, True]


def test_tiny_config_fixture(tiny_config):
    assert tiny_config(hidden_size=48).hidden_size == 48


# ---------------------------------------------------------------------- validation
@pytest.mark.parametrize("overrides, pattern", [
    (dict(n_routed_experts=9, n_group=4), r"n_routed_experts=9: must be divisible by n_group=4"),
    (dict(n_group=4, topk_group=5), r"topk_group=5: must be <= n_group=4"),
    # 4 groups of 2 experts, keep 1 group -> only 2 candidates for top-3
    (dict(n_group=4, topk_group=1, num_experts_per_tok=3), r"num_experts_per_tok=3: kept groups hold .*=2 experts, fewer"),
    (dict(topk_method="group_limited_greedy", scoring_func="softmax", n_group=4, topk_group=1, num_experts_per_tok=3),
     r"num_experts_per_tok=3: kept groups hold"),
    (dict(scoring_func="tanh"), r"scoring_func='tanh': unknown scoring function"),
    (dict(scoring_func="softmax"), r"scoring_func='softmax': topk_method 'noaux_tc'.*needs scoring_func 'sigmoid'"),
    (dict(num_key_value_heads=2), r"num_key_value_heads=2: must equal num_attention_heads=4"),
    (dict(qk_rope_head_dim=7), r"qk_rope_head_dim=7: must be even"),
    (dict(hidden_size=-32), r"hidden_size=-32: must be a positive integer"),
    (dict(hidden_size=0), r"hidden_size=0: must be a positive integer"),
    (dict(hidden_size=True), r"hidden_size=True: must be a positive integer"),
    (dict(hidden_size="32"), r"hidden_size='32': must be a positive integer"),
    (dict(kv_lora_rank=16.0), r"kv_lora_rank=16.0: must be a positive integer"),
    (dict(qk_nope_head_dim=-1), r"qk_nope_head_dim=-1: must be a non-negative integer"),
    (dict(n_routed_experts=False), r"n_routed_experts=False: must be a non-negative integer"),
    (dict(q_lora_rank=-4), r"q_lora_rank=-4: must be null or a non-negative integer"),
    (dict(num_experts_per_tok=0), r"num_experts_per_tok=0: must be in \[1, n_routed_experts=8\]"),
    (dict(rms_norm_eps=0.0), r"rms_norm_eps=0.0: must be"),
    (dict(routed_scaling_factor="2.5"), r"routed_scaling_factor='2.5': must be a number"),
    (dict(rope_scaling={"type": "yarn", "original_max_position_embeddings": 64}), r"rope_scaling\.factor: required for YaRN"),
    (dict(rope_scaling={"type": "yarn", "factor": 4}), r"rope_scaling\.original_max_position_embeddings: required"),
    (dict(rope_scaling={"type": "yarn", "factor": 0.5, "original_max_position_embeddings": 64}),
     r"rope_scaling\.factor=0\.5: must be >= 1"),
    (dict(rope_scaling={"type": "linear", "factor": 2.0}), r"rope_scaling\.type='linear': only 'yarn'"),
    (dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), r"rope_scaling\.type='dynamic': only 'yarn'"),
    (dict(model_type="llama"), r"model_type='llama': must be one of"),
    (dict(yarn_mode="sometimes"), r"yarn_mode='sometimes': must be one of"),
])
def test_validation_names_field_and_rule(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        tiny_config(**overrides)


def test_validation_accepts_the_boundaries():
    # Exactly enough experts in the kept groups, topk_group == n_group, no q-LoRA, V2 routing without groups.
    tiny_config(n_group=4, topk_group=1, num_experts_per_tok=2)
    tiny_config(n_group=4, topk_group=4, num_experts_per_tok=8)
    tiny_config(q_lora_rank=None)
    tiny_config(q_lora_rank=0)
    tiny_config(model_type="deepseek_v2", scoring_func="softmax", topk_method="greedy", n_group=1, topk_group=1,
                norm_topk_prob=False)


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_replace_validates():
    c = tiny_config()
    assert c.replace(hidden_size=48).hidden_size == 48
    with pytest.raises(ConfigError, match="topk_group"):
        c.replace(topk_group=7)


# ---------------------------------------------------------------------- config.json
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_hf_round_trip(name, tmp_path):
    c = preset(name)
    d = c.to_hf()
    assert ModelConfig.from_hf(d) == c
    # through an actual JSON file too (ints/floats/None survive)
    c.to_json_file(tmp_path / "config.json")
    assert ModelConfig.from_json_file(tmp_path) == c
    assert json.loads((tmp_path / "config.json").read_text()) == json.loads(json.dumps(d))


def test_to_hf_layout():
    d = preset("v3").to_hf()
    assert d["architectures"] == ["DeepseekV3ForCausalLM"]
    assert d["rope_scaling"]["type"] == d["rope_scaling"]["rope_type"] == "yarn"
    assert d["num_key_value_heads"] == d["num_attention_heads"] == 128
    assert "quantization_config" not in d
    assert preset("v2-lite").to_hf()["architectures"] == ["DeepseekV2ForCausalLM"]


def test_unknown_keys_survive_round_trip():
    d = tiny_config().to_hf()
    d["my_custom_key"] = {"nested": [1, 2, 3]}
    d["transformers_version"] = "4.46.3"
    c = ModelConfig.from_hf(d)
    assert c.extra == {"my_custom_key": {"nested": [1, 2, 3]}, "transformers_version": "4.46.3"}
    back = c.to_hf()
    assert back["my_custom_key"] == {"nested": [1, 2, 3]} and back["transformers_version"] == "4.46.3"
    assert ModelConfig.from_hf(back) == c
    # derived keys are not kept as extras
    d["head_dim"] = 8
    assert "head_dim" not in ModelConfig.from_hf(d).extra


YARN = {"factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1,
        "mscale": 1.0, "mscale_all_dim": 1.0}


@pytest.mark.parametrize("key", ["type", "rope_type"])
def test_from_hf_accepts_both_rope_type_spellings(key):
    d = tiny_config().to_hf()
    d["rope_scaling"] = {key: "yarn", **YARN}
    c = ModelConfig.from_hf(d)
    assert c.yarn is not None and c.yarn["factor"] == 40
    assert c.yarn_active()
    assert c.to_hf()["rope_scaling"]["type"] == c.to_hf()["rope_scaling"]["rope_type"] == "yarn"


def test_from_hf_transformers5_rope_parameters():
    d = preset("v3").to_hf()
    del d["rope_scaling"], d["rope_theta"]
    d["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 50000.0, **YARN}
    c = ModelConfig.from_hf(d)
    assert c.rope_theta == 50000.0
    assert c.yarn is not None and c.yarn["factor"] == 40 and c.yarn["original_max_position_embeddings"] == 4096
    assert "rope_theta" not in c.rope_scaling
    assert "rope_parameters" not in c.extra
    assert c == preset("v3").replace(rope_theta=50000.0)


def test_from_hf_transformers5_default_rope():
    d = tiny_config().to_hf()
    del d["rope_scaling"], d["rope_theta"]
    d["rope_parameters"] = {"rope_type": "default", "rope_theta": 1234.0}
    c = ModelConfig.from_hf(d)
    assert c.rope_theta == 1234.0 and c.rope_scaling is None and c.yarn is None


def test_from_hf_dtype_alias():
    d = tiny_config().to_hf()
    del d["torch_dtype"]
    d["dtype"] = "bfloat16"
    assert ModelConfig.from_hf(d).torch_dtype == "bfloat16"


def _v2_config_json():
    # What a DeepSeek-V2-Lite config.json looks like: no router fields V3 added.
    return {
        "model_type": "deepseek_v2", "architectures": ["DeepseekV2ForCausalLM"], "vocab_size": 102400,
        "hidden_size": 2048, "intermediate_size": 10944, "moe_intermediate_size": 1408, "num_hidden_layers": 27,
        "num_attention_heads": 16, "num_key_value_heads": 16, "n_shared_experts": 2, "n_routed_experts": 64,
        "kv_lora_rank": 512, "q_lora_rank": None, "qk_rope_head_dim": 64, "v_head_dim": 128,
        "qk_nope_head_dim": 128, "num_experts_per_tok": 6, "first_k_dense_replace": 1,
        "max_position_embeddings": 163840, "rope_theta": 10000, "aux_loss_alpha": 0.001,
        "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                         "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
    }


def test_from_hf_v2_defaults():
    c = ModelConfig.from_hf(_v2_config_json())
    assert c.model_type == "deepseek_v2"
    assert c.scoring_func == "softmax" and c.topk_method == "greedy" and c.norm_topk_prob is False
    assert c.q_lora_rank is None and not c.uses_q_lora
    assert c.num_nextn_predict_layers == 0
    assert c.extra == {"aux_loss_alpha": 0.001}
    assert ModelConfig.from_hf(c.to_hf()) == c
    # An explicit value in the file wins over the V2 default.
    d = _v2_config_json()
    d.update(topk_method="group_limited_greedy", n_group=8, topk_group=3)
    c = ModelConfig.from_hf(d)
    assert (c.topk_method, c.n_group, c.topk_group, c.scoring_func) == ("group_limited_greedy", 8, 3, "softmax")


def test_from_hf_v3_defaults_differ_from_v2():
    d = _v2_config_json()
    d["model_type"] = "deepseek_v3"
    d.update(n_group=8, topk_group=4)
    c = ModelConfig.from_hf(d)
    assert c.scoring_func == "sigmoid" and c.topk_method == "noaux_tc" and c.norm_topk_prob is True


@pytest.mark.parametrize("key, value, pattern", [
    ("hidden_size", "big", r"hidden_size='big'"),
    ("num_hidden_layers", None, r"num_hidden_layers=None"),
    ("rms_norm_eps", "x", r"rms_norm_eps='x'"),
    ("rope_theta", "x", r"rope_theta='x'"),
    ("moe_layer_freq", "x", r"moe_layer_freq='x'"),
    ("routed_scaling_factor", [2.5], r"routed_scaling_factor=\[2\.5\]"),
    ("q_lora_rank", True, r"q_lora_rank=True"),
    ("n_group", "4", r"n_group='4'"),
    ("rope_scaling", {"type": "yarn", "factor": "x", "original_max_position_embeddings": 4096},
     r"rope_scaling\.factor='x'"),
    ("rope_scaling", {"type": "yarn", "factor": 40, "original_max_position_embeddings": "4k"},
     r"rope_scaling\.original_max_position_embeddings='4k'"),
    ("rope_scaling", {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": "fast"},
     r"rope_scaling\.beta_fast='fast'"),
    ("rope_scaling", "yarn", r"rope_scaling='yarn': must be an object"),
    ("model_type", "llama", r"model_type='llama'"),
])
def test_from_hf_wrong_types_are_config_errors(key, value, pattern):
    d = tiny_config().to_hf()
    d[key] = value
    with pytest.raises(ConfigError, match=pattern):
        ModelConfig.from_hf(d)


def test_from_hf_rejects_non_objects(tmp_path):
    with pytest.raises(ConfigError, match="JSON object"):
        ModelConfig.from_hf([1, 2])
    d = tiny_config().to_hf()
    del d["rope_scaling"]
    d["rope_parameters"] = "yarn"
    with pytest.raises(ConfigError, match="rope_parameters"):
        ModelConfig.from_hf(d)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_json_file(tmp_path)
    with pytest.raises(ConfigError, match="no config.json"):
        ModelConfig.from_json_file(tmp_path / "missing")


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        preset("huge")


# ---------------------------------------------------------------------- presets
def test_v3_preset_numbers():
    c = preset("v3")
    assert (c.hidden_size, c.num_hidden_layers, c.n_routed_experts, c.num_experts_per_tok) == (7168, 61, 256, 8)
    assert (c.n_group, c.topk_group, c.routed_scaling_factor, c.first_k_dense_replace) == (8, 4, 2.5, 3)
    assert c.latent_dim == 576 and c.qk_head_dim == 192
    assert c.yarn["factor"] == 40 and c.yarn["original_max_position_embeddings"] == 4096


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_build_on_meta(name):
    c = preset(name)
    with torch.device("meta"):
        model = dsv3.Transformer(c)
    assert model.lm_head.weight.is_meta
    assert len(model.layers) == c.num_hidden_layers and len(model.mtp) == c.num_nextn_predict_layers
    n_moe = sum(c.is_moe_layer(i) for i in range(c.num_hidden_layers))
    assert len(model.moe_layers()) == n_moe
    if name == "v3":
        # The report's 671B main model; the MTP module adds ~11.6B (its embedding and head are shared).
        assert 670e9 < model.num_params(include_mtp=False) < 672e9
        assert 680e9 < model.num_params() < 686e9


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_keeps_the_latent_vllm_and_sglang_serve(name):
    # Their MLA kernels (FlashMLA, CPU_MLA/AMX_MLA) take only kv_lora_rank 512 + qk_rope_head_dim 64;
    # a preset drifting back to e.g. 64 + 16 would make every `dsv3 train --preset` output unservable.
    c = preset(name)
    assert (c.kv_lora_rank, c.qk_rope_head_dim, c.latent_dim) == (512, 64, 576)
    assert c.servable_latent and c.deployment_warnings() == []


@pytest.mark.parametrize("kv_lora_rank, rope", [(64, 16), (512, 32), (448, 128), (256, 64)])
def test_deployment_warning_names_the_engines_and_the_widths(kv_lora_rank, rope):
    # (448, 128) has the right sum but not the right split: the kernels fix both widths.
    c = tiny_config(kv_lora_rank=kv_lora_rank, qk_rope_head_dim=rope)
    assert not c.servable_latent
    (message,) = c.deployment_warnings()
    for needle in ("vLLM", "SGLang", "FlashMLA", "CPU_MLA/AMX_MLA", "kv_lora_rank=512", "qk_rope_head_dim=64",
                   "latent 576", f"kv_lora_rank={kv_lora_rank}", f"qk_rope_head_dim={rope}"):
        assert needle in message, needle
