"""FP8 mixed-precision training, DeepSeek-V3's recipe (§3.3), applied from outside the model.

Every GEMM of the linear layers of attention and MLPs/experts (the layers the checkpoints store in
FP8) takes E4M3 inputs, in forward and backward:
  Fprop   y  = x  @ W^T    x in 1 x 128 tiles (per token), W in 128 x 128 blocks
  Dgrad   dx = dy @ W      dy in 1 x 128 tiles, W^T in 128 x 128 blocks (the same blocks, transposed)
  Wgrad   dW = dy^T @ x    both in 128 x 1 tiles (1 x 128 along the token dimension): the activation
                           cached in FP8 by Fprop is dequantized and re-quantized transposed, as the
                           report describes
each accumulated in fp32 every 128 along K (:func:`dsv3.kernels.fp8_gemm.fp8_gemm`). Weights are
fp32 master copies, quantized afresh each step; AdamW keeps its moments in bf16
(:class:`AdamWBF16`). Embedding, output head, router, norms, MTP ``eh_proj`` and the attention
core (softmax(QK^T)V) stay in high precision. On CPU the FP8 arithmetic is emulated exactly; on a GPU
the same GEMMs run on FP8 tensor cores when a checked fast backend is available.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import fp8
from ..hf_layout import fp8_targets
from ..kernels.fp8_gemm import fp8_gemm
from ..model.moe import RoutedExperts, dispatch_experts
from ..replace import adopt_tensors, replace_module


@dataclass(frozen=True)
class FP8TrainingConfig:
    """block: tile width of activations/gradients (1 x block) and weight block side (block x block);
    128 in the paper, smaller only to make tiny test models span several blocks."""

    block: int = 128
    scale_fmt: str | None = None      # None: amax/448 scales; "ue8m0": powers of two
    backend: str = "auto"             # fp8_gemm backend

    def __post_init__(self):
        if not isinstance(self.block, int) or self.block < 1:
            raise ValueError(f"FP8 block={self.block!r}: must be a positive integer")
        fp8.check_scale_fmt(self.scale_fmt)


class _FP8Matmul(torch.autograd.Function):
    """``x [M, K] @ W [N, K]^T`` with E4M3 operands in all three GEMMs (see the module docstring)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, cfg: FP8TrainingConfig) -> torch.Tensor:
        b = cfg.block
        with torch.autocast(x.device.type, enabled=False):  # the FP8 arithmetic must not be recast
            xq, xs = fp8.quantize_tiles(x, b, cfg.scale_fmt)                       # [M, K], [M, K/b]
            wq, ws = fp8.quantize_blockwise(w, (b, b), cfg.scale_fmt)             # [N, K], [N/b, K/b]
            y = fp8_gemm(xq, xs, wq, ws, tile=b, bn=b, out_dtype=torch.float32, backend=cfg.backend)
        ctx.save_for_backward(xq, xs, wq, ws)   # activations are cached in FP8, as in the report
        ctx.cfg, ctx.x_dtype, ctx.w_dtype = cfg, x.dtype, w.dtype
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        xq, xs, wq, ws = ctx.saved_tensors
        cfg = ctx.cfg
        b = cfg.block
        with torch.autocast(dy.device.type, enabled=False):
            dy = dy.float()
            dx = None
            if ctx.needs_input_grad[0]:
                dyq, dys = fp8.quantize_tiles(dy, b, cfg.scale_fmt)               # [M, N], 1 x b along N
                dx = fp8_gemm(dyq, dys, wq.t().contiguous(), ws.t().contiguous(), tile=b, bn=b,
                              out_dtype=torch.float32, backend=cfg.backend).to(ctx.x_dtype)      # [M, K]
            dw = None
            if ctx.needs_input_grad[1]:
                x_hat = fp8.dequantize_tiles(xq, xs, b)                            # the cached FP8 activation
                dytq, dyts = fp8.quantize_tiles(dy.t(), b, cfg.scale_fmt)          # [N, M], b x 1 tiles of dy
                xtq, xts = fp8.quantize_tiles(x_hat.t(), b, cfg.scale_fmt)         # [K, M], b x 1 tiles of x
                dw = fp8_gemm(dytq, dyts, xtq, xts, tile=b, bn=1, out_dtype=torch.float32,
                              backend=cfg.backend).to(ctx.w_dtype)                  # [N, K]
        return dx, dw, None


def fp8_matmul(x: torch.Tensor, w: torch.Tensor, cfg: FP8TrainingConfig) -> torch.Tensor:
    """``x [..., K] @ w [N, K]^T -> [..., N]`` through the FP8 training GEMMs (differentiable in x and w)."""
    lead = x.shape[:-1]
    y = _FP8Matmul.apply(x.reshape(-1, x.shape[-1]), w, cfg)
    return y.view(*lead, w.shape[0])


