"""FP8 inference: FP8Linear vs float64, weights kept as FP8 (load/save), `dsv3 convert`, transformers
parity of our FP8 output, and the engine running an FP8 model."""

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import blockwise_dequant64, tiny_config
from safetensors import safe_open

import dsv3
from dsv3 import fp8
from dsv3.cli import main
from dsv3.quant import FP8Linear, FP8RoutedExperts, load_pretrained_fp8, quantize_model
from dsv3.quant.linear import FP8MLA

BLOCK = (16, 16)  # tiny models: 16x16 blocks so that layers span several blocks (128 is the default)


def small_config(**over):
    return tiny_config(hidden_size=64, intermediate_size=96, moe_intermediate_size=40, **over)


def test_fp8_linear_matches_float64_of_its_quantized_operands():
    torch.manual_seed(0)
    lin = torch.nn.Linear(70, 45, bias=True)            # partial blocks in both dims
    f = FP8Linear.from_linear(lin, BLOCK)
    x = torch.randn(3, 5, 70)
    y = f(x)
    assert y.shape == (3, 5, 45) and y.dtype == torch.float32
    # independent float64 computation of the same operands
    xq, xs = fp8.quantize_tiles(x.reshape(15, 70), BLOCK[1])
    X = xq.double() * xs.double().repeat_interleave(BLOCK[1], 1)[:, :70]
    W = f.weight.double() * f.weight_scale_inv.double().repeat_interleave(16, 0)[:45].repeat_interleave(16, 1)[:, :70]
    ref = (X @ W.T + lin.bias.double()).view(3, 5, 45)
    assert (y.double() - ref).abs().max() < 1e-5
    # and FP8 is close to the original layer (E4M3 keeps ~2 significant digits)
    assert F.cosine_similarity(y.flatten(), lin(x).flatten(), dim=0) > 0.995


def test_quantize_model_keeps_fp8_and_matches_bf16_closely():
    torch.manual_seed(0)
    model = dsv3.Transformer(small_config()).eval()
    ids = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        ref = model(ids)
        quantize_model(model, BLOCK)
        attn = model.layers[1].self_attn
        assert isinstance(attn, FP8MLA) and isinstance(attn.kv_b_proj, FP8Linear)
        assert isinstance(model.layers[1].mlp.experts, FP8RoutedExperts)
        assert isinstance(model.mtp[0].block.mlp.experts, FP8RoutedExperts)
        # high precision stays high precision
        for m in (model.lm_head, model.mtp[0].eh_proj):
            assert type(m) is torch.nn.Linear
        assert model.layers[1].mlp.gate.weight.dtype == torch.float32
        out = model(ids)
        assert F.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.99
        # absorbed decode folds the dequantized kv_b_proj; naive runs it as an FP8 GEMM
        absorbed = model(ids, absorb=True)
        assert F.cosine_similarity(out.flatten(), absorbed.flatten(), dim=0) > 0.999
        model.to(torch.bfloat16)  # casting the model leaves FP8 storage and fp32 scales alone
        assert attn.kv_b_proj.weight.dtype == torch.float8_e4m3fn
        assert attn.kv_b_proj.weight_scale_inv.dtype == torch.float32
        assert model.layers[1].mlp.experts.gate_proj_scale_inv.dtype == torch.float32
    assert model.config.quantization_config["weight_block_size"] == list(BLOCK)


