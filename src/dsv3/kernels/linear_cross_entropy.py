"""Fused, chunked ``lm_head`` + cross-entropy: the loss of ``hidden @ weight.T`` without the full logits.

The plain way, ``F.cross_entropy(hidden @ weight.T, target)``, writes ``N x V`` fp32 logits, reads
them back for the log-softmax, writes the log-probabilities, and in the backward pass writes an
``N x V`` gradient of the logits (after filling a zero tensor for the one-hot part) and reads it
twice more for the two weight/input matmuls. For the tiny preset (N = 2,048 tokens, V = 8,192)
each of those tensors is 64 MiB, so the loss is bound by memory traffic, not arithmetic.

Here the rows are processed ``chunk_size`` at a time, and the gradient is computed in the
forward pass, while the chunk's logits are still in cache:

    logits_c = x_c @ W^T                               [c, V]   (one reused buffer)
    logp_c   = log_softmax(logits_c)                   [c, V]   (a second reused buffer)
    loss    += -sum_i logp_c[i, t_i]
    g_c      = exp(logp_c) - onehot(t_c)               in place: dloss_sum / dlogits_c
    dx_c     = g_c @ W                                 [c, D]
    dW      += g_c^T @ x_c                             [V, D]

The backward pass then only scales ``dx`` and ``dW`` by ``grad_output / n_valid``. The matmuls
are exactly those of the plain version (three of ``N x D x V``); what disappears is every
``N x V`` tensor. Memory: ``O(chunk_size x V + V x D)`` instead of ``O(N x V)``.

Semantics match ``F.cross_entropy(hidden @ weight.T, target, ignore_index=...)`` with mean
reduction over the non-ignored targets (``nan`` when every target is ignored, as torch does).
Under autocast (CUDA or CPU) the matmuls run in the autocast dtype and the softmax in fp32, like
``F.cross_entropy(lm_head(h).float(), ...)`` under autocast.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

# Rows per chunk are picked so one chunk of fp32 logits holds about this many values: 2M values
# (8 MiB, two buffers of it) stay in a CPU's last-level cache; measured on the tiny preset's head
# (2,048 x 256 x 8,192, one and two threads), 256-512 rows were fastest, 32 rows slower than no
# chunking at all. On a GPU, memory traffic is cheap and large matmuls are what matters, so
# chunks are much larger there. Never fewer than MIN_CHUNK_ROWS rows: thinner matmuls are slow.
CPU_CHUNK_VALUES = 1 << 21
CUDA_CHUNK_VALUES = 1 << 27
MIN_CHUNK_ROWS = 128


def default_chunk_size(n_rows: int, vocab_size: int, device: torch.device) -> int:
    """Rows per chunk for ``vocab_size`` logits on ``device`` (at least 1, at most ``n_rows``)."""
    budget = CUDA_CHUNK_VALUES if device.type == "cuda" else CPU_CHUNK_VALUES
    return max(1, min(n_rows, max(MIN_CHUNK_ROWS, budget // max(vocab_size, 1))))


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, *,
                         ignore_index: int = -100, chunk_size: int | None = None) -> torch.Tensor:
    """Mean cross-entropy of the logits ``hidden @ weight.T`` against ``target``, computed chunk by chunk.

    ``hidden [..., D]`` (float), ``weight [V, D]`` (the output head), ``target [...]`` (integer
    class ids, ``ignore_index`` entries skipped). Returns a scalar (float32; float64 for float64
    inputs) equal up to rounding to ``F.cross_entropy((hidden @ weight.T).float().reshape(-1, V), target.reshape(-1))``;
    its gradients flow to ``hidden`` and ``weight``. ``chunk_size``: rows per chunk (default:
    :func:`default_chunk_size`). Only first derivatives are supported.
    """
    if hidden.dim() < 1 or weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy: hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} "
                         f"must be [..., D] and [V, D]")
    if target.shape != hidden.shape[:-1]:
        raise ValueError(f"linear_cross_entropy: target {tuple(target.shape)} must have hidden's leading shape "
                         f"{tuple(hidden.shape[:-1])}")
    if target.dtype.is_floating_point or target.dtype == torch.bool:
        raise ValueError(f"linear_cross_entropy: target must hold integer class ids, got {target.dtype}")
    if not hidden.is_floating_point() or not weight.is_floating_point():
        raise ValueError(f"linear_cross_entropy: hidden and weight must be float, got {hidden.dtype}, {weight.dtype}")
    x = hidden.reshape(-1, hidden.shape[-1])
    t = target.reshape(-1)
    if chunk_size is None:
        chunk_size = default_chunk_size(x.shape[0], weight.shape[0], x.device)
    if chunk_size < 1:
        raise ValueError(f"linear_cross_entropy: chunk_size must be >= 1, got {chunk_size}")
    dev = x.device.type
    if torch.amp.is_autocast_available(dev) and torch.is_autocast_enabled(dev):
        # the head GEMMs in the autocast dtype on any device (on CPU too: left in fp32 they were a
        # fifth of a bf16 training step's GEMM work); softmax and the dW/dx sums stay fp32
        compute_dtype = torch.get_autocast_dtype(dev)
    else:
        compute_dtype = torch.promote_types(x.dtype, weight.dtype)
    # Computing the gradient costs two of the three matmuls: skip it when nobody will ask for it.
    need_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    return _LinearCrossEntropy.apply(x, weight, t, ignore_index, chunk_size, compute_dtype, need_grad)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, target, ignore_index, chunk_size, compute_dtype, need_grad):
        N, D = x.shape
        V = weight.shape[0]
        need_dx = need_grad and ctx.needs_input_grad[0]
        need_dw = need_grad and ctx.needs_input_grad[1]
        with torch.autocast(x.device.type, enabled=False):
            xc_all = x.to(compute_dtype)
            w = weight.to(compute_dtype)
            valid = target != ignore_index
            n_valid = valid.sum()
            safe_t = target.masked_fill(~valid, 0).unsqueeze(1)          # [N, 1], a valid gather index
            any_ignored = bool((~valid).any())                            # one host sync, not one per chunk
            acc = torch.promote_types(compute_dtype, torch.float32)       # softmax and gradient sums
            fp32 = compute_dtype == acc                                    # no casts needed (fp32, fp64)
            dx = torch.empty(N, D, dtype=acc, device=x.device) if need_dx else None
            dw = torch.zeros(V, D, dtype=acc, device=x.device) if need_dw else None
            loss_sum = torch.zeros((), dtype=acc, device=x.device)
            c = max(1, min(chunk_size, N))
            # Two buffers reused by every chunk: a fresh 4+ MiB allocation per chunk would cost page faults.
            logits_buf = torch.empty(c, V, dtype=compute_dtype, device=x.device)
            logp_buf = torch.empty(c, V, dtype=acc, device=x.device)
            for s in range(0, N, c):
                e = min(s + c, N)
                xc, tc, vc = xc_all[s:e], safe_t[s:e], valid[s:e]
                logits = torch.mm(xc, w.t(), out=logits_buf[: e - s])                     # [c, V]
                logp = torch.log_softmax(logits if fp32 else logits.to(acc), -1, out=logp_buf[: e - s])
                picked = logp.gather(1, tc).squeeze(1)                                    # [c]
                loss_sum -= torch.where(vc, picked, 0.0).sum()
                if not (need_dx or need_dw):
                    continue
                g = logp.exp_()                                                           # softmax, in place
                g.scatter_add_(1, tc, -vc.to(g.dtype).unsqueeze(1))                       # minus one-hot
                if any_ignored:
                    g.masked_fill_(~vc.unsqueeze(1), 0.0)
                gc = g if fp32 else g.to(compute_dtype)
                if need_dx:
                    if fp32:
                        torch.mm(gc, w, out=dx[s:e])                                      # [c, D]
                    else:
                        dx[s:e] = torch.mm(gc, w)
                if need_dw:
                    if fp32:
                        dw.addmm_(gc.t(), xc)                                             # [V, D]
                    else:
                        dw += torch.mm(gc.t(), xc)
            loss = loss_sum / n_valid
        ctx.save_for_backward(dx, dw, n_valid)
        ctx.dtypes = (x.dtype, weight.dtype)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        dx, dw, n_valid = ctx.saved_tensors
        scale = grad_loss / n_valid
        grad_x = (dx * scale).to(ctx.dtypes[0]) if dx is not None else None
        grad_w = (dw * scale).to(ctx.dtypes[1]) if dw is not None else None
        return grad_x, grad_w, None, None, None, None, None
