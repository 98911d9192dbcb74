"""The fused, chunked linear + cross-entropy against ``F.cross_entropy(x @ W.T)``: values and gradients."""

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_config
from dsv3 import Transformer
from dsv3.kernels.linear_cross_entropy import default_chunk_size, linear_cross_entropy
from dsv3.train.trainer import TrainConfig, compute_losses, fused_head_usable


def _reference(x, w, t, ignore_index=-100):
    """Independent oracle: full logits (at least fp32, as the trainer's ``.float()``), then torch's cross-entropy."""
    logits = x.reshape(-1, x.shape[-1]) @ w.T
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits, t.reshape(-1), ignore_index=ignore_index)


def _grads(fn, x, w, t, grad_scale=1.0, **kw):
    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    loss = fn(x, w, t, **kw)
    (loss * grad_scale).backward()
    return loss.detach(), x.grad, w.grad


def _data(dtype, shape=(3, 37), D=24, V=101, seed=0, ignore=0.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, D, generator=g, dtype=dtype)
    w = torch.randn(V, D, generator=g, dtype=dtype) * 0.5
    t = torch.randint(0, V, shape, generator=g)
    if ignore:
        t[torch.rand(shape, generator=g) < ignore] = -100
    return x, w, t


@pytest.mark.parametrize("chunk", [1, 7, 32, 111, 1000])        # 111 rows: the whole batch in one chunk
@pytest.mark.parametrize("ignore", [0.0, 0.3])
def test_matches_reference_float64(chunk, ignore):
    x, w, t = _data(torch.float64, ignore=ignore)
    got = _grads(linear_cross_entropy, x, w, t, grad_scale=2.5, chunk_size=chunk)
    ref = _grads(_reference, x, w, t, grad_scale=2.5)
    assert got[0].dtype == ref[0].dtype
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("chunk", [None, 16, 50])
def test_matches_reference_float32(chunk):
    # Larger vocabulary and rows than a chunk, so the chunked softmax and dW accumulation are exercised.
    x, w, t = _data(torch.float32, shape=(4, 64), D=48, V=3000, seed=1, ignore=0.1)
    got = _grads(linear_cross_entropy, x, w, t, chunk_size=chunk)
    ref = _grads(_reference, x, w, t)
    assert got[0].dtype == torch.float32
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-6)
    for a, b in zip(got[1:], ref[1:]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_only_the_needed_gradients_and_no_grad():
    x, w, t = _data(torch.float64)
    ref = _reference(x, w, t)
    with torch.no_grad():
        assert torch.allclose(linear_cross_entropy(x, w, t, chunk_size=5), ref, rtol=1e-12)
    wr = w.clone().requires_grad_()                      # frozen input, trainable head
    linear_cross_entropy(x, wr, t, chunk_size=5).backward()
    w2 = w.clone().requires_grad_()
    _reference(x, w2, t).backward()
    torch.testing.assert_close(wr.grad, w2.grad, rtol=1e-12, atol=1e-12)
    xr = x.clone().requires_grad_()                      # frozen head, trainable input
    linear_cross_entropy(xr, w, t).backward()
    x2 = x.clone().requires_grad_()
    _reference(x2, w, t).backward()
    torch.testing.assert_close(xr.grad, x2.grad, rtol=1e-12, atol=1e-12)


def test_all_targets_ignored_is_nan_like_torch():
    x, w, t = _data(torch.float32, shape=(2, 3))
    t[:] = -100
    assert math.isnan(_reference(x, w, t).item())
    assert math.isnan(linear_cross_entropy(x, w, t).item())


def test_bad_inputs_are_named():
    x, w, t = _data(torch.float32)
    with pytest.raises(ValueError, match="weight"):
        linear_cross_entropy(x, w[:, :-1], t)
    with pytest.raises(ValueError, match="target"):
        linear_cross_entropy(x, w, t[:, :-1])
    with pytest.raises(ValueError, match="integer"):
        linear_cross_entropy(x, w, t.float())
    with pytest.raises(ValueError, match="chunk_size"):
        linear_cross_entropy(x, w, t, chunk_size=0)


def test_default_chunk_size():
    cpu = torch.device("cpu")
    assert default_chunk_size(2048, 8192, cpu) == 256               # 2M fp32 values per chunk on CPU
    assert default_chunk_size(10, 8192, cpu) == 10                  # never more rows than there are
    assert default_chunk_size(4096, 129280, cpu) == 128             # never thinner than MIN_CHUNK_ROWS


def test_trainer_fused_losses_and_gradients_equal_plain():
    """compute_losses with the fused head (main + MTP) equals the plain path, gradients included."""
    torch.manual_seed(0)
    model = Transformer(tiny_config(num_nextn_predict_layers=2))
    assert fused_head_usable(model)
    window = torch.randint(0, model.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(3))
    out = {}
    for fused in (False, True):
        model.zero_grad(set_to_none=True)
        losses = compute_losses(model, window, TrainConfig(fused_ce=fused))
        losses["loss"].backward()
        out[fused] = ({k: v.item() for k, v in losses.items() if not k.startswith("_")},
                      {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    (plain, g_plain), (fused, g_fused) = out[False], out[True]
    assert plain.keys() == fused.keys() >= {"lm_loss", "mtp_loss", "balance_loss", "loss"}
    for k in plain:
        assert fused[k] == pytest.approx(plain[k], rel=1e-6, abs=1e-7), k
    assert g_plain.keys() == g_fused.keys()
    for n in g_plain:
        torch.testing.assert_close(g_fused[n], g_plain[n], rtol=1e-4, atol=1e-7, msg=n)


def test_wrapped_models_keep_the_plain_head():
    model = Transformer(tiny_config(num_nextn_predict_layers=0))
    model.lm_head.register_forward_hook(lambda *a: None)      # e.g. an FSDP or a profiling hook
    assert not fused_head_usable(model)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_autocast_matches_reference():
    x, w, t = (a.cuda() for a in _data(torch.float32, shape=(8, 128), D=256, V=5000, ignore=0.1))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = _grads(linear_cross_entropy, x, w, t, chunk_size=300)
        ref = _grads(_reference, x, w, t)
    torch.testing.assert_close(got[0], ref[0], rtol=2e-3, atol=2e-3)
    for a, b in zip(got[1:], ref[1:]):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=3e-2, atol=1e-4)
