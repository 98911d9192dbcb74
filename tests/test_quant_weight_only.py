"""Weight-only int8 / int4 quantization (dsv3.quant.weight_only): formats, kernels, module replacement,
model-level error and the engine/CLI switches.

Kernel tests compare torch's int8/int4 CPU kernels against ``x @ dequant(W).T`` computed here in
fp32 from our own reference dequantization, so both the formula and the kernel's packing are
checked; the only slack is the kernels' bf16 output rounding (at most 2^-8 relative) on x86.
"""

from __future__ import annotations

import copy
import platform

import pytest
import torch
from torch import nn

from conftest import far_from_ties_, tiny_config

import dsv3
from dsv3.model.mla import MLA
from dsv3.model.moe import RoutedExperts, swiglu_expert
from dsv3.quant.int_weights import (dequantize_int4, dequantize_int8, int4_linear, kernel_dtype, pack_int4,
                                    quantize_int4, quantize_int8)
from dsv3.quant.weight_only import DECODE_OPTIONS, Int4Linear, Int8AbsorbedProj, Int8Linear, quantize_weight_only
from dsv3.quant.weight_only_experts import Int4Experts, Int8Experts

pytestmark = pytest.mark.usefixtures("one_thread")

# Dimensions every int4 layer fits (N % 16, K % 32): hidden 64, q-LoRA 32, latent 24 + rope 8, 4 heads of 8+8.
INT4_DIMS = dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, q_lora_rank=32, kv_lora_rank=24,
                 qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, vocab_size=128)
BF16_U = 2.0 ** -8            # unit roundoff of bf16 (8 significant bits): one rounding's relative error


