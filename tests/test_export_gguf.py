"""``dsv3 export --to gguf``: the file read back with ``gguf.GGUFReader`` against the source checkpoint.

The expectations are written here from llama.cpp's deepseek2 loader (``src/models/deepseek2.cpp``:
key names, ``create_tensor`` names and ggml shapes) and from the checkpoint read directly with
safetensors, not from the exporter's own tables. Running llama.cpp itself is in
tests/interop/test_llama_cpp.py.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

import dsv3  # noqa: E402
from conftest import CHAT_TEXT, far_from_ties_, tiny_config  # noqa: E402
from dsv3.cli import main  # noqa: E402
from dsv3.config import PRESETS, preset  # noqa: E402
from dsv3.export.gguf import ExportError, check_config, export_gguf  # noqa: E402
from dsv3.model.moe import Router  # noqa: E402
from dsv3.tokenizer import Tokenizer, train_tokenizer  # noqa: E402

Q = gguf.GGMLQuantizationType
EXTRA_IDS = 5  # the model's vocab_size exceeds the tokenizer's: llama.cpp needs a token per row

# Servable latent width (kv_lora_rank 512 + rope 64). Every matrix row is a multiple of 32 except
# attn_output's (num_heads * v_head_dim = 80), so q8_0 covers almost everything and its F16 fallback once.
SHAPE = dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_attention_heads=2,
             num_key_value_heads=2, kv_lora_rank=512, q_lora_rank=64, qk_rope_head_dim=64, qk_nope_head_dim=32,
             v_head_dim=40, n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=2)


def build_checkpoint(path, **overrides) -> tuple[str, dsv3.ModelConfig]:
    """A random far-from-ties model with a random router bias, saved with a small BPE tokenizer."""
    tok = train_tokenizer([CHAT_TEXT], vocab_size=300)
    cfg = tiny_config(**{**SHAPE, "vocab_size": tok.vocab_size + EXTRA_IDS, **overrides})
    torch.manual_seed(0)
    model = far_from_ties_(dsv3.Transformer(cfg), router_bias=0.1)
    dsv3.save_pretrained(model, path)
    tok.save(path)
    return str(path), cfg


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory):
    """out_type -> GGUFReader of the export of ``checkpoint``."""
    src, _ = checkpoint
    out = tmp_path_factory.mktemp("gguf")
    readers = {}
    for t in ("f32", "f16", "bf16", "q8_0"):
        export_gguf(src, out / f"m-{t}.gguf", t)
        readers[t] = gguf.GGUFReader(out / f"m-{t}.gguf")
    return readers


def fields(reader) -> dict:
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def source_tensors(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(f"{path}/model.safetensors")


# ---------------------------------------------------------------------------------------------
# What llama.cpp's deepseek2 loader asks for (create_tensor calls; ggml ne order = numpy reversed)


def expected_tensors(c: dsv3.ModelConfig) -> dict[str, tuple[int, ...]]:
    D, V, H = c.hidden_size, c.vocab_size, c.num_attention_heads
    R, rope, nope, v = c.kv_lora_rank, c.qk_rope_head_dim, c.qk_nope_head_dim, c.v_head_dim
    E, I, Ish = c.n_routed_experts, c.moe_intermediate_size, c.moe_intermediate_size * c.n_shared_experts
    k_mla = nope + rope
    out = {"token_embd.weight": (D, V), "output_norm.weight": (D,), "output.weight": (D, V)}
    for i in range(c.num_hidden_layers + c.num_nextn_predict_layers):
        b = f"blk.{i}."
        out |= {b + "attn_norm.weight": (D,), b + "attn_kv_a_norm.weight": (R,),
                b + "attn_kv_a_mqa.weight": (D, R + rope), b + "attn_k_b.weight": (nope, R, H),
                b + "attn_v_b.weight": (R, v, H), b + "attn_output.weight": (H * v, D), b + "ffn_norm.weight": (D,)}
        if c.q_lora_rank:
            out |= {b + "attn_q_a_norm.weight": (c.q_lora_rank,), b + "attn_q_a.weight": (D, c.q_lora_rank),
                    b + "attn_q_b.weight": (c.q_lora_rank, H * k_mla)}
        else:
            out[b + "attn_q.weight"] = (D, H * k_mla)
        if i < c.first_k_dense_replace:
            out |= {b + "ffn_gate.weight": (D, c.intermediate_size), b + "ffn_up.weight": (D, c.intermediate_size),
                    b + "ffn_down.weight": (c.intermediate_size, D)}
        else:
            out |= {b + "ffn_gate_inp.weight": (D, E), b + "ffn_gate_exps.weight": (D, I, E),
                    b + "ffn_up_exps.weight": (D, I, E), b + "ffn_down_exps.weight": (I, D, E),
                    b + "ffn_gate_shexp.weight": (D, Ish), b + "ffn_up_shexp.weight": (D, Ish),
                    b + "ffn_down_shexp.weight": (Ish, D)}
            if c.topk_method == "noaux_tc":
                out[b + "exp_probs_b.bias"] = (E,)
        if i >= c.num_hidden_layers:
            out |= {b + "nextn.eh_proj.weight": (2 * D, D), b + "nextn.enorm.weight": (D,),
                    b + "nextn.hnorm.weight": (D,), b + "nextn.shared_head_norm.weight": (D,)}
    return out


def hf_source(name: str, src: dict[str, torch.Tensor], c: dsv3.ModelConfig) -> torch.Tensor:
    """The checkpoint tensor (numpy layout) a GGUF tensor must hold, from the HF names."""
    top = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
    if name in top:
        return src[top[name]]
    _, i, rest = name.split(".", 2)
    p = f"model.layers.{i}."
    kv_b = lambda: src[p + "self_attn.kv_b_proj.weight"].view(  # noqa: E731
        c.num_attention_heads, c.qk_nope_head_dim + c.v_head_dim, c.kv_lora_rank)
    special = {
        "attn_k_b.weight": lambda: kv_b()[:, :c.qk_nope_head_dim].transpose(1, 2),
        "attn_v_b.weight": lambda: kv_b()[:, c.qk_nope_head_dim:],
        "ffn_gate_exps.weight": lambda: torch.stack(
            [src[p + f"mlp.experts.{e}.gate_proj.weight"] for e in range(c.n_routed_experts)]),
        "ffn_up_exps.weight": lambda: torch.stack(
            [src[p + f"mlp.experts.{e}.up_proj.weight"] for e in range(c.n_routed_experts)]),
        "ffn_down_exps.weight": lambda: torch.stack(
            [src[p + f"mlp.experts.{e}.down_proj.weight"] for e in range(c.n_routed_experts)]),
    }
    if rest in special:
        return special[rest]()
    hf = {"attn_norm.weight": "input_layernorm.weight", "attn_q_a.weight": "self_attn.q_a_proj.weight",
          "attn_q_a_norm.weight": "self_attn.q_a_layernorm.weight", "attn_q_b.weight": "self_attn.q_b_proj.weight",
          "attn_q.weight": "self_attn.q_proj.weight",
          "attn_kv_a_mqa.weight": "self_attn.kv_a_proj_with_mqa.weight",
          "attn_kv_a_norm.weight": "self_attn.kv_a_layernorm.weight", "attn_output.weight": "self_attn.o_proj.weight",
          "ffn_norm.weight": "post_attention_layernorm.weight", "ffn_gate.weight": "mlp.gate_proj.weight",
          "ffn_up.weight": "mlp.up_proj.weight", "ffn_down.weight": "mlp.down_proj.weight",
          "ffn_gate_inp.weight": "mlp.gate.weight", "exp_probs_b.bias": "mlp.gate.e_score_correction_bias",
          "ffn_gate_shexp.weight": "mlp.shared_experts.gate_proj.weight",
          "ffn_up_shexp.weight": "mlp.shared_experts.up_proj.weight",
          "ffn_down_shexp.weight": "mlp.shared_experts.down_proj.weight",
          "nextn.eh_proj.weight": "eh_proj.weight", "nextn.enorm.weight": "enorm.weight",
          "nextn.hnorm.weight": "hnorm.weight", "nextn.shared_head_norm.weight": "shared_head.norm.weight"}[rest]
    return src[p + hf]


def always_f32(name: str, ne: tuple[int, ...]) -> bool:
    return len(ne) == 1 or name.endswith("norm.weight") or ".ffn_gate_inp." in name


# ---------------------------------------------------------------------------------------------
# Metadata


def test_architecture_metadata_equals_config(exported, checkpoint):
    _, c = checkpoint
    f = fields(exported["f16"])
    a = "deepseek2."
    expect = {
        "general.architecture": "deepseek2",
        a + "block_count": c.num_hidden_layers + 1, a + "nextn_predict_layers": 1,
        a + "context_length": c.max_position_embeddings, a + "embedding_length": c.hidden_size,
        a + "feed_forward_length": c.intermediate_size, a + "vocab_size": c.vocab_size,
        a + "leading_dense_block_count": c.first_k_dense_replace,
        a + "attention.head_count": c.num_attention_heads, a + "attention.head_count_kv": 1,
        a + "attention.key_length": 512 + 64, a + "attention.value_length": 512,
        a + "attention.key_length_mla": c.qk_nope_head_dim + c.qk_rope_head_dim,
        a + "attention.value_length_mla": c.v_head_dim,
        a + "attention.q_lora_rank": c.q_lora_rank, a + "attention.kv_lora_rank": c.kv_lora_rank,
        a + "rope.dimension_count": c.qk_rope_head_dim, a + "rope.scaling.type": "none",
        a + "expert_feed_forward_length": c.moe_intermediate_size, a + "expert_count": c.n_routed_experts,
        a + "expert_used_count": c.num_experts_per_tok, a + "expert_shared_count": c.n_shared_experts,
        a + "expert_weights_norm": True, a + "expert_gating_func": 2,  # LLAMA_EXPERT_GATING_FUNC_TYPE_SIGMOID
        a + "expert_group_count": c.n_group, a + "expert_group_used_count": c.topk_group,
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.bos_token_id": 0, "tokenizer.ggml.eos_token_id": 1, "tokenizer.ggml.padding_token_id": 2,
        "tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_eos_token": False,
        "general.file_type": 1,  # LLAMA_FTYPE_MOSTLY_F16
    }
    assert {k: f.get(k) for k in expect} == expect
    for k, v in {a + "rope.freq_base": c.rope_theta, a + "attention.layer_norm_rms_epsilon": c.rms_norm_eps,
                 a + "expert_weights_scale": c.routed_scaling_factor}.items():
        assert f[k] == pytest.approx(v, rel=1e-6), k
    assert fields(exported["q8_0"])["general.file_type"] == 7


def test_yarn_and_v2_router_metadata(tmp_path):
    """YaRN keys (log multiplier = 0.1 * mscale_all_dim, as llama.cpp divides it back) and a V2
    softmax router without q-LoRA or MTP (normalized: llama.cpp must not scale again)."""
    yarn = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32,
            "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}
    src, c = build_checkpoint(tmp_path / "v2", model_type="deepseek_v2", scoring_func="softmax",
                              topk_method="greedy", n_group=1, topk_group=1, q_lora_rank=None,
                              num_nextn_predict_layers=0, norm_topk_prob=True, routed_scaling_factor=2.0,
                              rope_scaling=yarn)
    export_gguf(src, tmp_path / "v2.gguf", "f32")
    f = fields(gguf.GGUFReader(tmp_path / "v2.gguf"))
    a = "deepseek2."
    assert f[a + "rope.scaling.type"] == "yarn"
    assert f[a + "rope.scaling.factor"] == pytest.approx(4.0)
    assert f[a + "rope.scaling.original_context_length"] == 64
    assert f[a + "rope.scaling.yarn_beta_fast"] == pytest.approx(32.0)
    assert f[a + "rope.scaling.yarn_beta_slow"] == pytest.approx(1.0)
    assert f[a + "rope.scaling.yarn_log_multiplier"] == pytest.approx(0.0707, rel=1e-6)
    assert f[a + "expert_gating_func"] == 1  # softmax
    assert f[a + "expert_weights_norm"] is True and f[a + "expert_weights_scale"] == pytest.approx(1.0)
    assert f[a + "attention.q_lora_rank"] == 0 and f[a + "block_count"] == c.num_hidden_layers
    assert a + "nextn_predict_layers" not in f and a + "expert_group_count" not in f
    names = {t.name for t in gguf.GGUFReader(tmp_path / "v2.gguf").tensors}
    assert "blk.0.attn_q.weight" in names and not any("attn_q_a" in n or "exp_probs_b" in n for n in names)


# ---------------------------------------------------------------------------------------------
# Tensors


@pytest.mark.parametrize("out_type", ["f32", "f16", "bf16", "q8_0"])
def test_tensor_names_shapes_and_types(exported, checkpoint, out_type):
    _, c = checkpoint
    got = {t.name: (tuple(int(n) for n in t.shape), t.tensor_type) for t in exported[out_type].tensors}
    want = expected_tensors(c)
    assert {n: s for n, (s, _) in got.items()} == want
    wanted_type = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[out_type]
    for name, (ne, qtype) in got.items():
        if always_f32(name, ne):
            assert qtype == Q.F32, name
        elif out_type == "q8_0" and ne[0] % 32:
            assert qtype == Q.F16, name   # the fallback
        else:
            assert qtype == wanted_type, name


def dequantized(t) -> np.ndarray:
    """A GGUF tensor as float32 in numpy layout."""
    shape = tuple(int(n) for n in reversed(t.shape))
    if t.tensor_type in (Q.F32, Q.F16):
        return np.asarray(t.data, dtype=np.float32).reshape(shape)
    return gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(shape)


@pytest.mark.parametrize("out_type", ["f32", "f16", "bf16", "q8_0"])
def test_dequantized_tensors_match_the_checkpoint(exported, checkpoint, out_type):
    path, c = checkpoint
    src = source_tensors(path)
    for t in exported[out_type].tensors:
        got = dequantized(t)
        want = hf_source(t.name, src, c).float().numpy()
        assert got.shape == want.shape, t.name
        if t.tensor_type == Q.F32:
            np.testing.assert_array_equal(got, want, err_msg=t.name)
        elif t.tensor_type == Q.F16:
            np.testing.assert_allclose(got, want, rtol=2**-11, atol=2**-24, err_msg=t.name)
        elif t.tensor_type == Q.BF16:
            np.testing.assert_allclose(got, want, rtol=2**-8, atol=0, err_msg=t.name)
        else:  # Q8_0: per block of 32, |error| <= half a step (amax/127) plus the f16 rounding of the scale
            blocks = want.reshape(-1, 32)
            step = np.abs(blocks).max(axis=1, keepdims=True) / 127
            err = np.abs(got.reshape(-1, 32) - blocks)
            assert (err <= 0.5 * step * (1 + 2**-9) + 127 * step * 2**-11 + 1e-12).all(), t.name
            assert err.max() > 0, t.name  # really quantized


def test_kv_b_split_reassembles_kv_b_proj(exported, checkpoint):
    """attn_k_b [H, R, nope] transposed back, then attn_v_b [H, v, R]: per head, the rows of kv_b_proj."""
    path, c = checkpoint
    src = source_tensors(path)
    tensors = {t.name: t for t in exported["f32"].tensors}
    for i in range(c.num_hidden_layers + c.num_nextn_predict_layers):
        k_b = dequantized(tensors[f"blk.{i}.attn_k_b.weight"])
        v_b = dequantized(tensors[f"blk.{i}.attn_v_b.weight"])
        kv_b = np.concatenate([k_b.transpose(0, 2, 1), v_b], axis=1).reshape(-1, c.kv_lora_rank)
        np.testing.assert_array_equal(kv_b, src[f"model.layers.{i}.self_attn.kv_b_proj.weight"].numpy())


# ---------------------------------------------------------------------------------------------
# Tokenizer and chat template


CORPUS = [
    "the engine reads a prompt and writes one token at a time",
    "Hello, World! It's 2025-01-31; we've got 1234567 tokens & 3.14159 ideas.",
    "def step(self, batch):\n    for seq in batch:\n\t\tseq.output.append(token)  # comment\n    return batch\n",
    "   leading spaces, trailing spaces   \n\n\n  and blank lines\r\n\twith tabs\t\t",
    "ünïcödé façade — “quotes” … 中文字符 日本語のテキスト 한국어 🙂🚀 emoji ∑∫√ math",
    "<｜User｜>special strings stay text</think><think>",
    "x" * 50 + " " + "ab" * 30 + "   " + "9" * 40,
    "",
]


def test_tokens_and_merges_reproduce_our_tokenization(exported, checkpoint):
    """A BPE rebuilt from the GGUF's tokens and merges (ranks = order) with the GPT-2 byte-level
    split that ``tokenizer.ggml.pre = gpt-2`` names encodes like our tokenizer."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    path, c = checkpoint
    ours = Tokenizer.load(path)
    f = fields(exported["f32"])
    tokens, types, merges = f["tokenizer.ggml.tokens"], f["tokenizer.ggml.token_type"], f["tokenizer.ggml.merges"]
    assert len(tokens) == len(types) == c.vocab_size
    n = ours.vocab_size
    for i in range(n):
        assert types[i] == (3 if i in ours.special_ids else 1), (i, tokens[i])  # CONTROL / NORMAL
    assert tokens[n:] == [f"[PAD{i}]" for i in range(n, c.vocab_size)] and set(types[n:]) == {5}  # UNUSED
    normal = {t: i for i, t in enumerate(tokens[:n]) if types[i] == 1}
    rebuilt = HFTokenizer(models.BPE(vocab=normal, merges=[tuple(m.split(" ")) for m in merges]))
    rebuilt.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    for text in CORPUS + [CHAT_TEXT]:
        assert rebuilt.encode(text).ids == ours.encode(text), text
    for tok, i in ((tok, ours.token_id(tok)) for tok in ("<｜begin▁of▁sentence｜>", "<｜User｜>", "</think>")):
        assert tokens[i] == tok


