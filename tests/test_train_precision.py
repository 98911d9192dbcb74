"""Training precision (train/precision.py): ``--dtype auto | bf16 | fp32``, and what bf16 autocast runs.

fp32 must stay what it was (no autocast, the same optimizer arithmetic); bf16 must run the GEMMs in
bf16 -- the fused head included -- with the casts done once per layer, not once per expert.
"""

from __future__ import annotations

import collections
import pytest
import torch
import torch.nn.functional as F
from conftest import TRAIN_MODEL
from torch.utils._python_dispatch import TorchDispatchMode

from dsv3.cli import build_parser
from dsv3.kernels.linear_cross_entropy import linear_cross_entropy
from dsv3.model.moe import RoutedExperts
from dsv3.train import precision
from dsv3.train.optim import build_optimizer, param_groups
from dsv3.train.precision import autocast, train_dtype


class OpLog(TorchDispatchMode):
    """Records every ATen op that runs (name, dtypes of its tensor arguments)."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, tuple]] = []
        self.copies: list[tuple[str, torch.dtype, torch.dtype]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        dtypes = tuple(a.dtype for a in args if isinstance(a, torch.Tensor))
        name = func.overloadpacket.__name__
        self.ops.append((name, dtypes))
        out = func(*args, **(kwargs or {}))
        if name == "_to_copy":
            self.copies.append((name, args[0].dtype, out.dtype))
        return out

    def count(self, name: str) -> int:
        return sum(1 for n, _ in self.ops if n == name)

    def casts(self) -> collections.Counter:
        """(from, to) dtype names of every ``_to_copy``."""
        return collections.Counter((str(src).removeprefix("torch."), str(dst).removeprefix("torch."))
                                   for n, src, dst in self.copies)


# ---------------------------------------------------------------------- the rule
def test_auto_is_bf16_only_where_there_are_bf16_units(monkeypatch):
    import dsv3.cpu
    monkeypatch.setattr(dsv3.cpu, "has_bf16_units", lambda: False)
    assert train_dtype("auto", "cpu") == torch.float32
    monkeypatch.setattr(dsv3.cpu, "has_bf16_units", lambda: True)
    assert train_dtype("auto", "cpu") == torch.bfloat16
    assert train_dtype("auto", "cuda") == torch.bfloat16          # a GPU: as before this knob
    assert train_dtype("bf16", "cpu") == torch.bfloat16 and train_dtype("fp32", "cuda") == torch.float32
    with pytest.raises(ValueError, match="expected one of auto, bf16, fp32"):
        train_dtype("fp16", "cpu")


def test_fp32_enters_no_autocast_and_bf16_enters_cpu_autocast():
    with autocast("cpu", "fp32"):
        assert not torch.is_autocast_enabled("cpu")
    with autocast(torch.device("cpu"), "bf16"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def test_dtype_is_a_flag_of_train_sft_and_grpo():
    parser = build_parser()
    assert parser.parse_args(["train", "--dtype", "bf16"]).dtype == "bf16"
    assert parser.parse_args(["train"]).dtype == "auto"
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--dtype", "fp16"])
    from dsv3.post.grpo import GRPOConfig
    from dsv3.post.sft import SFTConfig
    from dsv3.train.trainer import TrainConfig
    for cls in (TrainConfig, SFTConfig, GRPOConfig):
        assert cls.__dataclass_fields__["dtype"].default == "auto", cls


# ---------------------------------------------------------------------- the optimizer
def test_the_multi_tensor_adamw_is_bitwise_the_per_tensor_one():
    # build_optimizer switched foreach=False -> foreach=True: fp32 runs must not change by one bit.
    def run(make):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(40, 30), torch.nn.LayerNorm(30), torch.nn.Linear(30, 7))
        opt = make(model)
        g = torch.Generator().manual_seed(1)
        for i in range(12):
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=g) * 10 ** -(i % 4)
            for group in opt.param_groups:
                group["lr"] = 3e-3 * (i + 1) / 12
            opt.step()
        return [p.detach().clone() for p in model.parameters()] + [
            s for st in opt.state.values() for s in (st["exp_avg"], st["exp_avg_sq"])]

    ours = run(lambda m: build_optimizer(m, 3e-3, 0.1))
    per_tensor = run(lambda m: torch.optim.AdamW(param_groups(m, 0.1), lr=3e-3, betas=(0.9, 0.95), eps=1e-8,
                                                 foreach=False))
    assert all(torch.equal(a, b) for a, b in zip(ours, per_tensor))
    assert build_optimizer(torch.nn.Linear(2, 2), 1e-3, fused=True).defaults["fused"]


# ---------------------------------------------------------------------- the experts
def _experts(E: int, D: int = 32, I: int = 24, seed: int = 0) -> RoutedExperts:
    torch.manual_seed(seed)
    m = RoutedExperts(E, D, I)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return m


def _per_expert_reference(m: RoutedExperts, x, w, topk):
    """Each routed slot on its own, every matmul left to autocast (the plain definition)."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(topk.shape[1]):
            e = int(topk[t, j])
            xt = x[t:t + 1]
            h = F.silu(xt @ m.gate_proj[e].T) * (xt @ m.up_proj[e].T)
            out[t:t + 1] += ((h * w[t, j].to(h.dtype)) @ m.down_proj[e].T).to(out.dtype)
    return out


