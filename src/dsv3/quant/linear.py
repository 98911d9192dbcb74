"""FP8 linear layers for inference: ``float8_e4m3fn`` weights + per-block ``weight_scale_inv``.

Forward of one layer (DeepSeek-V3's inference scheme, ``activation_scheme: dynamic``):
    x [..., K] --quantize per 1 x 128 tile (amax/448, optionally ue8m0)--> x_q, x_s
    y = fp8_gemm(x_q, x_s, W_q, W_s)          fp32 accumulation per 128-wide K chunk
The weights stay FP8 in memory: half the bytes of bf16 (plus one fp32 scale per 128x128 block).

Which layers: exactly those the official checkpoints store in FP8 (``hf_layout.quantizable``) --
every linear layer of attention and of the dense, shared and routed experts. Embedding, head,
router gate, norms and the MTP ``eh_proj`` stay in high precision. The model itself is untouched:
layers are replaced from outside (:mod:`dsv3.replace`), and MLA's absorbed decode path gets
``kv_b_proj`` dequantized (as DeepSeek's own inference code does) through :class:`FP8MLA`, which
takes over the attention's layers. :func:`load_pretrained_fp8` loads a checkpoint this way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import fp8
from ..checkpoint import load_pretrained
from ..hf_layout import fp8_block, fp8_quantization_config, fp8_targets
from ..kernels.fp8_gemm import fp8_gemm
from ..model import Transformer
from ..model.mla import MLA
from ..model.moe import RoutedExperts, dispatch_experts
from ..replace import adopt_tensors, replace_module


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor,
               block: tuple[int, int] = fp8.DEFAULT_BLOCK, scale_fmt: str | None = None,
               bias: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """``x [..., K] @ W^T`` with W FP8 ``[N, K]`` in ``block`` blocks; x quantized per 1 x block[1] tile.

    Returns ``[..., N]`` in x's dtype.
    """
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"input has {x.shape[-1]} features, the FP8 weight {tuple(weight.shape)} expects {weight.shape[1]}")
    lead = x.shape[:-1]
    xq, xs = fp8.quantize_tiles(x.reshape(-1, x.shape[-1]), block[1], scale_fmt)   # [M, K], [M, C]
    y = fp8_gemm(xq, xs, weight, weight_scale_inv, tile=block[1], bn=block[0], out_dtype=x.dtype, backend=backend)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.view(*lead, weight.shape[0])


class _FP8Storage(nn.Module):
    """Keeps FP8 tensors and their fp32 scales as they are under ``model.to(dtype)`` / ``.half()``.

    ``nn.Module.to(dtype)`` casts every floating-point tensor, float8 included; for these buffers
    only the device may follow (an E4M3 -> bf16 -> E4M3 round trip would be lossless, but fp32
    scales through bf16 would not).
    """

    _fp8_buffers: tuple[str, ...] = ()

    def _apply(self, fn, recurse=True):
        kept = {name: self._buffers.pop(name) for name in self._fp8_buffers}
        super()._apply(fn, recurse)
        for name, t in kept.items():
            device = fn(torch.empty(0, device=t.device)).device
            self._buffers[name] = torch.empty_like(t, device=device) if t.is_meta else t.to(device)
        return self


class FP8Linear(_FP8Storage):
    """A linear layer with ``weight`` float8_e4m3fn ``[out, in]`` and ``weight_scale_inv`` fp32 per block.

    The buffer names are the checkpoint's, so ``state_dict`` holds exactly the official tensors.
    """

    _fp8_buffers = ("weight", "weight_scale_inv")

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 block: tuple[int, int] = fp8.DEFAULT_BLOCK, scale_fmt: str | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.block, self.scale_fmt = tuple(block), scale_fmt
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=fp8.FP8_DTYPE, device=device))
        self.register_buffer("weight_scale_inv", torch.ones(fp8.scale_shape((out_features, in_features), self.block),
                                                             dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, block: tuple[int, int] = fp8.DEFAULT_BLOCK,
                    scale_fmt: str | None = None, quantize: bool = True) -> "FP8Linear":
        """Quantize ``linear`` (``quantize=False``: empty storage on its device, e.g. meta, to load into)."""
        w = linear.weight
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, block, scale_fmt,
                device=w.device, dtype=w.dtype)
        if quantize:
            q, s = fp8.quantize_blockwise(w.detach(), m.block, scale_fmt)
            m.weight, m.weight_scale_inv = q, s
            if linear.bias is not None:
                m.bias.data.copy_(linear.bias.detach())
        return m

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``weight * weight_scale_inv`` per block, ``[out, in]`` in ``dtype``."""
        return fp8.dequantize_blockwise(self.weight, self.weight_scale_inv, self.block, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.weight_scale_inv, self.block, self.scale_fmt, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"block={self.block}, scale_fmt={self.scale_fmt}")


