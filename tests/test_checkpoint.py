"""HF-layout checkpoint I/O: round trips, sharding, MTP names, and errors that name the tensor."""

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import dsv3
from dsv3 import CheckpointError
from dsv3.checkpoint import INDEX_FILE, NAME_TABLE, hf_names


def small_config(**over):
    d = dict(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
             num_attention_heads=2, num_key_value_heads=2, n_routed_experts=4, n_group=2, topk_group=1,
             num_experts_per_tok=2, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8,
             v_head_dim=8, first_k_dense_replace=1, num_nextn_predict_layers=1, max_position_embeddings=64,
             torch_dtype="float32")
    d.update(over)
    return dsv3.ModelConfig.from_hf(d)


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = dsv3.Transformer(small_config())
    with torch.no_grad():
        for m in model.moe_layers():
            m.gate.e_score_correction_bias.uniform_(-0.1, 0.1)
    dsv3.save_pretrained(model, tmp_path)
    return model, tmp_path


def test_round_trip_is_exact_and_names_follow_the_official_layout(saved):
    model, path = saved
    loaded = dsv3.load_pretrained(path)
    for (n1, t1), (n2, t2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert n1 == n2 and torch.equal(t1, t2), n1
    names = set(load_file(str(path / "model.safetensors")))
    N = 2  # MTP depth 1 lives at layer index num_hidden_layers
    for n in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight", "shared_head.head.weight",
              "embed_tokens.weight", "self_attn.kv_a_proj_with_mqa.weight", "mlp.experts.3.down_proj.weight",
              "mlp.gate.e_score_correction_bias", "mlp.shared_experts.up_proj.weight", "input_layernorm.weight"):
        assert f"model.layers.{N}.{n}" in names, n
    assert "model.layers.1.mlp.experts.0.gate_proj.weight" in names
    assert "model.layers.0.mlp.gate_proj.weight" in names  # dense first layer
    assert not any(p.name.endswith(".tmp") for p in path.iterdir())
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        a, b = model(ids, return_mtp=True), loaded(ids, return_mtp=True)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.mtp_logits[0], b.mtp_logits[0])


def test_every_parameter_has_exactly_one_checkpoint_name():
    model = dsv3.Transformer(small_config(num_nextn_predict_layers=2))
    seen = {}
    for name, t in model.state_dict().items():
        for hf, _ in hf_names(name, tuple(t.shape), model.config):
            assert hf not in seen, (hf, name, seen.get(hf))
            seen[hf] = name
    assert "model.layers.3.shared_head.norm.weight" in seen  # depth 2 at index N+1
    assert len(NAME_TABLE) >= 5