def test_routed_experts_under_cpu_autocast_match_the_plain_definition():
    m = _experts(6)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(20, 32, generator=g, requires_grad=True)
    topk = torch.stack([torch.randperm(6, generator=g)[:2] for _ in range(20)])
    w = torch.rand(20, 2, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = m(x, w, topk)
        ref = _per_expert_reference(m, x, w, topk)
    assert got.dtype == ref.dtype == torch.float32
    # Same bf16 operands, same per-expert GEMMs: only the order of the k-way sum differs.
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    gx, *gw = torch.autograd.grad(got.square().sum(), [x, *m.parameters()])
    rx, *rw = torch.autograd.grad(ref.square().sum(), [x, *m.parameters()])
    for a, b in zip([gx, *gw], [rx, *rw]):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=2e-2, atol=1e-3)   # bf16 weight gradients, summed in another order


def _casts(E: int) -> tuple[collections.Counter, collections.Counter]:
    """(forward, backward) casts of one RoutedExperts call under bf16 autocast, by direction."""
    m = _experts(E)
    x = torch.randn(64, 32, requires_grad=True)
    topk = torch.stack([torch.randperm(E)[:2] for _ in range(64)])
    w = torch.rand(64, 2)
    with OpLog() as log, torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x, w, topk)
    with OpLog() as blog:
        out.sum().backward()
    mms = [d for n, d in log.ops if n == "mm"]
    assert mms and all(d == (torch.bfloat16, torch.bfloat16) for d in mms)   # the GEMMs do run in bf16
    return log.casts(), blog.casts()


def test_expert_weights_and_tokens_are_cast_once_per_layer_not_per_expert():
    # Autocast alone casts each expert's weight slices and its token chunk (twice) to bf16, and
    # each weight gradient back: O(E) casts each way. Now: the 3 stacked weights, the gathered
    # tokens and gate weights down to bf16 once, whatever E; per expert only its output goes up
    # to fp32 for the sum (and that cast's gradient back down).
    (f4, b4), (f16, b16) = _casts(4), _casts(16)
    down = ("float32", "bfloat16")
    assert f4[down] == f16[down] == 5
    assert b4[("bfloat16", "float32")] == b16[("bfloat16", "float32")] <= 4     # stacked weights, the tokens
    assert f16[("bfloat16", "float32")] == 16 and b16[down] == 16               # the per-expert outputs


def test_fp32_experts_run_no_casts():
    m = _experts(8)
    x = torch.randn(16, 32)
    topk = torch.stack([torch.randperm(8)[:2] for _ in range(16)])
    with OpLog() as log:
        m(x, torch.rand(16, 2), topk)
    assert all(d[0] == torch.float32 for n, d in log.ops if n == "mm")
    assert log.count("_to_copy") == 0


# ---------------------------------------------------------------------- the head
def test_fused_head_runs_its_gemms_in_bf16_under_cpu_autocast():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(70, 48, generator=g, requires_grad=True)
    w = (torch.randn(300, 48, generator=g) * 0.2).requires_grad_()
    t = torch.randint(0, 300, (70,), generator=g)
    with OpLog() as log, torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(x, w, t, chunk_size=32)
    assert loss.dtype == torch.float32
    mms = [d for n, d in log.ops if n == "mm"]
    assert mms and all(d == (torch.bfloat16, torch.bfloat16) for d in mms)
    gx, gw = torch.autograd.grad(loss, [x, w])
    # independent: autocast's bf16 logits, then fp32 cross-entropy
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = x @ w.T
    ref = F.cross_entropy(logits.float(), t)
    rx, rw = torch.autograd.grad(ref, [x, w])
    torch.testing.assert_close(loss, ref, rtol=2e-3, atol=2e-3)
    assert gx.dtype == gw.dtype == torch.float32
    torch.testing.assert_close(gx, rx, rtol=3e-2, atol=1e-4)
    torch.testing.assert_close(gw, rw, rtol=3e-2, atol=1e-4)


# ---------------------------------------------------------------------- a training step
SMALL_MODEL = dict(TRAIN_MODEL, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, vocab_size=256,
                   num_nextn_predict_layers=1)


def _losses(dtype: str, steps: int = 6) -> list[float]:
    from dsv3.config import preset
    from dsv3.model import Transformer
    from dsv3.train.trainer import TrainConfig, compute_losses
    torch.manual_seed(0)
    model = Transformer(preset("tiny").replace(**SMALL_MODEL))
    cfg = TrainConfig(dtype=dtype)
    opt = build_optimizer(model, 3e-3, fused=train_dtype(dtype, "cpu") == torch.bfloat16)
    window = torch.randint(0, 256, (4, 33), generator=torch.Generator().manual_seed(1))
    out = []
    for _ in range(steps):
        with autocast("cpu", dtype):
            loss = compute_losses(model, window, cfg)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        out.append(float(loss.detach()))
    return out


def test_a_bf16_training_step_learns_like_fp32():
    fp32, bf16 = _losses("fp32"), _losses("bf16")
    assert bf16[-1] < bf16[0] - 0.3                       # it learns (the same batch, six steps)
    for a, b in zip(fp32, bf16):
        assert abs(a - b) / a < 0.02, (fp32, bf16)         # bf16 rounding, not another model


def test_run_prepare_picks_the_fused_adamw_for_bf16_only(tmp_path):
    from dsv3.train.loop import SingleProcess
    from dsv3.train.trainer import TrainConfig
    model = torch.nn.Linear(4, 4)

    class Stub:  # just what prepare reads
        runner, log = SingleProcess(torch.device("cpu")), staticmethod(lambda *a: None)

    for dtype, fused in (("bf16", True), ("fp32", False)):
        stub = Stub()
        stub.cfg = TrainConfig(dtype=dtype)
        from dsv3.train.loop import Run
        opt = Run.prepare(stub, model)(model, 1e-3)
        assert bool(opt.defaults.get("fused")) is fused, dtype
    assert precision.TRAIN_DTYPES == ("auto", "bf16", "fp32")