class FP8RoutedExperts(_FP8Storage):
    """:class:`~dsv3.model.moe.RoutedExperts` with FP8 stacked weights ``[E, out, in]`` and scales
    ``<proj>_scale_inv [E, ceil(out/128), ceil(in/128)]`` (expert ``e`` is checkpoint tensor
    ``experts.e.<proj>.weight`` / ``.weight_scale_inv``). Same routing arithmetic as the reference."""

    _fp8_buffers = ("gate_proj", "gate_proj_scale_inv", "up_proj", "up_proj_scale_inv",
                    "down_proj", "down_proj_scale_inv")

    def __init__(self, n_experts: int, hidden_size: int, intermediate_size: int,
                 block: tuple[int, int] = fp8.DEFAULT_BLOCK, scale_fmt: str | None = None,
                 device: torch.device | str | None = None):
        super().__init__()
        self.block, self.scale_fmt = tuple(block), scale_fmt
        shapes = {"gate_proj": (intermediate_size, hidden_size), "up_proj": (intermediate_size, hidden_size),
                  "down_proj": (hidden_size, intermediate_size)}
        for name, shape in shapes.items():
            self.register_buffer(name, torch.zeros(n_experts, *shape, dtype=fp8.FP8_DTYPE, device=device))
            self.register_buffer(name + "_scale_inv", torch.ones(n_experts, *fp8.scale_shape(shape, self.block),
                                                                 dtype=torch.float32, device=device))

    @classmethod
    def from_experts(cls, experts: RoutedExperts, block: tuple[int, int] = fp8.DEFAULT_BLOCK,
                     scale_fmt: str | None = None, quantize: bool = True) -> "FP8RoutedExperts":
        E, inter, hidden = experts.gate_proj.shape
        m = cls(E, hidden, inter, block, scale_fmt, device=experts.gate_proj.device)
        if quantize:
            for name in ("gate_proj", "up_proj", "down_proj"):
                qs = [fp8.quantize_blockwise(w.detach(), m.block, scale_fmt) for w in getattr(experts, name)]
                setattr(m, name, torch.stack([q for q, _ in qs]))
                setattr(m, name + "_scale_inv", torch.stack([s for _, s in qs]))
        return m

    def _linear(self, x: torch.Tensor, name: str, e: int) -> torch.Tensor:
        return fp8_linear(x, getattr(self, name)[e], getattr(self, name + "_scale_inv")[e], self.block, self.scale_fmt)

    def _expert(self, chunk: torch.Tensor, route_w: torch.Tensor, e: int) -> torch.Tensor:
        h = F.silu(self._linear(chunk, "gate_proj", e)) * self._linear(chunk, "up_proj", e)   # [n, I]
        return self._linear(h * route_w.to(h.dtype), "down_proj", e)                          # [n, D]

    def forward(self, x: torch.Tensor, weights: torch.Tensor, topk: torch.Tensor) -> torch.Tensor:
        """x [T, D], weights/topk [T, k] -> sum_k weight * expert_k(x)  [T, D]."""
        return dispatch_experts(x, weights, topk, range(self.gate_proj.shape[0]), self._expert)