def test_chat_template_is_the_checkpoints(exported, checkpoint):
    path, _ = checkpoint
    saved = json.load(open(f"{path}/tokenizer_config.json", encoding="utf-8"))["chat_template"]
    assert fields(exported["f32"])["tokenizer.chat_template"] == saved


# ---------------------------------------------------------------------------------------------
# The router translation, checked numerically: llama.cpp's build_moe_ffn formula vs our Router


def llama_cpp_moe_weights(logits: torch.Tensor, bias, meta: dict, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """llama-graph.cpp build_moe_ffn: probs, + bias for selection, groups by top-2 sum, top-k,
    weights = probs of those, normalized if expert_weights_norm, scaled if scale not in (0, 1)."""
    probs = logits.sigmoid() if meta["expert_gating_func"] == 2 else logits.softmax(-1)
    sel = probs + bias if bias is not None else probs
    g = meta.get("expert_group_count", 0)
    if g > 1:
        grouped = sel.view(sel.shape[0], g, -1)
        keep = grouped.topk(2, dim=-1).values.sum(-1).topk(meta["expert_group_used_count"], dim=-1).indices
        mask = torch.full_like(grouped, float("-inf")).scatter(1, keep[..., None].expand(-1, -1, grouped.shape[-1]),
                                                               0.0)
        sel = (grouped + mask).flatten(1)
    topk = sel.topk(k, dim=-1).indices
    w = probs.gather(1, topk)
    if meta["expert_weights_norm"]:
        w = w / w.sum(-1, keepdim=True).clamp_min(6.103515625e-5)
    if meta["expert_weights_scale"] not in (0.0, 1.0):
        w = w * meta["expert_weights_scale"]
    return w, topk


@pytest.mark.parametrize("overrides", [
    {},  # V3: sigmoid, noaux_tc, 4 groups keep 2, normalized, scaled 2.5
    dict(model_type="deepseek_v2", scoring_func="softmax", topk_method="greedy", n_group=1, topk_group=1,
         norm_topk_prob=False, routed_scaling_factor=1.5),
    dict(model_type="deepseek_v2", scoring_func="softmax", topk_method="greedy", n_group=1, topk_group=1,
         norm_topk_prob=True, routed_scaling_factor=1.5),
    dict(topk_group=4),  # keeps every group: no group keys
])
def test_router_translation_matches_our_router(tmp_path, overrides):
    from dsv3.export.gguf import routing
    c = tiny_config(**{**SHAPE, "vocab_size": 64, "num_nextn_predict_layers": 0, **overrides})
    r = routing(c)
    meta = {"expert_gating_func": int(r.gating), "expert_weights_norm": r.norm, "expert_weights_scale": r.scale}
    if r.groups:
        meta |= {"expert_group_count": r.groups[0], "expert_group_used_count": r.groups[1]}
    torch.manual_seed(1)
    router = Router(c)
    with torch.no_grad():
        router.weight.normal_(0, 1)
        if router.e_score_correction_bias is not None:
            router.e_score_correction_bias.normal_(0, 0.1)
    x = torch.randn(64, c.hidden_size)
    w, topk = router(x)
    w2, topk2 = llama_cpp_moe_weights(x @ router.weight.T, router.e_score_correction_bias, meta,
                                      c.num_experts_per_tok)
    assert torch.equal(topk.sort(-1).values, topk2.sort(-1).values)
    order, order2 = topk.argsort(-1), topk2.argsort(-1)
    torch.testing.assert_close(w.gather(1, order), w2.gather(1, order2))


# ---------------------------------------------------------------------------------------------
# Refusals


YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "mscale": 1.0, "mscale_all_dim": 1.0}


