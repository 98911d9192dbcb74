"""FP8 mixed-precision training: the three GEMMs vs float64, whole-model gradients vs fp32/bf16,
AdamW with bf16 moments vs torch.optim.AdamW, and `dsv3 train --fp8` end to end with exact resume."""

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import source_corpus, tiny_config
from safetensors.torch import load_file

import dsv3
from dsv3 import fp8
from dsv3.train.fp8 import (AdamWBF16, FP8TrainingConfig, FP8TrainingExperts, FP8TrainingLinear, apply_fp8_training,
                            fp8_matmul)
from dsv3.train.state import read_trainer_state, state_dir
from dsv3.train.trainer import TrainConfig, train

B = 16  # block/tile for tiny models (128 in the paper): layers must span several blocks


def _deq_tiles64(x, tile):
    q, s = fp8.quantize_tiles(x, tile)
    return q.double() * s.double().repeat_interleave(tile, -1)[..., : x.shape[-1]]


def _deq_blocks64(w, block):
    q, s = fp8.quantize_blockwise(w, (block, block))
    return q.double() * s.double().repeat_interleave(block, 0)[: w.shape[0]].repeat_interleave(block, 1)[:, : w.shape[1]]


def test_fprop_dgrad_wgrad_match_float64_of_their_quantized_operands():
    g = torch.Generator().manual_seed(0)
    M, K, N = 37, 70, 45                                  # partial tiles/blocks everywhere
    x = (torch.randn(M, K, generator=g) * torch.logspace(-2, 1, K)).requires_grad_()
    w = (torch.randn(N, K, generator=g) * 0.1).requires_grad_()
    dy = torch.randn(M, N, generator=g)
    y = fp8_matmul(x, w, FP8TrainingConfig(block=B))
    y.backward(dy)
    X, W = _deq_tiles64(x.detach(), B), _deq_blocks64(w.detach(), B)
    # Fprop: x in 1xB tiles, W in BxB blocks
    assert (y.double() - X @ W.T).abs().max() < 1e-5
    # Dgrad: dy in 1xB tiles along N, W^T in the same BxB blocks
    assert (x.grad.double() - _deq_tiles64(dy, B) @ W).abs().max() < 1e-5
    # Wgrad: dy and the cached FP8 activation, both in Bx1 tiles (1xB along the tokens)
    dw = _deq_tiles64(dy.t().contiguous(), B) @ _deq_tiles64(X.float().t().contiguous(), B).T
    assert (w.grad.double() - dw).abs().max() < 1e-5
    # and all three are close to the exact gradients
    xe, we = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    (xe @ we.T).backward(dy.double())
    for got, exact in ((x.grad, xe.grad), (w.grad, we.grad)):
        assert F.cosine_similarity(got.double().flatten(), exact.flatten(), dim=0) > 0.995


def _grads(model, ids):
    out = model(ids, return_mtp=True)
    V = out.logits.shape[-1]
    loss = F.cross_entropy(out.logits[:, :-1].reshape(-1, V).float(), ids[:, 1:].reshape(-1))
    loss = loss + 0.3 * F.cross_entropy(out.mtp_logits[0][:, :-1].reshape(-1, V).float(), ids[:, 2:].reshape(-1))
    loss.backward()
    return torch.cat([p.grad.double().flatten() for p in model.parameters() if p.grad is not None]), loss.item()


def test_training_step_gradients_fp8_close_to_bf16_and_fp32():
    torch.manual_seed(0)
    # n_group=1 routing: top-k flips near ties would swap whole expert gradients in any precision
    ref = dsv3.Transformer(tiny_config(hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                                       n_group=1, topk_group=1))
    ids = torch.randint(0, 96, (4, 24))
    bf16, f8 = copy.deepcopy(ref).to(torch.bfloat16), copy.deepcopy(ref)
    names = apply_fp8_training(f8, FP8TrainingConfig(block=B))
    assert "layers.1.mlp.experts" in names and "layers.0.self_attn.kv_b_proj" in names
    g32, l32 = _grads(ref, ids)
    g16, l16 = _grads(bf16, ids)
    g8, l8 = _grads(f8, ids)
    cos8 = float(F.cosine_similarity(g8, g32, dim=0))
    cos8_16 = float(F.cosine_similarity(g8, g16, dim=0))
    assert cos8 > 0.98 and cos8_16 > 0.98, (cos8, cos8_16)
    assert abs(l8 - l32) / l32 < 2e-3 and abs(l16 - l32) / l32 < 2e-3
    rel8 = float((g8 - g32).norm() / g32.norm())
    rel16 = float((g16 - g32).norm() / g32.norm())
    assert rel8 < 0.2 and rel8 > rel16, (rel8, rel16)     # E4M3 (3 mantissa bits) is coarser than bf16 (7)


def test_apply_fp8_training_keeps_parameters_and_names():
    model = dsv3.Transformer(tiny_config())
    params = dict(model.named_parameters())
    keys = list(model.state_dict())
    apply_fp8_training(model, FP8TrainingConfig(block=8))
    assert isinstance(model.layers[1].self_attn.q_b_proj, FP8TrainingLinear)
    assert isinstance(model.layers[1].mlp.experts, FP8TrainingExperts)
    assert type(model.lm_head) is torch.nn.Linear and type(model.mtp[0].eh_proj) is torch.nn.Linear
    assert list(model.state_dict()) == keys
    assert all(params[n] is p for n, p in model.named_parameters())
    with pytest.raises(ValueError, match="block"):
        FP8TrainingConfig(block=0)


