"""Shared test helpers: a tiny random-test config with every V3 feature switched on.

Import it as ``from conftest import tiny_config`` or ask for the ``tiny_config`` fixture (a factory).
"""

from __future__ import annotations

import pytest

from dsv3 import ModelConfig

# Small enough for CPU tests in milliseconds; keeps q-LoRA, group-limited routing (4 groups of 2,
# keep 2), a shared expert, one dense first layer and one MTP module.
TINY = dict(
    vocab_size=96, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
    num_hidden_layers=2, num_nextn_predict_layers=1, num_attention_heads=4, num_key_value_heads=4,
    kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=12,
    n_routed_experts=8, n_shared_experts=1, n_group=4, topk_group=2, num_experts_per_tok=2,
    first_k_dense_replace=1, routed_scaling_factor=2.5, max_position_embeddings=256,
    rope_scaling=None, torch_dtype="float32",
)

# A small YaRN setting whose ramp is not degenerate for d=8 (low=0, high=3 with theta 100, L=64).
TINY_YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
             "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}


def tiny_config(**overrides) -> ModelConfig:
    """A tiny, validated ``ModelConfig``; keyword arguments override any field."""
    return ModelConfig(**{**TINY, **overrides})


@pytest.fixture(name="tiny_config")
def tiny_config_fixture():
    return tiny_config