def test_keep_fp8_load_holds_the_checkpoint_bytes_and_saves_them_back(tmp_path):
    torch.manual_seed(0)
    model = dsv3.Transformer(small_config())
    dsv3.save_pretrained(model, tmp_path / "a", fp8_weights=True, block_size=BLOCK)
    kept = load_pretrained_fp8(tmp_path / "a", dtype=torch.float32)
    deq = dsv3.load_pretrained(tmp_path / "a", dtype=torch.float32)
    state = kept.state_dict()
    with safe_open(str(tmp_path / "a" / "model.safetensors"), "pt") as f:
        w = f.get_tensor("model.layers.1.mlp.experts.3.down_proj.weight")
        s = f.get_tensor("model.layers.1.mlp.experts.3.down_proj.weight_scale_inv")
        assert torch.equal(state["layers.1.mlp.experts.down_proj"][3].view(torch.uint8), w.view(torch.uint8))
        assert torch.equal(state["layers.1.mlp.experts.down_proj_scale_inv"][3], s)
        q = f.get_tensor("model.layers.1.self_attn.kv_a_proj_with_mqa.weight")
        assert torch.equal(state["layers.1.self_attn.kv_a_proj_with_mqa.weight"].view(torch.uint8), q.view(torch.uint8))
    # FP8 storage: 1 byte per element where the dequantizing load holds 4
    fp8_bytes = sum(t.numel() for t in state.values() if t.dtype == torch.float8_e4m3fn)
    assert fp8_bytes > 0.8 * sum(p.numel() for p in deq.parameters() if p.dim() >= 2 and p.shape[0] != 96)
    ids = torch.randint(0, 96, (1, 10))
    with torch.no_grad():
        assert F.cosine_similarity(kept(ids).flatten(), deq(ids).flatten(), dim=0) > 0.999
    # saving the FP8 model writes the same official tensors and quantization_config
    dsv3.save_pretrained(kept, tmp_path / "b")
    conf = json.loads((tmp_path / "b" / "config.json").read_text())
    assert conf["quantization_config"]["weight_block_size"] == list(BLOCK)
    with safe_open(str(tmp_path / "a" / "model.safetensors"), "pt") as fa, \
            safe_open(str(tmp_path / "b" / "model.safetensors"), "pt") as fb:
        assert set(fa.keys()) == set(fb.keys())
        for k in fa.keys():
            ta, tb = fa.get_tensor(k), fb.get_tensor(k)
            assert ta.dtype == tb.dtype and torch.equal(ta.float(), tb.float()), k


def test_keep_fp8_on_a_high_precision_checkpoint_quantizes_it(tmp_path):
    dsv3.save_pretrained(dsv3.Transformer(small_config()), tmp_path)
    m = load_pretrained_fp8(tmp_path)
    assert m.layers[0].mlp.down_proj.weight.dtype == torch.float8_e4m3fn
    assert m.config.quantization_config["weight_block_size"] == [128, 128]


@pytest.mark.parametrize("scale_fmt", ["none", "ue8m0"])
def test_convert_to_fp8_and_back_official_layout(tmp_path, capsys, scale_fmt):
    torch.manual_seed(0)
    src, f8, back = tmp_path / "src", tmp_path / "fp8", tmp_path / "bf16"
    model = dsv3.Transformer(small_config())
    dsv3.save_pretrained(model, src, max_shard_size=60_000)   # sharded: the index is rewritten too
    (src / "tokenizer_config.json").write_text("{}")
    assert main(["convert", str(src), str(f8), "--to", "fp8", "--block", "16", "16", "--scale-fmt", scale_fmt]) == 0
    assert "quantized" in capsys.readouterr().out
    conf = json.loads((f8 / "config.json").read_text())
    qc = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [16, 16]}
    if scale_fmt == "ue8m0":
        qc["scale_fmt"] = "ue8m0"
    assert conf["quantization_config"] == qc
    assert (f8 / "tokenizer_config.json").exists()
    index = json.loads((f8 / "model.safetensors.index.json").read_text())["weight_map"]
    orig = model.state_dict()
    n_fp8 = 0
    for name, fname in index.items():
        with safe_open(str(f8 / fname), "pt") as f:
            t = f.get_tensor(name)
            if name.endswith("_scale_inv"):
                continue
            if name.endswith("e_score_correction_bias"):
                assert t.dtype == torch.float32
            elif any(k in name for k in ("embed_tokens", "lm_head", "shared_head", "norm", "mlp.gate.", "eh_proj")):
                assert t.dtype == torch.bfloat16, name
            else:
                assert t.dtype == torch.float8_e4m3fn, name
                sname = name + "_scale_inv"
                with safe_open(str(f8 / index[sname]), "pt") as fs:
                    s = fs.get_tensor(sname)
                assert tuple(s.shape) == fp8.scale_shape(tuple(t.shape), (16, 16))   # partial edges included
                if scale_fmt == "ue8m0":
                    assert torch.equal(torch.exp2(torch.log2(s).round()), s)
                w = blockwise_dequant64(t, s, (16, 16))
                if name == "model.layers.1.self_attn.q_b_proj.weight":
                    err = (w - orig["layers.1.self_attn.q_b_proj.weight"].double()).abs()
                    assert (err <= orig["layers.1.self_attn.q_b_proj.weight"].double().abs() / 16 + 1e-4).all()
                n_fp8 += 1
    assert n_fp8 > 20
    kept = load_pretrained_fp8(f8)
    assert kept.layers[1].self_attn.o_proj.scale_fmt == (None if scale_fmt == "none" else "ue8m0")

    assert main(["convert", str(f8), str(back), "--to", "bf16"]) == 0
    assert "quantization_config" not in json.loads((back / "config.json").read_text())
    m8 = dsv3.load_pretrained(f8, dtype=torch.float32)
    mb = dsv3.load_pretrained(back, dtype=torch.float32)
    for (n, a), (_, b) in zip(m8.state_dict().items(), mb.state_dict().items()):
        assert torch.equal(a.to(torch.bfloat16), b.to(torch.bfloat16)) or "e_score" in n, n