def test_adamw_bf16_moments_vs_torch_adamw():
    torch.manual_seed(0)
    p0 = [torch.randn(6, 5), torch.randn(7)]
    grads = [[torch.randn_like(p) for p in p0] for _ in range(5)]

    def run(opt_cls, **kw):
        ps = [p.clone().requires_grad_() for p in p0]
        opt = opt_cls([{"params": ps[:1], "weight_decay": 0.1}, {"params": ps[1:], "weight_decay": 0.0}],
                      lr=1e-2, betas=(0.9, 0.95), eps=1e-8, **kw)
        for gs in grads:
            for p, g in zip(ps, gs):
                p.grad = g.clone()
            opt.step()
        return ps, opt

    ref, _ = run(torch.optim.AdamW, foreach=False)
    exact, _ = run(AdamWBF16, moment_dtype=torch.float32)
    for a, b in zip(ref, exact):
        assert torch.allclose(a, b, atol=1e-6, rtol=0)
    approx, opt = run(AdamWBF16)
    st = opt.state[approx[0]]
    assert st["exp_avg"].dtype == torch.bfloat16 and st["exp_avg_sq"].dtype == torch.bfloat16
    for a, b, p in zip(ref, approx, p0):
        # bf16 moments (8 significant bits) perturb the updates by about 1%
        rel = float((a - b).detach().norm() / (a - p).detach().norm())
        assert 0 < rel < 0.02, rel


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return source_corpus(tmp_path_factory.mktemp("corpus"), ("argparse", "collections", "textwrap", "inspect"))


def test_train_fp8_runs_saves_bf16_moments_and_resumes_exactly(corpus, tmp_path):
    cfg = TrainConfig(data=[str(corpus)], out=str(tmp_path / "run"), max_steps=4, batch_size=2, seq_len=32,
                      lr=1e-2, warmup_steps=1, save_every=2, eval_every=0, eval_batches=1, vocab_size=300,
                      tokenizer_train_mb=0.1, val_fraction=0.1, progress=False, sample_tokens=0, device="cpu",
                      fp8=True, fp8_block=B,
                      model_overrides=dict(hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                                           num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                           kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
                                           v_head_dim=8, n_routed_experts=4, n_group=2, topk_group=1,
                                           num_experts_per_tok=2, first_k_dense_replace=1))
    train(cfg, log=lambda *a: None)
    run = Path(cfg.out)
    losses = [json.loads(ln)["loss"] for ln in (run / "metrics.jsonl").read_text().splitlines()
              if "kind" not in json.loads(ln)]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    opt = load_file(str(state_dir(run / "checkpoint-2") / "optimizer.safetensors"))
    assert {t.dtype for k, t in opt.items() if k.endswith("exp_avg")} == {torch.bfloat16}
    state = read_trainer_state(run / "checkpoint-2")
    assert state["train_config"]["fp8"] is True and state["train_config"]["fp8_block"] == B
    # the final model loads as a plain checkpoint (FP8 training keeps fp32 master weights)
    assert dsv3.load_pretrained(run / "final").layers[0].mlp.gate_proj.weight.dtype == torch.float32
    # resume from step 2: the same losses, bit for bit
    (run / "final").rename(run / "final-first")
    for p in run.glob("checkpoint-4"):
        p.rename(run / "checkpoint-4-first")
    train(TrainConfig(out=str(run), progress=False, device="cpu"), resume=True, log=lambda *a: None)
    resumed = [json.loads(ln)["loss"] for ln in (run / "metrics.jsonl").read_text().splitlines()
               if "kind" not in json.loads(ln)]
    assert resumed == losses


def test_cli_flags_reach_the_train_config(capsys):
    from dsv3.cli import build_parser
    from dsv3.cli.train import train_config_from_args
    args = build_parser().parse_args(["train", "--fp8", "--fp8-block", "32"])
    cfg = train_config_from_args(args)
    assert cfg.fp8 is True and cfg.fp8_block == 32
    assert train_config_from_args(build_parser().parse_args(["train"])).fp8 is False
    exp = build_parser().parse_args(["experiment", "fp8"])
    assert exp.max_steps == 60 and exp.func.__name__ == "cmd_experiment_fp8"


def test_experiment_summary_from_two_runs(tmp_path):
    from dsv3.train.experiment_fp8 import SMOOTH, format_report, summarize_fp8_experiment
    base = [10.0 - 0.1 * i for i in range(30)]
    f8 = [v * (1.002 if i % 2 else 0.999) for i, v in enumerate(base)]
    for arm, losses, val in (("baseline", base, 5.0), ("fp8", f8, 5.01)):
        (tmp_path / arm).mkdir()
        lines = [json.dumps({"step": i + 1, "loss": v, "tokens_per_s": 100.0}) for i, v in enumerate(losses)]
        lines.append(json.dumps({"kind": "eval", "step": 30, "val_loss": val}))
        (tmp_path / arm / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    r = summarize_fp8_experiment(tmp_path, 128, "fp32")
    rel = [abs(f - b) / b for b, f in zip(base, f8)]
    assert r["rel_err_per_step_mean"] == pytest.approx(sum(rel) / 30)
    assert r["rel_err_per_step_max"] == pytest.approx(0.002)
    assert r["rel_diff_signed_mean"] == pytest.approx(sum((f - b) / b for b, f in zip(base, f8)) / 30)
    # a 10-step moving average of both curves, compared at the last step (full window)
    mb, mf = sum(base[-SMOOTH:]) / SMOOTH, sum(f8[-SMOOTH:]) / SMOOTH
    assert r["rel_err_smoothed_max_after_window"] >= abs(mf - mb) / mb
    assert r["rel_err_val_loss"] == pytest.approx(0.002)
    assert (tmp_path / "fp8.png").stat().st_size > 0 and "paper" in format_report(r)
