"""Regional torch.compile (train/compile.py): what gets compiled, and a compiled step equals the eager one."""

import pytest
import torch

from conftest import tiny_config
from dsv3 import Transformer
from dsv3.train.compile import compile_model, is_compiled, uncompile_model
from dsv3.train.trainer import TrainConfig, compute_losses


def test_compile_model_picks_dense_parts_and_undoes():
    model = Transformer(tiny_config(num_hidden_layers=2, first_k_dense_replace=1, num_nextn_predict_layers=1))
    names = compile_model(model)
    # attention (with its own norms inside), block norms, the dense MLP / shared experts, routers; MTP too
    assert "layers.0.self_attn" in names and "layers.0.mlp" in names and "layers.1.mlp.gate" in names
    assert "layers.1.mlp.shared_experts" in names and "mtp.0.block.self_attn" in names and "norm" in names
    assert not any(n.startswith("layers.0.self_attn.") for n in names)      # inside a compiled module
    assert not any("experts" in n and "shared" not in n for n in names)    # routed experts stay eager
    assert is_compiled(model)
    uncompile_model(model)
    assert not is_compiled(model)


def test_compile_model_refuses_models_without_those_parts():
    with pytest.raises(ValueError, match="no MLA"):
        compile_model(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_compiled_attention_matches_eager_forward_and_backward():
    # One region (the attention: projections, norms, RoPE, SDPA), traced by dynamo and AOTAutograd
    # (forward and backward graphs) but run by aot_eager: inductor's C++ build of even this one region
    # costs ~45 CPU-seconds cold. Inductor's numerics on the whole model are checked by
    # `dsv3 bench train --compile` (its first-step loss against transformers').
    cfg = tiny_config()
    torch.manual_seed(0)
    model = Transformer(cfg, max_seq_len=16)
    attn = model.layers[0].self_attn
    x = torch.randn(2, 16, cfg.hidden_size, requires_grad=True)
    cos, sin = model.rope(torch.arange(16))
    ref = attn(x, cos, sin)
    ref.square().sum().backward()
    ref_grads = [x.grad.clone()] + [p.grad.clone() for p in attn.parameters()]
    x.grad = None
    attn.zero_grad(set_to_none=True)
    assert compile_model(attn, backend="aot_eager") == [""]
    out = attn(x, cos, sin)
    out.square().sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for got, want in zip([x.grad] + [p.grad for p in attn.parameters()], ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