@pytest.mark.parametrize("overrides, match", [
    (dict(moe_layer_freq=2, first_k_dense_replace=0), "moe_layer_freq"),
    (dict(model_type="deepseek_v2", scoring_func="softmax", topk_method="group_limited_greedy"), "group maximum"),
    (dict(attention_bias=True), "bias"),
    (dict(n_shared_experts=0), "shared-expert"),
    (dict(num_hidden_layers=27), "V2-Lite"),
    (dict(rope_scaling=YARN, yarn_mode="past_original"), "yarn_mode"),
    (dict(rope_scaling={**YARN, "mscale": 0.707}), "mscale"),
    (dict(rope_scaling={k: v for k, v in YARN.items() if k != "mscale_all_dim"}), "mscale_all_dim"),
    (dict(rope_scaling={**YARN, "attention_factor": 1.2}), "attention_factor"),
])
def test_configs_llama_cpp_cannot_represent_are_refused(overrides, match):
    with pytest.raises(ExportError, match=match):
        check_config(tiny_config(**overrides))


def test_configs_llama_cpp_represents_pass():
    assert check_config(tiny_config(num_nextn_predict_layers=0)) == []
    for name in PRESETS:  # V3 (YaRN mscale 1/1, groups, MTP), V2-Lite (27 layers, no q-LoRA), small, tiny
        check_config(preset(name))
    check_config(tiny_config(rope_scaling=YARN))
    check_config(tiny_config(num_hidden_layers=27, q_lora_rank=None))