class FP8TrainingLinear(nn.Linear):
    """An ``nn.Linear`` whose GEMMs run in FP8; same parameters (the fp32 master weights), same state dict."""

    fp8_config: FP8TrainingConfig

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: FP8TrainingConfig) -> "FP8TrainingLinear":
        """The FP8 version of ``linear``, holding its very Parameters (not copies)."""
        with torch.device("meta"):  # placeholders only: the Parameters are taken over
            new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        adopt_tensors(new, linear)
        new.fp8_config = config
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = fp8_matmul(x, self.weight, self.fp8_config)
        return y if self.bias is None else y + self.bias.to(y.dtype)


class FP8TrainingExperts(RoutedExperts):
    """:class:`~dsv3.model.moe.RoutedExperts` with FP8 GEMMs per expert; same parameters and routing."""

    fp8_config: FP8TrainingConfig

    @classmethod
    def from_experts(cls, experts: RoutedExperts, config: FP8TrainingConfig) -> "FP8TrainingExperts":
        """The FP8 version of ``experts``, holding its very Parameters (not copies)."""
        E, inter, hidden = experts.gate_proj.shape
        with torch.device("meta"):  # placeholders only: the Parameters are taken over
            new = cls(E, hidden, inter)
        adopt_tensors(new, experts)
        new.fp8_config = config
        return new

    def _expert(self, chunk: torch.Tensor, route_w: torch.Tensor, w: tuple) -> torch.Tensor:
        w_gate, w_up, w_down = w
        cfg = self.fp8_config
        h = F.silu(fp8_matmul(chunk, w_gate, cfg)) * fp8_matmul(chunk, w_up, cfg)   # [n, I]
        return fp8_matmul(h * route_w.to(h.dtype), w_down, cfg)                   # [n, D]

    def forward(self, x: torch.Tensor, weights: torch.Tensor, topk: torch.Tensor) -> torch.Tensor:
        """x [T, D], weights/topk [T, k] -> sum_k weight * expert_k(x)  [T, D]."""
        per_expert = list(zip(self.gate_proj.unbind(0), self.up_proj.unbind(0), self.down_proj.unbind(0)))
        return dispatch_experts(x, weights, topk, per_expert, self._expert)


def apply_fp8_training(model: nn.Module, config: FP8TrainingConfig | None = None) -> list[str]:
    """Make ``model``'s attention and MLP/expert GEMMs FP8, in place; returns the converted module names.

    Each layer is replaced by its FP8 version, which takes over the layer's Parameters by reference
    (:mod:`dsv3.replace`): the Parameter objects and state-dict names stay (only the forward
    changes), so an optimizer, checkpoints and resume work exactly as without FP8. Apply it before
    sharding (FSDP keeps references to the modules it wraps).
    """
    config = config or FP8TrainingConfig()
    names = []
    for name, module, _ in fp8_targets(model):
        if isinstance(module, nn.Linear):
            new = FP8TrainingLinear.from_linear(module, config)
        else:
            new = FP8TrainingExperts.from_experts(module, config)
        replace_module(model, name, new)
        names.append(name)
    return names


class AdamWBF16(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias-corrected) with its moments stored in ``moment_dtype``.

    DeepSeek-V3 keeps AdamW's first and second moments in BF16 while weights and their update stay
    fp32. With ``moment_dtype=torch.float32`` this is plain AdamW (``torch.optim.AdamW``).
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.1,
                 moment_dtype: torch.dtype = torch.bfloat16):
        if not lr >= 0:
            raise ValueError(f"lr={lr}: must be >= 0")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"betas={betas}: each must be in [0, 1)")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.moment_dtype = moment_dtype  # not in the defaults: param groups are saved as JSON

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad.float()
                st = self.state[p]
                if not st:
                    st["step"] = torch.tensor(0.0)
                    st["exp_avg"] = torch.zeros_like(p, dtype=self.moment_dtype)
                    st["exp_avg_sq"] = torch.zeros_like(p, dtype=self.moment_dtype)
                for key in ("exp_avg", "exp_avg_sq"):  # load_state_dict casts them to the param's dtype
                    if st[key].dtype != self.moment_dtype:
                        st[key] = st[key].to(self.moment_dtype)
                st["step"] += 1
                t = float(st["step"])
                m = st["exp_avg"].float().mul_(b1).add_(g, alpha=1 - b1)
                v = st["exp_avg_sq"].float().mul_(b2).addcmul_(g, g, value=1 - b2)
                st["exp_avg"].copy_(m)
                st["exp_avg_sq"].copy_(v)
                m, v = st["exp_avg"].float(), st["exp_avg_sq"].float()   # the stored (rounded) moments
                p.mul_(1 - lr * wd)
                denom = (v.sqrt() / math.sqrt(1 - b2 ** t)).add_(eps)
                p.addcdiv_(m.to(p.dtype), denom.to(p.dtype), value=-lr / (1 - b1 ** t))
        return loss


def build_fp8_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.1, betas=(0.9, 0.95),
                        eps: float = 1e-8, scaled=(), lr_scale: float = 1.0) -> AdamWBF16:
    """The FP8 recipe's optimizer: AdamW with bf16 moments, decay on matrices only (as ``build_optimizer``)."""
    from .optim import param_groups
    return AdamWBF16(param_groups(model, weight_decay, scaled, lr_scale), lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
