"""``dsv3 bench train`` on a very small config: the JSON has its fields, and ours and transformers are the same model."""

import json

import pytest

from dsv3 import ModelConfig
from dsv3.bench.train import bench_train, format_bench_train
from dsv3.cli import main

pytest.importorskip("transformers")


def small_config() -> ModelConfig:
    return ModelConfig(vocab_size=97, hidden_size=48, intermediate_size=80, moe_intermediate_size=24,
                       num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1,
                       n_routed_experts=16, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, v_head_dim=12,
                       qk_nope_head_dim=8, n_group=4, topk_group=2, num_experts_per_tok=3, first_k_dense_replace=1,
                       max_position_embeddings=128, num_nextn_predict_layers=1, torch_dtype="float32")


def test_bench_train_same_model_and_fields():
    r = bench_train(config=small_config(), batch_size=2, seq_len=16, steps=1, warmup=0, threads=1, mtp=True,
                    plain_ce=True, device="cpu")
    for key in ("preset", "config", "batch_size", "seq_len", "tokens_per_step", "steps", "warmup", "optimizer",
                "precision", "machine", "results", "ratio", "first_loss_ours", "first_loss_transformers",
                "first_loss_abs_diff", "first_loss_match", "logit_check"):
        assert key in r, key
    for key in ("cpu", "usable_cores", "threads", "torch", "date"):
        assert key in r["machine"], key
    assert r["machine"]["threads"] == 1
    assert r["config"]["num_nextn_predict_layers"] == 0      # MTP off for the comparison
    assert r["tokens_per_step"] == 2 * 16
    names = [x["name"] for x in r["results"]]
    assert names[0] == "dsv3" and names[1].startswith("transformers[sdpa") and names[2:] == ["dsv3[plain-ce]", "dsv3+mtp1"]
    assert r["results"][0]["fused_ce"] and not r["results"][2]["fused_ce"]
    assert list(r["ratios"]) == ["dsv3", "dsv3[plain-ce]", "dsv3+mtp1"] and r["ratios"]["dsv3"] == r["ratio"]
    for x in r["results"]:
        assert x["tokens_per_s"] > 0 and x["step_s_median"] > 0 and len(x["step_s_all"]) == 1
    assert r["ratio"] > 0
    # Same weights, same batch, same loss code: the same model gives the same first-step loss.
    assert r["first_loss_abs_diff"] <= 1e-4 and r["first_loss_match"]
    assert abs(r["first_loss_ours"] - r["first_loss_transformers"]) <= 1e-4
    assert all(v["max_abs_diff"] <= 1e-4 for v in r["logit_check"].values())
    # The fused head (ours) and full logits + F.cross_entropy (plain-ce, transformers) give the same loss.
    assert abs(r["results"][2]["first_loss"] - r["first_loss_transformers"]) <= 1e-4
    assert list(r["first_loss_abs_diff_by_impl"]) == ["dsv3", "dsv3[plain-ce]"]
    assert max(r["first_loss_abs_diff_by_impl"].values()) <= 1e-4
    # MTP adds lambda * CE_mtp to the same main loss, so it is strictly larger.
    assert r["results"][3]["first_loss"] > r["first_loss_ours"]
    json.dumps(r)                                              # JSON-ready
    assert "ratio ours /" in format_bench_train(r)


def test_cli_bench_train_writes_json(tmp_path, capsys):
    # The CLI takes presets only: the tiny one, on a batch of 8 tokens.
    out = tmp_path / "bench.json"
    status = main(["bench", "train", "--preset", "tiny", "--batch-size", "1", "--seq-len", "8", "--steps", "1",
                   "--warmup", "0", "--threads", "1", "--device", "cpu", "--json", str(out)])
    assert status == 0
    r = json.loads(out.read_text())
    assert r["preset"] == "tiny" and r["first_loss_match"]
    assert "tokens/s" in capsys.readouterr().out


def test_bench_refuses_huge_presets():
    with pytest.raises(ValueError, match="parameters"):
        bench_train(preset="v3", steps=1, warmup=0)


def test_bench_train_bf16_times_ours_in_both_precisions():
    # On this machine auto may well be fp32; --dtype bf16 forces bf16 autocast for every line.
    r = bench_train(config=small_config(), batch_size=2, seq_len=16, steps=1, warmup=0, threads=1, device="cpu",
                    dtype="bf16")
    assert r["dtype"] == "bf16" and r["precision"] == "bf16 autocast"
    names = [x["name"] for x in r["results"]]
    assert names[0] == "dsv3" and names[1].startswith("transformers[") and names[2] == "dsv3[fp32]"
    assert [x["dtype"] for x in r["results"]] == ["bf16", "bf16", "fp32"]
    by = {x["name"]: x for x in r["results"]}
    assert r["ratio_bf16_vs_fp32"] == pytest.approx(by["dsv3"]["tokens_per_s"] / by["dsv3[fp32]"]["tokens_per_s"])
    # the same model in bf16: ours and transformers agree to the autocast tolerance, and our bf16 first
    # loss is our fp32 one up to bf16 rounding (not another model: an untrained model's loss is ~log V)
    assert r["first_loss_tolerance"] == pytest.approx(2e-3) and r["first_loss_match"]
    assert abs(by["dsv3"]["first_loss"] - by["dsv3[fp32]"]["first_loss"]) < 2e-2
    assert by["dsv3"]["first_loss"] != by["dsv3[fp32]"]["first_loss"]          # bf16 really ran
    for key in ("cpu_flags", "bf16_units", "torch_cpu_capability"):
        assert key in r["machine"], key
    assert "ratio ours bf16 / ours fp32" in format_bench_train(r)
    json.dumps(r)


def test_bench_train_rejects_an_unknown_dtype():
    with pytest.raises(ValueError, match="expected one of auto, bf16, fp32"):
        bench_train(config=small_config(), batch_size=1, seq_len=8, steps=1, warmup=0, device="cpu", dtype="fp16")