def test_convert_errors_are_named(tmp_path, capsys):
    dsv3.save_pretrained(dsv3.Transformer(small_config()), tmp_path / "m", fp8_weights=True)
    with pytest.raises(SystemExit):
        main(["convert", str(tmp_path / "m"), str(tmp_path / "x"), "--to", "fp8"])
    assert "already holds FP8 weights" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["convert", str(tmp_path / "nope"), str(tmp_path / "y"), "--to", "bf16"])
    assert "no config.json" in capsys.readouterr().err


def test_our_fp8_output_loads_in_transformers_with_the_same_logits(tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    import transformers.quantizers.quantizer_finegrained_fp8 as hf_fp8
    # transformers demands `accelerate` before it loads any FP8 checkpoint, but its CPU path
    # (dequantize to high precision) never uses it; accelerate is not a dependency of dsv3.
    monkeypatch.setattr(hf_fp8, "is_accelerate_available", lambda: True)
    transformers.logging.set_verbosity_error()
    # Every weight a multiple of 128 in both dims: transformers' CPU dequantization derives the block
    # from the scale grid and so mis-scales partial edge blocks (DESIGN.md §2); the formula is the oracle there.
    cfg = dsv3.ModelConfig.from_hf(dict(
        vocab_size=128, hidden_size=256, intermediate_size=256, moe_intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, n_routed_experts=4, n_group=2, topk_group=1,
        num_experts_per_tok=2, kv_lora_rank=128, q_lora_rank=128, qk_rope_head_dim=128, qk_nope_head_dim=64,
        v_head_dim=128, first_k_dense_replace=1, num_nextn_predict_layers=0, max_position_embeddings=64,
        torch_dtype="float32"))
    torch.manual_seed(0)
    dsv3.save_pretrained(dsv3.Transformer(cfg), tmp_path / "src")
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "fp8"), "--to", "fp8"]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "fp8", dtype=torch.float32).float().eval()
    ours_deq = dsv3.load_pretrained(tmp_path / "fp8", dtype=torch.float32)
    ours_fp8 = load_pretrained_fp8(tmp_path / "fp8", dtype=torch.float32)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = hf(ids).logits.float()
        deq, kept = ours_deq(ids), ours_fp8(ids)
    # same weights: transformers dequantizes our FP8 tensors exactly as our formula does
    assert (theirs - deq).abs().max() < 1e-4
    # our FP8 path also quantizes activations per 1x128 tile (transformers does on a GPU, not on CPU):
    # E4M3 activations (~2 significant digits) move random-init logits by a few percent
    assert F.cosine_similarity(theirs.flatten(), kept.flatten(), dim=0) > 0.99


def test_engine_runs_an_fp8_model_unchanged(tmp_path):
    torch.manual_seed(0)
    dsv3.save_pretrained(dsv3.Transformer(small_config()), tmp_path, fp8_weights=True, block_size=BLOCK)
    model = load_pretrained_fp8(tmp_path, dtype=torch.float32)
    llm = dsv3.LLM(model, block_size=4)
    prompt = [5, 17, 42, 3, 8]
    out = llm.generate([prompt], dsv3.SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))[0]
    # the same greedy tokens as recomputing the whole sequence through the FP8 model each step
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(6):
            ids.append(int(model(torch.tensor([ids]), absorb=True)[0, -1].argmax()))
    assert out.token_ids == ids[len(prompt):]
    # from the checkpoint path, weights kept in FP8
    llm = dsv3.LLM(tmp_path, block_size=4, keep_fp8=True)
    assert llm.model.layers[1].mlp.experts.gate_proj.dtype == torch.float8_e4m3fn
    again = llm.generate([prompt], dsv3.SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))[0]
    assert again.token_ids == out.token_ids
