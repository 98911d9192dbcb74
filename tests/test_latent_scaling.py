"""kv_b_proj's fan-in scaling for a latent wider than hidden/4 (train/latent_scaling.py)."""

from __future__ import annotations

import math

import pytest
import torch

import dsv3
from dsv3.config import preset
from dsv3.train.latent_scaling import latent_projections, latent_scale, scale_latent_init
from dsv3.train.loop import SingleProcess, optimizer_update
from dsv3.train.optim import build_optimizer, param_groups


def test_scale_per_preset():
    # DeepSeek's own latents are at most hidden/4: nothing changes for them.
    assert latent_scale(preset("v3")) == 1.0 and latent_scale(preset("v2-lite")) == 1.0
    assert latent_scale(preset("tiny")) == (256 // 4) / 512
    assert latent_scale(preset("small")) == (768 // 4) / 512


def test_init_std_follows_sqrt_scale(tiny_config):
    torch.manual_seed(0)
    model = dsv3.Transformer(tiny_config(hidden_size=64, kv_lora_rank=256))
    ws = latent_projections(model)
    assert len(ws) == 2 + 1  # two decoder layers and the MTP module's attention
    before = [w.detach().clone() for w in ws]
    others = model.layers[0].self_attn.kv_a_proj_with_mqa.weight.detach().clone()
    scale_latent_init(model, 1 / 16)
    for w, b in zip(ws, before):
        torch.testing.assert_close(w.detach(), b * 0.25)
        assert w.std().item() == pytest.approx(model.config.initializer_range / 4, rel=0.05)
    assert torch.equal(model.layers[0].self_attn.kv_a_proj_with_mqa.weight, others)


def test_scaled_group_steps_at_scaled_lr(tiny_config):
    torch.manual_seed(0)
    model = dsv3.Transformer(tiny_config(num_nextn_predict_layers=0))
    ws = latent_projections(model)
    groups = param_groups(model, 0.0, ws, 0.125)
    assert len(groups) == 3 and {id(p) for p in groups[2]["params"]} == {id(w) for w in ws}
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert len(param_groups(model, 0.0, ws, 1.0)) == 2  # unscaled: the two groups older runs saved
    opt = build_optimizer(model, 1e-3, 0.0, scaled=ws, lr_scale=0.125)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(0, model.config.vocab_size, (2, 16))

    def micro_batches():
        logits = model(ids[:, :-1])
        yield torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()), {}

    optimizer_update(SingleProcess(torch.device("cpu")), model, opt, 1e-3, micro_batches(), grad_clip=1e9)
    # AdamW's first step moves every element with a gradient by lr (times the group's scale).
    for n, p in model.named_parameters():
        step = (p.detach() - before[n]).abs().max().item()
        if n.endswith("kv_b_proj.weight"):
            assert step == pytest.approx(1e-3 * 0.125, rel=1e-3), n
        elif p.dim() >= 2 and "embed" not in n and "gate.weight" not in n:
            assert step == pytest.approx(1e-3, rel=1e-3), n
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 1e-3, 1e-3 * 0.125]
    assert math.isclose(opt.param_groups[2]["lr_scale"], 0.125)