def test_sharded_save_writes_index_and_loads(tmp_path):
    torch.manual_seed(1)
    model = dsv3.Transformer(small_config())
    dsv3.save_pretrained(model, tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 2 and all((tmp_path / f).exists() for f in files)
    assert not (tmp_path / "model.safetensors").exists()
    total = sum(os.path.getsize(tmp_path / f) for f in files)
    assert index["metadata"]["total_size"] <= total
    loaded = dsv3.load_pretrained(tmp_path)
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    # re-saving unsharded removes the stale shards and the index
    dsv3.save_pretrained(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]


def test_bf16_load_and_save(saved, tmp_path):
    model, path = saved
    m = dsv3.load_pretrained(path, dtype="bfloat16")
    assert m.lm_head.weight.dtype == torch.bfloat16
    assert m.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32
    out = tmp_path / "bf16"
    dsv3.save_pretrained(model, out, dtype=torch.bfloat16)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.get_tensor("lm_head.weight").dtype == torch.bfloat16
        assert f.get_tensor("model.layers.1.mlp.gate.e_score_correction_bias").dtype == torch.float32


def _rewrite(path, fn):
    file = path / "model.safetensors"
    tensors = load_file(str(file))
    fn(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


def test_missing_tensor_is_named(saved):
    _, path = saved
    _rewrite(path, lambda t: t.pop("model.layers.1.self_attn.kv_b_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing.*model\.layers\.1\.self_attn\.kv_b_proj\.weight"):
        dsv3.load_pretrained(path)


def test_missing_expert_is_named(saved):
    _, path = saved
    _rewrite(path, lambda t: t.pop("model.layers.1.mlp.experts.2.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing.*experts\.2\.up_proj"):
        dsv3.load_pretrained(path)


def test_unexpected_tensor_is_named_and_can_be_allowed(saved):
    _, path = saved
    _rewrite(path, lambda t: t.__setitem__("model.layers.0.extra.weight", torch.zeros(3)))
    with pytest.raises(CheckpointError, match=r"unexpected.*model\.layers\.0\.extra\.weight"):
        dsv3.load_pretrained(path)
    with pytest.warns(UserWarning, match="extra.weight"):
        dsv3.load_pretrained(path, strict=False)


def test_wrong_shape_is_named(saved):
    _, path = saved
    _rewrite(path, lambda t: t.__setitem__("model.norm.weight", torch.ones(31)))
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight.*shape \[31\].*\[32\]"):
        dsv3.load_pretrained(path)


def test_wrong_dtype_is_named(saved):
    _, path = saved
    _rewrite(path, lambda t: t.__setitem__("lm_head.weight", torch.zeros(64, 32, dtype=torch.int32)))
    with pytest.raises(CheckpointError, match=r"lm_head\.weight.*dtype I32"):
        dsv3.load_pretrained(path)


def test_fp8_without_scale_is_named(saved):
    _, path = saved
    _rewrite(path, lambda t: t.__setitem__("model.layers.0.mlp.up_proj.weight",
                                           t["model.layers.0.mlp.up_proj.weight"].to(torch.float8_e4m3fn)))
    with pytest.raises(CheckpointError, match=r"up_proj\.weight.*no .*weight_scale_inv"):
        dsv3.load_pretrained(path)


def test_truncated_file_is_named(saved):
    _, path = saved
    file = path / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated or corrupt"):
        dsv3.load_pretrained(path)


def test_index_pointing_to_missing_shard(tmp_path):
    dsv3.save_pretrained(dsv3.Transformer(small_config()), tmp_path, max_shard_size="20KB")
    victim = sorted(p for p in tmp_path.iterdir() if p.name.startswith("model-"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=victim.name):
        dsv3.load_pretrained(tmp_path)


def test_pickle_weights_are_refused(tmp_path):
    small_config().to_json_file(tmp_path / "config.json")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="pickle"):
        dsv3.load_pretrained(tmp_path)


def test_malformed_config_is_reported(saved):
    _, path = saved
    (path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json"):
        dsv3.load_pretrained(path)
    (path / "config.json").write_text(json.dumps({"n_routed_experts": 6, "n_group": 4}))
    with pytest.raises(CheckpointError, match="n_routed_experts"):
        dsv3.load_pretrained(path)
    with pytest.raises(CheckpointError, match="not a directory"):
        dsv3.load_pretrained(path / "nope")


def test_loading_streams_peak_memory_near_model_size(tmp_path):
    """Load a ~120 MB sharded checkpoint in a fresh process; peak RSS grows by ~1x the model, not 2x."""
    import subprocess
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux /proc to reset the peak-RSS counter")
    import sys
    # Shaped like a real MoE: many mid-sized tensors, none a large share of the total.
    cfg = small_config(hidden_size=256, vocab_size=4096, intermediate_size=1024, moe_intermediate_size=256,
                       n_routed_experts=32, n_group=4, topk_group=2, num_attention_heads=4,
                       num_key_value_heads=4, num_hidden_layers=4)
    model = dsv3.Transformer(cfg)
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert size > 70e6
    dsv3.save_pretrained(model, tmp_path, max_shard_size="8MB")
    del model
    code = (
        "import torch, dsv3\n"
        "def hwm():\n"
        "    return int([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1])\n"
        "import dsv3.checkpoint\n"
        "with torch.device('meta'):  # torch's one-time meta-device set-up (~70 MB), not ours to count\n"
        "    dsv3.Transformer(dsv3.preset('tiny'))\n"
        "open('/proc/self/clear_refs', 'w').write('5')  # reset the peak-RSS counter after warm-up\n"
        "base = hwm()\n"
        f"m = dsv3.load_pretrained({str(tmp_path)!r})\n"
        "print(base, hwm())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    base_kb, peak_kb = map(int, out.split())
    grown = (peak_kb - base_kb) * 1024
    assert grown < 1.3 * size, f"peak grew {grown / 1e6:.0f} MB for a {size / 1e6:.0f} MB model"