class FP8MLA(MLA):
    """MLA whose ``kv_b_proj`` is FP8: the absorbed decode path folds the dequantized weight.

    Built from an :class:`~dsv3.model.mla.MLA` whose layers it takes over by reference (same
    projections, norms, head sizes and softmax scale); only :meth:`absorbed_weights` differs.
    """

    def __init__(self, mla: MLA):
        nn.Module.__init__(self)  # not MLA.__init__, which would build new layers: the existing ones are taken over
        adopt_tensors(self, mla, children=True)
        for key, value in vars(mla).items():  # the plain attributes MLA.__init__ sets (head dims, softmax_scale)
            if key not in vars(self):
                setattr(self, key, value)

    def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = self.kv_a_layernorm.weight.dtype
        w = self.kv_b_proj.dequantized_weight(dtype).view(self.n_heads, self.nope + self.v_dim, self.rank)
        return w[:, : self.nope], w[:, self.nope:]


def replace_with_fp8(model: nn.Module, block: tuple[int, int] = fp8.DEFAULT_BLOCK, scale_fmt: str | None = None,
                     quantize: bool = True, select=None) -> list[str]:
    """Swap, in place, every layer the official checkpoints keep in FP8 for its FP8 version.

    quantize: quantize the current weights (False: allocate empty storage on the weights' device, for
    a loader to fill). select: optional ``f(checkpoint_name) -> bool`` to restrict the swap (the
    loader passes "stored as FP8 in this checkpoint"). Returns the swapped module names.
    """
    fp8.amax_to_scale(torch.ones(1), scale_fmt)  # validates scale_fmt before anything is swapped
    swapped = []
    for name, module, hf in fp8_targets(model):
        if select is not None and not select(hf):
            continue
        if isinstance(module, nn.Linear):
            new = FP8Linear.from_linear(module, block, scale_fmt, quantize)
        else:
            new = FP8RoutedExperts.from_experts(module, block, scale_fmt, quantize)
        replace_module(model, name, new)
        swapped.append(name)
    # The attention whose kv_b_proj is now FP8 needs the dequantizing absorbed path.
    for name, module in list(model.named_modules()):
        if isinstance(module, MLA) and not isinstance(module, FP8MLA) and isinstance(module.kv_b_proj, FP8Linear):
            replace_module(model, name, FP8MLA(module))
    return swapped


def quantize_model(model: nn.Module, block: tuple[int, int] = fp8.DEFAULT_BLOCK,
                   scale_fmt: str | None = None) -> nn.Module:
    """Quantize ``model``'s attention and MLP/expert weights to FP8 in place (as the official checkpoints
    store them) and record the ``quantization_config`` in its config; returns the model."""
    with torch.no_grad():
        replace_with_fp8(model, block, scale_fmt, quantize=True)
    model.config = model.config.replace(quantization_config=fp8_quantization_config(block, scale_fmt))
    return model


def load_pretrained_fp8(path, dtype: torch.dtype | str | None = None, device: torch.device | str | None = None,
                        max_seq_len: int | None = None, strict: bool = True) -> Transformer:
    """:func:`dsv3.load_pretrained`, keeping FP8-stored weights as ``float8_e4m3fn`` + scales in FP8
    layers (half the memory of bf16) instead of dequantizing them.

    The layers stored in FP8 are replaced by empty FP8 layers while the model is on the meta device,
    and the loader fills them with the checkpoint's bytes. A checkpoint without FP8 weights is
    loaded as it is and then quantized (:func:`quantize_model`). ``dtype``: the other tensors' dtype.
    """
    stored_fp8: frozenset[str] = frozenset()

    def keep_fp8(model: Transformer, fp8_names: frozenset[str]) -> None:
        nonlocal stored_fp8
        stored_fp8 = fp8_names
        if fp8_names:
            replace_with_fp8(model, fp8_block(model.config), (model.config.quantization_config or {}).get("scale_fmt"),
                             quantize=False, select=fp8_names.__contains__)

    model = load_pretrained(path, dtype, device, max_seq_len, strict, prepare=keep_fp8)
    return model if stored_fp8 else quantize_model(model)
