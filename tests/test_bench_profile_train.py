"""``dsv3 bench profile-train`` (dsv3.bench.profile_train) on a very small config."""

import json

import pytest

from dsv3 import ModelConfig
from dsv3.bench.profile_train import CATEGORIES, format_profile_train, op_category, profile_train_step
from dsv3.cli import build_parser


def small_config() -> ModelConfig:
    return ModelConfig(vocab_size=97, hidden_size=48, intermediate_size=80, moe_intermediate_size=24,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1,
                       n_routed_experts=8, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, v_head_dim=12,
                       qk_nope_head_dim=8, n_group=4, topk_group=2, num_experts_per_tok=2, first_k_dense_replace=1,
                       max_position_embeddings=64, num_nextn_predict_layers=0, torch_dtype="float32")


def test_op_categories():
    assert op_category("aten::mm") == op_category("aten::addmm") == "gemm"
    assert op_category("aten::_to_copy") == "cast/copy" and op_category("aten::index_add_") == "index/dispatch"
    assert op_category("aten::something_new") == "other"
    names = [n for _, ops in CATEGORIES for n in ops]
    assert len(names) == len(set(names)), "an op in two categories"


def test_profile_train_step_per_dtype():
    r = profile_train_step(config=small_config(), batch_size=1, seq_len=8, steps=1, warmup=0, threads=1,
                           device="cpu", top=5)
    assert list(r["runs"]) == ["fp32", "bf16"] and r["preset"] == "custom"
    for run in r["runs"].values():
        assert sum(run["categories"].values()) == pytest.approx(run["total_ms"])
        assert run["categories"]["gemm"] > 0 and set(run["phase_ms"]) == {"forward", "backward", "optimizer"}
        assert len(run["top"]) == 5 and run["step_s"] > 0
    # bf16 autocast casts (weights down, gradients up); fp32 casts almost nothing
    assert r["runs"]["bf16"]["casts"] > r["runs"]["fp32"]["casts"]
    assert "cpu_flags" in r["machine"] and "bf16 units" in format_profile_train(r)
    json.dumps(r)


def test_cli_profile_train_flags():
    args = build_parser().parse_args(["bench", "profile-train", "--dtypes", "bf16", "--preset", "tiny"])
    assert args.dtypes == ["bf16"] and args.batch_size == 2 and args.seq_len == 128 and args.threads == 1
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "profile-train", "--dtypes", "fp16"])