def test_cli_refuses_with_a_clear_message(tmp_path, capsys):
    src, _ = build_checkpoint(tmp_path / "freq", moe_layer_freq=2, first_k_dense_replace=0,
                              num_nextn_predict_layers=0)
    with pytest.raises(SystemExit) as e:
        main(["export", "--to", "gguf", src, str(tmp_path / "x.gguf")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("dsv3: error: ") and "moe_layer_freq" in err and "Traceback" not in err
    assert not (tmp_path / "x.gguf").exists() and not (tmp_path / "x.gguf.tmp").exists()


def test_cli_exports_and_lists_fallbacks(checkpoint, tmp_path, capsys):
    src, c = checkpoint
    out = tmp_path / "m.gguf"
    assert main(["export", "--to", "gguf", src, str(out), "--type", "q8_0", "--json", str(tmp_path / "s.json")]) == 0
    text = capsys.readouterr().out
    summary = json.load(open(tmp_path / "s.json"))
    assert out.exists() and summary["type"] == "q8_0" and summary["mtp_blocks"] == 1
    fallback_rows = {n: s for n, s in expected_tensors(c).items() if len(s) > 1 and s[0] % 32
                     and not always_f32(n, s)}
    assert len(summary["fallbacks"]) == len(fallback_rows) == 3  # attn_output of 2 layers + MTP
    assert "MTP kept" in text and "exported" in text


def test_f16_overflow_is_refused(tmp_path):
    src, _ = build_checkpoint(tmp_path / "big", num_nextn_predict_layers=0)
    from safetensors.torch import load_file, save_file
    tensors = load_file(f"{src}/model.safetensors")
    tensors["lm_head.weight"][0, 0] = 1e5
    save_file(tensors, f"{src}/model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ExportError, match="overflows F16"):
        export_gguf(src, tmp_path / "big.gguf", "f16")
    export_gguf(src, tmp_path / "big.gguf", "bf16")


def test_export_cli_module_is_cheap_to_import():
    import subprocess
    code = "import sys, dsv3.cli.export; print('gguf' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "False"


def test_lm_head_tied_writes_no_output_tensor(tmp_path):
    src, _ = build_checkpoint(tmp_path / "tied", tie_word_embeddings=True, num_nextn_predict_layers=0)
    export_gguf(src, tmp_path / "tied.gguf", "f32")
    names = {t.name for t in gguf.GGUFReader(tmp_path / "tied.gguf").tensors}
    assert "token_embd.weight" in names and "output.weight" not in names


def test_fp8_checkpoint_exports_dequantized(tmp_path):
    """An FP8 checkpoint (float8_e4m3fn + weight_scale_inv blocks) exports its dequantized weights."""
    tok = train_tokenizer([CHAT_TEXT], vocab_size=300)
    cfg = tiny_config(**{**SHAPE, "vocab_size": tok.vocab_size, "num_nextn_predict_layers": 0})
    torch.manual_seed(0)
    dsv3.save_pretrained(far_from_ties_(dsv3.Transformer(cfg)), tmp_path / "fp8", fp8_weights=True,
                         block_size=(32, 32))
    tok.save(tmp_path / "fp8")
    export_gguf(tmp_path / "fp8", tmp_path / "fp8.gguf", "f32")
    loaded = dsv3.load_pretrained(tmp_path / "fp8", dtype=torch.float32).state_dict()
    tensors = {t.name: t for t in gguf.GGUFReader(tmp_path / "fp8.gguf").tensors}
    np.testing.assert_array_equal(dequantized(tensors["blk.1.ffn_up_exps.weight"]),
                                  loaded["layers.1.mlp.experts.up_proj"].numpy())
    np.testing.assert_array_equal(dequantized(tensors["blk.0.attn_q_a.weight"]),
                                  loaded["layers.0.self_attn.q_a_proj.weight"].numpy())
