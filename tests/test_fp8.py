"""FP8 block quantization and the official FP8 checkpoint layout."""

import json

import pytest
import torch
from conftest import blockwise_dequant64
from safetensors import safe_open

import dsv3
from dsv3 import fp8

E4M3_REL = 2.0 ** -4  # 3 mantissa bits: round-to-nearest error <= half an ulp = 2^-4 relative


@pytest.mark.parametrize("shape,block", [((300, 200), (128, 128)), ((576, 7168 // 8), (128, 128)),
                                         ((37, 50), (16, 16)), ((128, 256), (128, 128))])
def test_quantize_error_bounded_per_block_including_partial_edges(shape, block):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=g) * torch.logspace(-3, 1, shape[1])  # very different block ranges
    q, s = fp8.quantize_blockwise(w, block)
    R, C = -(-shape[0] // block[0]), -(-shape[1] // block[1])
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape
    assert s.dtype == torch.float32 and tuple(s.shape) == (R, C) == fp8.scale_shape(shape, block)
    back = fp8.dequantize_blockwise(q, s, block)
    for i in range(R):
        for j in range(C):
            sl = (slice(i * block[0], (i + 1) * block[0]), slice(j * block[1], (j + 1) * block[1]))
            wb, bb = w[sl], back[sl]
            amax = wb.abs().max()
            assert torch.isclose(s[i, j], amax / 448.0)
            # normal range: relative error; subnormals: bounded by the block's scale
            bound = torch.maximum(wb.abs() * E4M3_REL, s[i, j] * 2.0 ** -9)
            assert ((wb - bb).abs() <= bound * (1 + 1e-6)).all(), (i, j)
            # the block's largest entry maps to +-448 exactly
            k = wb.abs().argmax()
            assert q[sl].float().abs().flatten()[k] == 448.0


def test_v3_partial_edge_scale_shape():
    assert fp8.scale_shape((576, 7168)) == (5, 56)
    assert fp8.scale_shape((7168, 1536)) == (56, 12)


def test_zero_block_and_bad_scale_shape():
    w = torch.zeros(130, 10)
    q, s = fp8.quantize_blockwise(w)
    assert torch.equal(fp8.dequantize_blockwise(q, s), w)
    with pytest.raises(ValueError, match="scale shape"):
        fp8.dequantize_blockwise(q, torch.ones(1, 1))


@pytest.mark.parametrize("block", [(128, 128), (16, 16)])
def test_fp8_checkpoint_official_layout_round_trip(tmp_path, block):
    cfg = dsv3.ModelConfig.from_hf(dict(
        vocab_size=64, hidden_size=200, intermediate_size=136, moe_intermediate_size=40, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, n_routed_experts=4, n_group=2, topk_group=1,
        num_experts_per_tok=2, kv_lora_rank=48, q_lora_rank=72, qk_rope_head_dim=16, qk_nope_head_dim=16,
        v_head_dim=24, first_k_dense_replace=1, num_nextn_predict_layers=1, max_position_embeddings=64))
    torch.manual_seed(0)
    model = dsv3.Transformer(cfg)
    dsv3.save_pretrained(model, tmp_path, fp8_weights=True, block_size=block)

    conf = json.loads((tmp_path / "config.json").read_text())
    assert conf["quantization_config"] == {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                           "weight_block_size": list(block)}
    loaded = dsv3.load_pretrained(tmp_path, dtype=torch.float32)
    ours = loaded.state_dict()
    n_fp8 = 0
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        for name in keys:
            t = f.get_tensor(name)
            if name.endswith("_scale_inv"):
                continue
            high_precision = any(k in name for k in ("embed_tokens", "lm_head", "shared_head.head", "norm",
                                                      "mlp.gate.", "eh_proj"))
            if high_precision:
                assert t.dtype == torch.float32, name
                continue
            assert t.dtype == torch.float8_e4m3fn, name
            scale = f.get_tensor(name + "_scale_inv")
            assert tuple(scale.shape) == fp8.scale_shape(tuple(t.shape), block), name
            ref = blockwise_dequant64(t, scale, block).float()
            # find our tensor for this checkpoint name
            parts = name.split(".")
            layer = int(parts[2])
            base = f"layers.{layer}." if layer < cfg.num_hidden_layers else "mtp.0.block."
            rest = ".".join(parts[3:])
            if ".experts." in name:
                e, proj = int(parts[5]), parts[6]
                got = ours[f"{base}mlp.experts.{proj}"][e]
            else:
                got = ours[base + rest]
            assert torch.equal(got, ref), name  # exactly the dequantized reference
            n_fp8 += 1
    assert n_fp8 > 20
    assert "model.layers.1.self_attn.kv_a_proj_with_mqa.weight_scale_inv" in keys
    # and the model runs with the dequantized weights, close to the original
    ids = torch.randint(0, 64, (1, 12))
    with torch.no_grad():
        a, b = model(ids), loaded(ids)
    cos = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)
    assert cos > 0.99, float(cos)  # E4M3 keeps ~2 significant digits per weight


def test_fp8_checkpoint_loads_in_bf16_by_default(tmp_path):
    cfg = dsv3.preset("tiny").replace(num_hidden_layers=2, vocab_size=256)
    dsv3.save_pretrained(dsv3.Transformer(cfg), tmp_path, fp8_weights=True)
    m = dsv3.load_pretrained(tmp_path)
    assert m.layers[1].self_attn.kv_b_proj.weight.dtype == torch.bfloat16
    assert m.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32