def _matmul_close(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """``y`` equals ``x @ w.T (+ bias)`` (computed in fp64) up to bf16 rounding of the kernel's output (and
    of the bias sum in a bf16 model) and fp32 accumulation order."""
    xw = x.double() @ w.double().T
    b = torch.zeros(()) if bias is None else bias.double()
    scale = x.double().abs() @ w.double().abs().T           # bounds the accumulation error
    err = (y.double() - (xw + b)).abs()
    bound = BF16_U * (xw.abs() + (xw + b).abs()) + 1e-5 * scale + 1e-30    # two roundings at most
    assert bool((err <= bound).all()), f"max excess {(err - bound).max().item():.3g}"


# ------------------------------------------------------------------------------------------ formats
def test_int8_round_trip_and_codes():
    torch.manual_seed(0)
    w = torch.randn(40, 72) * torch.logspace(-3, 1, 40)[:, None]     # rows of very different magnitude
    w[3] = 0                                                           # an all-zero row
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127 and s.shape == (40,)
    assert torch.equal(s, s.to(torch.bfloat16).float())               # scales are bf16 values
    err = (dequantize_int8(q, s) - w).abs()
    assert bool((err <= 0.5 * s[:, None] * (1 + 1e-6) + 0.01 * s[:, None]).all())   # half a step (+ clamp)
    assert torch.equal(dequantize_int8(q, s)[3], torch.zeros(72))
    assert (q.abs().amax(1)[s > 1e-11] >= 126).all()                  # the grid spans each row


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_round_trip(group):
    torch.manual_seed(1)
    w = torch.randn(32, 256) + 0.3                                     # off-centre groups use the zero point
    q, s, z = quantize_int4(w, group)
    assert q.min() >= 0 and q.max() <= 15 and s.shape == (32, 256 // group) == z.shape
    err = (dequantize_int4(q, s, z) - w).abs()
    step = s.repeat_interleave(group, 1)
    assert bool((err <= 0.5 * step + BF16_U * z.abs().repeat_interleave(group, 1) + 1e-6).all())


def test_int4_rejects_shapes_the_kernel_cannot_take():
    with pytest.raises(ValueError, match="multiple of 16"):
        quantize_int4(torch.randn(24, 64), 32)
    with pytest.raises(ValueError, match="group size"):
        quantize_int4(torch.randn(32, 64), 48)
    with pytest.raises(ValueError, match="2-D"):
        quantize_int8(torch.randn(4, 4, 4))


# ------------------------------------------------------------------------------------------ kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 5])
def test_int8_linear_is_x_times_dequantized_weight(dtype, rows):
    torch.manual_seed(2)
    lin = nn.Linear(96, 48, bias=True).to(dtype)
    m = Int8Linear(lin)
    x = torch.randn(2, rows, 96, dtype=dtype)
    y = m(x)
    assert y.shape == (2, rows, 48) and y.dtype == dtype
    cd = kernel_dtype("cpu", dtype)
    w = dequantize_int8(*quantize_int8(lin.weight))
    _matmul_close(y.reshape(-1, 48), x.reshape(-1, 96).to(cd).float(), w, lin.bias.detach())


@pytest.mark.parametrize("group", [32, 64])
@pytest.mark.parametrize("rows", [1, 7])
def test_int4_linear_is_x_times_dequantized_weight(group, rows):
    torch.manual_seed(3)
    lin = nn.Linear(128, 64, bias=False)
    m = Int4Linear(lin, group)
    x = torch.randn(rows, 128)
    cd = kernel_dtype("cpu", x.dtype)
    _matmul_close(m(x), x.to(cd).float(), dequantize_int4(*quantize_int4(lin.weight, group)))


def test_int4_packing_round_trips_through_the_kernel():
    # The kernel applied to the identity returns the weight it holds: the packed layout is what we think.
    torch.manual_seed(4)
    w = torch.randn(32, 64)
    q, s, z = quantize_int4(w, 32)
    packed, sz = pack_int4(q, s, z)
    got = int4_linear(torch.eye(64), packed, sz, 32).T                    # [32, 64]
    want = dequantize_int4(q, s, z)
    assert torch.allclose(got, want, rtol=BF16_U, atol=0)


def test_kernel_dtype():
    expected = torch.float32 if platform.machine().lower() in ("aarch64", "arm64") else torch.bfloat16
    assert kernel_dtype("cpu", torch.float32) == expected
    with pytest.raises(ValueError, match="CPU kernels"):
        kernel_dtype("meta", torch.float32)


# ------------------------------------------------------------------------------------------ experts
def _routing(T: int, E: int, k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    topk = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])        # distinct per token
    topk[-1] = topk[0]                                                                  # two tokens, same experts
    weights = torch.rand(T, k, generator=g) + 0.1
    return weights, topk


def _reference_experts(x, weights, topk, gate, up, down):
    """The plain per-(token, slot) definition in fp64, independent of any dispatch loop."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(topk.shape[1]):
            e = int(topk[t, j])
            w = (gate[e].double(), up[e].double(), down[e].double())
            out[t] += swiglu_expert(x[t:t + 1].double(), weights[t:t + 1, j:j + 1].double(), w)[0]
    return out


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("T", [1, 6])
def test_quantized_experts_match_the_dequantized_reference(scheme, T):
    torch.manual_seed(5)
    E, D, inter, k = 8, 64, 32, 3
    experts = RoutedExperts(E, D, inter)
    for p in experts.parameters():
        nn.init.normal_(p, std=0.1)
    if scheme == "int8":
        mod = Int8Experts(experts)
        deq = [torch.stack([dequantize_int8(*quantize_int8(w)) for w in getattr(experts, n)])
               for n in ("gate_proj", "up_proj", "down_proj")]
    else:
        mod = Int4Experts(experts, 32)
        deq = [torch.stack([dequantize_int4(*quantize_int4(w, 32)) for w in getattr(experts, n)])
               for n in ("gate_proj", "up_proj", "down_proj")]
    x = torch.randn(T, D)
    weights, topk = _routing(T, E, k, seed=T)
    y = mod(x, weights, topk)
    assert y.shape == (T, D) and y.dtype == x.dtype
    cd = kernel_dtype("cpu", x.dtype)
    ref = _reference_experts(x.to(cd).float(), weights, topk, *deq)
    # gate/up and down outputs and the hidden state are each rounded to bf16 once on x86.
    rel = ((y.double() - ref).norm() / ref.norm()).item()
    assert rel < 4 * BF16_U, rel
    # and far from the unquantized experts only by the quantization error
    with torch.no_grad():
        full = experts(x, weights, topk)
    assert ((y - full).norm() / full.norm()).item() < (0.02 if scheme == "int8" else 0.2)


def test_quantized_experts_compile_fullgraph():
    torch.manual_seed(6)
    experts = RoutedExperts(8, 64, 32)
    for p in experts.parameters():
        nn.init.normal_(p, std=0.1)
    lin = nn.Linear(64, 64)
    q8, q4, ql4, ql8 = Int8Experts(experts), Int4Experts(experts), Int4Linear(lin), Int8Linear(lin)

    def step(x, weights, topk):                       # inductor lowers the two linear kernels itself
        return ql8(ql4(q8(x, weights, topk) + q4(x, weights, topk)).relu())

    x = torch.randn(4, 64)
    weights, topk = _routing(4, 8, 2, seed=0)
    eager = step(x, weights, topk)
    compiled = torch.compile(step, fullgraph=True, dynamic=False)(x, weights, topk)
    assert torch.allclose(compiled, eager, rtol=2 * BF16_U, atol=1e-4)


# ------------------------------------------------------------------------------------------ replacement
def test_replacement_targets_and_kept_layers():
    torch.manual_seed(7)
    model = dsv3.Transformer(tiny_config(**INT4_DIMS)).eval()
    s = quantize_weight_only(model, "int8")
    attn = model.layers[1].self_attn
    for name in ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "o_proj"):
        assert isinstance(getattr(attn, name), Int8Linear), name
    assert type(attn.kv_b_proj) is nn.Linear                         # read by the absorbed decode path
    assert type(model.lm_head) is nn.Linear and "lm_head" in s["kept"]
    assert isinstance(model.layers[0].mlp.gate_proj, Int8Linear)     # dense MLP
    assert isinstance(model.layers[1].mlp.shared_experts.down_proj, Int8Linear)
    assert isinstance(model.layers[1].mlp.experts, Int8Experts)
    assert isinstance(model.mtp[0].block.mlp.experts, Int8Experts) and isinstance(model.mtp[0].eh_proj, Int8Linear)
    assert s["bytes_after"] < s["bytes_before"]
    assert not any(type(m) is nn.Linear for n, m in model.named_modules()
                   if not n.endswith("kv_b_proj") and n != "lm_head")
    # the kernel-format buffers survive dtype conversions of the whole model
    model.to(torch.bfloat16).float()
    assert attn.q_a_proj.weight.dtype == torch.int8 and attn.q_a_proj.weight_scale.dtype == kernel_dtype("cpu", torch.float32)
    assert set(model.state_dict()) >= {"layers.1.self_attn.o_proj.weight", "layers.1.self_attn.o_proj.weight_scale",
                                       "layers.1.mlp.experts.gate_up", "layers.1.mlp.experts.down_scale"}


def test_int4_falls_back_to_int8_where_the_kernel_cannot_take_the_shape():
    model = dsv3.Transformer(tiny_config()).eval()    # hidden 32, q-LoRA 24: several shapes int4 cannot take
    s = quantize_weight_only(model, "int4", head=True)
    assert "layers.1.self_attn.q_b_proj" in s["int8_fallback"]        # K = 24
    assert isinstance(model.layers[1].self_attn.q_b_proj, Int8Linear)
    assert isinstance(model.lm_head, Int4Linear)                      # 96 x 32 fits
    with pytest.raises(ValueError, match="int8, int4"):
        quantize_weight_only(model, "int3")
    with pytest.raises(ValueError, match="group"):
        quantize_weight_only(dsv3.Transformer(tiny_config()), "int4", group_size=48)


def _logits(model, ids):
    with torch.no_grad():
        out = model(ids)
    return (out.logits if hasattr(out, "logits") else out).float()


def _fake_quantized(model: nn.Module, scheme: str) -> nn.Module:
    """A copy of ``model`` in fp32 whose weights are replaced by their dequantized values (no kernels)."""
    fake = copy.deepcopy(model)
    deq = (lambda w: dequantize_int8(*quantize_int8(w))) if scheme == "int8" else \
        (lambda w: dequantize_int4(*quantize_int4(w, 32)))
    with torch.no_grad():
        for name, m in fake.named_modules():
            if type(m) is nn.Linear and not name.endswith("kv_b_proj") and name != "lm_head":
                m.weight.copy_(deq(m.weight))
            elif isinstance(m, RoutedExperts):
                for p in (m.gate_proj, m.up_proj, m.down_proj):
                    p.copy_(torch.stack([deq(w) for w in p]))
    return fake


@pytest.mark.parametrize("scheme, vs_fp32", [("int8", 0.03), ("int4", 0.3)])
def test_model_logits(scheme, vs_fp32):
    """Stated tolerances, as relative Frobenius error of the logits of a random tiny V3 (prompt of 2 x 24):
    vs the same model with dequantized fp32 weights <= 2% (only the bf16 activations of the kernels
    differ, so this checks the wiring); vs fp32 <= 3% (int8) / 30% (int4: 16 levels per group on
    random Gaussian weights, whose logits are small noise)."""
    torch.manual_seed(8)
    model = dsv3.Transformer(tiny_config(**INT4_DIMS)).eval()
    ids = torch.randint(0, 128, (2, 24))
    ref = _logits(model, ids)
    fake = _logits(_fake_quantized(model, scheme), ids)
    q = copy.deepcopy(model)
    quantize_weight_only(q, scheme)
    got = _logits(q, ids)
    assert ((got - fake).norm() / fake.norm()).item() < 0.02
    assert ((got - ref).norm() / ref.norm()).item() < vs_fp32


# ------------------------------------------------------------------------------------------ kv_b_proj, head
def _mla_and_proj(seed: int = 10):
    torch.manual_seed(seed)
    attn = dsv3.Transformer(tiny_config(**INT4_DIMS)).eval().layers[1].self_attn
    return attn, Int8AbsorbedProj(attn.kv_b_proj, attn.n_heads, attn.nope, attn.v_dim)


@pytest.mark.parametrize("rows", [1, 5])
def test_int8_absorbed_products_are_x_times_the_dequantized_per_head_weights(rows):
    """absorb_query = q_nope @ W_UK and absorb_output = o_lat @ W_UV^T per head, with W_UK^T [r, nope]
    and W_UV [v, r] quantized per output channel here (independently of the module's storage)."""
    attn, proj = _mla_and_proj()
    H, nope, v, r = attn.n_heads, attn.nope, attn.v_dim, attn.rank
    w = attn.kv_b_proj.weight.detach().view(H, nope + v, r)
    cd = kernel_dtype("cpu", torch.float32)
    q = torch.randn(rows, H, nope)
    o = torch.randn(rows, H, r)
    got_q, got_o = proj.absorb_query(q), proj.absorb_output(o)
    assert got_q.shape == (rows, H, r) and got_o.shape == (rows, H, v) and got_q.dtype == torch.float32
    for h in range(H):
        uk_t = dequantize_int8(*quantize_int8(w[h, :nope].t()))                # [r, nope]
        uv = dequantize_int8(*quantize_int8(w[h, nope:]))                      # [v, r]
        _matmul_close(got_q[:, h], q[:, h].to(cd).float(), uk_t)
        _matmul_close(got_o[:, h], o[:, h].to(cd).float(), uv)
    # the dequantized weight is within half a quantization step of kv_b_proj's
    err = (proj.weight - attn.kv_b_proj.weight).abs().view(H, nope + v, r)
    assert bool((err[:, :nope] <= 0.51 * proj.uk_scale.float()[:, None, :]).all())   # scale per (head, r)
    assert bool((err[:, nope:] <= 0.51 * proj.uv_scale.float()[:, :, None]).all())   # scale per (head, v)
    assert proj.weight.shape == attn.kv_b_proj.weight.shape


def test_int8_absorbed_products_compile_fullgraph():
    _, proj = _mla_and_proj(11)
    q, o = torch.randn(1, proj.n_heads, proj.nope), torch.randn(1, proj.n_heads, proj.rank)

    def step(q, o):
        return proj.absorb_query(q).sum(-1) + proj.absorb_output(o).sum(-1)

    compiled = torch.compile(step, fullgraph=True, dynamic=False)(q, o)
    assert torch.allclose(compiled, step(q, o), rtol=2 * BF16_U, atol=1e-4)


def test_int8_head_and_kv_b_proj_replacement():
    torch.manual_seed(12)
    model = dsv3.Transformer(tiny_config(**INT4_DIMS)).eval()
    assert DECODE_OPTIONS["int8"]["head"]                             # the engine's int8 quantizes the head
    s = quantize_weight_only(model, "int8", head=True, latent=True)
    assert isinstance(model.lm_head, Int8Linear) and "lm_head" not in s["kept"]
    attn = model.layers[1].self_attn
    assert isinstance(attn.kv_b_proj, Int8AbsorbedProj) and "layers.1.self_attn.kv_b_proj" in s["linear"]
    assert not any(type(m) is nn.Linear for m in model.modules())
    model.to(torch.bfloat16).float()                                  # kernel buffers keep their dtypes
    assert attn.kv_b_proj.uk.dtype == torch.int8 and attn.kv_b_proj.uk_scale.dtype == kernel_dtype("cpu", torch.float32)
    w_uk, w_uv = attn.absorbed_weights()                              # the model's own prompt path
    assert w_uk.shape == (attn.n_heads, attn.nope, attn.rank) and w_uv.shape == (attn.n_heads, attn.v_dim, attn.rank)


def _fake_quantized_all(model: nn.Module) -> nn.Module:
    """_fake_quantized(int8) plus lm_head per output row and kv_b_proj per head in the absorbed layouts."""
    fake = _fake_quantized(model, "int8")
    deq = lambda w: dequantize_int8(*quantize_int8(w))
    with torch.no_grad():
        fake.lm_head.weight.copy_(deq(fake.lm_head.weight))
        for m in fake.modules():
            if isinstance(m, MLA):
                w = m.kv_b_proj.weight.view(m.n_heads, m.nope + m.v_dim, m.rank)
                for h in range(m.n_heads):
                    w[h, : m.nope] = deq(w[h, : m.nope].t()).t()
                    w[h, m.nope:] = deq(w[h, m.nope:])
    return fake


@pytest.mark.parametrize("absorb", [False, True])
def test_model_logits_with_int8_head_and_kv_b_proj(absorb):
    """int8 with the head and kv_b_proj too, same stated tolerances as test_model_logits:
    vs the dequantized-fp32 model <= 2%, vs fp32 <= 3%; through the naive and the absorbed forward."""
    torch.manual_seed(8)
    model = dsv3.Transformer(tiny_config(**INT4_DIMS)).eval()
    ids = torch.randint(0, 128, (2, 24))

    def logits(m):
        with torch.no_grad():
            out = m(ids, absorb=absorb)
        return (out.logits if hasattr(out, "logits") else out).float()

    ref, fake = logits(model), logits(_fake_quantized_all(model))
    q = copy.deepcopy(model)
    quantize_weight_only(q, "int8", head=True, latent=True)
    got = logits(q)
    assert ((got - fake).norm() / fake.norm()).item() < 0.02
    assert ((got - ref).norm() / ref.norm()).item() < 0.03


# ------------------------------------------------------------------------------------------ engine / CLI
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(9)
    path = tmp_path_factory.mktemp("wo") / "ckpt"
    dsv3.save_pretrained(far_from_ties_(dsv3.Transformer(tiny_config(**INT4_DIMS))), path)
    return path


def _greedy(model, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding by full forward passes (no cache, no engine)."""
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(_logits(model, torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def test_llm_quantized_engine_decodes_as_the_quantized_model(checkpoint):
    """The engine (paged cache, absorbed attention, batching) on LLM(quantize=...) produces the greedy
    tokens of the same quantized layers run by plain full forward passes."""
    from dsv3.engine import LLM, SamplingParams
    prompts = [[1, 5, 9, 3], [2, 7, 7, 7, 7, 1]]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    for scheme in ("int8", "int4"):
        llm = LLM(checkpoint, quantize=scheme, max_model_len=64, max_num_seqs=2)
        assert llm.quantization["scheme"] == scheme
        assert isinstance(llm.model.layers[1].mlp.experts, Int8Experts if scheme == "int8" else Int4Experts)
        got = [o.token_ids for o in llm.generate(prompts, params)]
        model = dsv3.load_pretrained(checkpoint)
        quantize_weight_only(model, scheme, **DECODE_OPTIONS[scheme])     # the engine's options
        assert got == [_greedy(model, p, 10) for p in prompts], scheme
    with pytest.raises(ValueError, match="choose one"):
        LLM(checkpoint, quantize="int8", keep_fp8=True)


def test_llm_dtype_auto_and_names(checkpoint):
    from dsv3.cpu import auto_dtype
    from dsv3.engine import LLM
    assert LLM(checkpoint, dtype="auto", max_model_len=32, max_num_seqs=1).model.lm_head.weight.dtype == auto_dtype()
    assert LLM(checkpoint, dtype="bfloat16", max_model_len=32, max_num_seqs=1).model.lm_head.weight.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="auto"):
        LLM(checkpoint, dtype="int8")


def test_cli_generate_quantized(checkpoint, tmp_path, capsys):
    import shutil

    from conftest import chat_checkpoint
    from dsv3.cli import main
    dims = {k: v for k, v in INT4_DIMS.items() if k != "vocab_size"}     # the tokenizer sets the vocabulary
    path = chat_checkpoint(tmp_path / "chat", **dims)
    assert main(["generate", "--model", path, "--prompt", "the engine", "--max-tokens", "4", "--temperature", "0",
                 "--quantize", "int4", "--dtype", "auto", "--json"]) == 0
    assert '"token_ids"' in capsys.readouterr().out
    shutil.rmtree(path)


def test_experiment_quant_reports_every_precision(tmp_path, capsys):
    import json

    from conftest import CHAT_TEXT, chat_checkpoint
    from dsv3.cli import main
    dims = {k: v for k, v in INT4_DIMS.items() if k != "vocab_size"}
    path = chat_checkpoint(tmp_path / "m", **dims)
    text = tmp_path / "heldout.txt"
    text.write_text(CHAT_TEXT)
    out = tmp_path / "q.json"
    assert main(["experiment", "quant", "--model", path, "--data", str(text), "--seq-len", "32", "--max-windows", "4",
                 "--prompts", "2", "--prompt-len", "8", "--gen-len", "6", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = {r["precision"]: r for r in report["results"]}
    assert list(rows) == ["fp32", "bf16", "int8", "int8+head", "int4", "int4+head"]
    assert rows["int4"]["weight_bytes"] < rows["int8"]["weight_bytes"] < rows["bf16"]["weight_bytes"] \
        < rows["fp32"]["weight_bytes"]
    for name in ("bf16", "int8", "int4"):
        r = rows[name]
        assert 0 <= r["top1_agreement"] <= 1 and r["kl_vs_fp32"] >= 0 and 0 <= r["greedy_common_prefix"] <= 1
    # bf16 and int8 perturb this model less than int4 (measured on the same windows)
    assert rows["int8"]["kl_vs_fp32"] < rows["int4"]["kl_vs_fp32"]
    assert report["cpu"]["torch_cpu_capability"] and "int8+head" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ CPU probe
def test_cpu_features_reads_flags(tmp_path):
    from dsv3.cpu import cpu_features
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Test Xeon\nflags\t\t: fpu avx2 fma avx512f avx512_bf16 amx_tile "
                    "amx_bf16\n\nprocessor\t: 1\nmodel name\t: other\n")
    f = cpu_features(str(info))
    assert f["model"] == "Test Xeon" and f["bf16_units"] == ["amx_bf16", "avx512_bf16"]
    assert f["flags"]["avx2"] and f["flags"]["amx_bf16"] and not f["flags"]["avx512_fp16"]
    assert cpu_features(str(tmp_path / "missing"))["bf16_units"] == []


def test_auto_dtype_needs_bf16_units_and_a_measured_gain(monkeypatch):
    import dsv3.cpu as cpu
    monkeypatch.setattr(cpu, "has_bf16_units", lambda: False)
    monkeypatch.setattr(cpu, "bf16_decode_speedup", lambda: 10.0)
    assert cpu.auto_dtype("cpu") == torch.float32              # no units: never bf16, whatever a probe says
    monkeypatch.setattr(cpu, "has_bf16_units", lambda: True)
    assert cpu.auto_dtype("cpu") == torch.bfloat16
    monkeypatch.setattr(cpu, "bf16_decode_speedup", lambda: 0.7)   # units, but plain bf16 GEMVs slower (issue 14)
    assert cpu.auto_dtype("cpu") == torch.float32
    assert cpu.resolve_dtype("bfloat16") == torch.bfloat16 and cpu.resolve_dtype(None) is None
    with pytest.raises(ValueError, match="auto"):
        cpu.resolve_dtype("int8")


def test_bf16_decode_speedup_is_a_positive_ratio():
    from dsv3.cpu import bf16_decode_speedup
    assert bf16_decode_speedup(hidden=256, rows=(1,)) > 0


def test_bench_decode_random_preset_quantized():
    from dsv3.bench.decode_preset import bench_decode_roofline, format_bench_roofline
    r = bench_decode_roofline("tiny", dtype="float32", quantize="int8", batch=1, prompt_len=4, gen_len=3, repeats=1)
    assert r["quantize"] == "int8" and r["bytes_per_step"]["weights_by_dtype"]["int8"] > 0
    x = r["results"][0]
    assert x["cpu_step_ms_median"] > 0 and "weight-only int8" in format_bench_roofline(r)
    with pytest.raises(ValueError, match="quantize"):
        bench_decode_roofline("tiny", quantize="int2")


def test_paged_decode_attention_uses_the_int8_absorbed_products():
    """The engine's row attention (PagedBatch.attend) with an Int8AbsorbedProj kv_b_proj equals the same
    attention with a plain kv_b_proj holding the dequantized weight, up to the kernels' bf16 rounding."""
    from dsv3.engine.paged_cache import PagedBatch, PagedLatentCache
    attn, proj = _mla_and_proj(13)
    cfg = dsv3.Transformer(tiny_config(**INT4_DIMS)).config
    plain = copy.deepcopy(attn)
    with torch.no_grad():
        plain.kv_b_proj.weight.copy_(proj.weight)
    quant = copy.deepcopy(attn)
    quant.kv_b_proj = proj
    calls = []                                 # the products must run through the int8 kernels
    for name in ("absorb_query", "absorb_output"):
        fn = getattr(proj, name)
        setattr(proj, name, lambda t, fn=fn, name=name: calls.append(name) or fn(t))
    H, N, r = attn.n_heads, 3, attn.rank
    g = torch.Generator().manual_seed(14)
    q_nope, q_pe = torch.randn(1, N, H, attn.nope, generator=g), torch.randn(1, N, H, attn.rope, generator=g)
    c_kv, k_pe = torch.randn(1, N, r, generator=g), torch.randn(1, N, attn.rope, generator=g)
    outs = []
    for mla in (plain, quant):
        cache = PagedLatentCache(cfg, num_blocks=4, block_size=4, num_layers=cfg.num_hidden_layers,
                                 dtype=torch.float32, device=torch.device("cpu"))
        cache.kv[mla.layer_idx, :16] = torch.randn(16, cache.kv.shape[-1], generator=torch.Generator().manual_seed(15))
        batch = PagedBatch(cache, torch.tensor([5, 6, 9]), block_tables=torch.tensor([[0, 1, 2]] * N),
                           context_lens=torch.tensor([6, 7, 10]))
        outs.append(batch.attend(mla, q_nope, q_pe, c_kv, k_pe, 0, True))           # [1, N, H, v]
    ref, got = outs
    assert calls == ["absorb_query", "absorb_output"]
    assert got.shape == ref.shape == (1, N, H, attn.v_dim)
    assert ((got - ref).norm() / ref.norm()).item() < 4 * BF16_U


# ------------------------------------------------------------------------------------------ int8 activations
needs_fbgemm = pytest.mark.skipif("fbgemm" not in torch.backends.quantized.supported_engines,
                                  reason="int8 activations run fbgemm (x86 builds of torch)")


@needs_fbgemm
@pytest.mark.parametrize("rows", [1, 5])
def test_int8_activations_linear_is_within_the_activation_rounding(rows):
    """fbgemm's dynamic linear vs ``x @ dequant(W).T`` in fp64: the only extra error is rounding x to
    7-bit steps of its range (one scale for all rows, zero point included), at most half a step per
    element: |err[m, n]| <= 0.5 * step * sum_k |W[n, k]| (+ fp32 accumulation)."""
    torch.manual_seed(21)
    lin = nn.Linear(96, 48, bias=True)
    m = Int8Linear(lin, activations="int8")
    x = torch.randn(rows, 96)
    y = m(x)
    assert y.shape == (rows, 48) and y.dtype == x.dtype
    w = dequantize_int8(*quantize_int8(lin.weight)).double()
    want = x.double() @ w.T + lin.bias.detach().double()
    step = (x.max().clamp_min(0) - x.min().clamp_max(0)).double() / 127
    bound = 0.5 * step * w.abs().sum(1) * (1 + 1e-3) + 1e-4
    assert bool(((y.double() - want).abs() <= bound).all())
    # and it is not the weight-only result (the activations really are rounded)
    assert not torch.allclose(y, Int8Linear(lin)(x), rtol=0, atol=1e-6)


@needs_fbgemm
def test_int8_activations_experts_and_compile():
    torch.manual_seed(22)
    experts = RoutedExperts(8, 64, 32)
    for p in experts.parameters():
        nn.init.normal_(p, std=0.1)
    mod = Int8Experts(experts, activations="int8")
    x = torch.randn(6, 64)
    weights, topk = _routing(6, 8, 3, seed=1)
    y = mod(x, weights, topk)
    with torch.no_grad():
        full = experts(x, weights, topk)
    # stated tolerance: int8 weights + 7-bit activations of both products, 5% relative (weight-only: 2%)
    assert ((y - full).norm() / full.norm()).item() < 0.05
    lin = Int8Linear(nn.Linear(64, 64), activations="int8")
    step = lambda x, w, t: lin(mod(x, w, t))            # noqa: E731
    compiled = torch.compile(step, fullgraph=True, dynamic=False)(x, weights, topk)
    assert torch.equal(compiled, step(x, weights, topk))


@needs_fbgemm
def test_model_logits_with_int8_activations():
    """Stated tolerance of int8 weights *and* activations: logits within 5% (relative Frobenius) of
    fp32 on the random tiny V3 of test_model_logits (weight-only: 3%); a deep copy decodes the same."""
    torch.manual_seed(8)
    model = dsv3.Transformer(tiny_config(**INT4_DIMS)).eval()
    ids = torch.randint(0, 128, (2, 24))
    ref = _logits(model, ids)
    q = copy.deepcopy(model)
    summary = quantize_weight_only(q, "int8", head=True, activations="int8")
    assert summary["activations"] == "int8"
    assert all(m.activations == "int8" for m in q.modules() if isinstance(m, (Int8Linear, Int8Experts)))
    got = _logits(q, ids)
    assert ((got - ref).norm() / ref.norm()).item() < 0.05
    assert torch.equal(_logits(copy.deepcopy(q), ids), got)


def test_int8_activations_rejects_unknown_values():
    with pytest.raises(ValueError, match="activations"):
        quantize_weight_only(dsv3.Transformer(tiny_config(**INT4_DIMS)), "int8", activations="fp8")
    with pytest.raises(ValueError, match="activations"):
        Int8Experts(RoutedExperts(2, 8, 8), activations="bf16")
