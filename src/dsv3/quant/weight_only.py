"""Weight-only int8 / int4 quantization for decoding on a CPU, applied from outside the model.

A decode step of a small batch reads every weight it uses once and does two FLOPs per weight and
row, so its speed is set by weight bytes: int8 reads 1/4 of fp32's, int4 1/8. Activations stay in
floating point (weight-only): each layer's weight is stored as integers plus scales and multiplied by
torch's CPU kernels (``quant/int_weights.py`` has the formats and kernels).

:func:`quantize_weight_only` replaces, by explicit module replacement (``setattr`` on the parent;
the model's classes are untouched):

- every ``nn.Linear`` of attention (``q_a_proj``/``q_b_proj``/``q_proj``, ``kv_a_proj_with_mqa``,
  ``o_proj``), of dense MLPs, of shared experts and the MTP ``eh_proj`` -> :class:`Int8Linear` /
  :class:`Int4Linear`;
- every routed-experts module (stacked ``gate_proj``/``up_proj``/``down_proj``) ->
  :class:`~dsv3.quant.weight_only_experts.Int8Experts` / ``Int4Experts``;
- the ``lm_head`` only with ``head=True``: it is the largest single matrix of a small model (e.g. 25M
  of the ``small`` preset's ~95M weights a decode step reads), but its error goes straight into the
  logits (measured in docs/engine-performance.md);
- MLA's ``kv_b_proj`` only with ``latent=True``: -> :class:`Int8AbsorbedProj` (int8 whatever the
  scheme), stored as the absorbed decode multiplies it (``W_UK`` per head transposed, ``W_UV`` per
  head, each per output channel of its own product); decoding never calls it as a Linear;

and keeps, in the model's dtype: the embedding (decoding gathers one row of it per token, so it
costs no bandwidth), norms, and the router (its fp32 scores choose the experts).

:data:`DECODE_OPTIONS` are the options the engine (``LLM(quantize=...)``) uses.

An int4 layer whose shape the kernel cannot take (``int_weights.check_int4_shape``) falls back to
int8; the summary lists it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..model.mla import MLA
from .int_weights import (KernelFormatBuffers, check_int4_shape, dequantize_int8, fbgemm_available, int4_linear,
                          int8_dynamic_linear, int8_linear, kernel_dtype, pack_int4, quantize_int4, quantize_int8)
from .weight_only_experts import Int4Experts, Int8Experts

SCHEMES = ("int8", "int4")
# int8 layers' activations: "float" (weight-only: torch's _weight_int8pack_mm on bf16 activations) or
# "int8" (rounded per call to 7 bits by fbgemm's dynamic linear, integer dot products: 1.5-3.8x the
# weight-only kernel's speed on AVX2 in benchmarks/int8_gemv_cpu.py, about twice its error).
ACTIVATIONS = ("float", "int8")
DEFAULT_GROUP_SIZE = 32
# Replaced only with latent=True (by Int8AbsorbedProj): decoding reads this Linear's weight through
# the absorbed attention's per-head views, it is not called.
KEEP_LINEARS = ("kv_b_proj",)
# What LLM(quantize=scheme) passes. int8 also quantizes the head: 1/4 of the `small` preset's bytes
# per step; within the int8 logits tolerance; its kernel call 2x the fp32 GEMM at 8 rows, par at 1
# (docs/engine-performance.md). Not kv_b_proj (latent): on the AVX2 machine its 2 x H small int8
# kernel calls per layer measured no faster than the fp32 absorbed products, and its bf16-rounded
# activations make the engine's greedy tokens part from the model's own forward (which multiplies
# by the dequantized weight). int4 keeps its earlier, measured defaults.
DECODE_OPTIONS = {"int8": {"head": True}, "int4": {}}


class Int8Linear(KernelFormatBuffers):
    """A linear layer with ``weight [out, in]`` int8 and ``weight_scale [out]`` (per output channel)."""

    _kernel_buffers = ("weight", "weight_scale")

    def __init__(self, linear: nn.Linear, activations: str = "float"):
        super().__init__()
        check_activations(activations)
        w = linear.weight
        self.in_features, self.out_features, self.activations = linear.in_features, linear.out_features, activations
        q, scale = quantize_int8(w)
        self.register_buffer("weight", q)                                              # [out, in] int8
        # fp32 for fbgemm (it packs from them once); the bf16 kernel dtype is _weight_int8pack_mm's
        sd = torch.float32 if activations == "int8" else kernel_dtype(w.device, w.dtype)
        self.register_buffer("weight_scale", scale.to(sd))                             # [out]
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        if self.activations == "int8":
            return int8_dynamic_linear(x, self.weight, self.weight_scale, self.bias)
        return int8_linear(x, self.weight, self.weight_scale, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"int8, activations={self.activations}")


def check_activations(activations: str) -> None:
    """Raise a ValueError unless ``activations`` is one of :data:`ACTIVATIONS` and its kernel exists here."""
    if activations not in ACTIVATIONS:
        raise ValueError(f"activations={activations!r}: must be one of {', '.join(ACTIVATIONS)}")
    if activations == "int8" and not fbgemm_available():
        raise ValueError("activations='int8' needs torch's fbgemm engine (x86 builds of torch); "
                         f"this one has {torch.backends.quantized.supported_engines}")


class Int4Linear(KernelFormatBuffers):
    """A linear layer with int4 weights in groups of ``group_size`` input channels (the CPU kernel's
    packed layout: ``weight [out, in/2]`` uint8, ``scale_and_zeros [in/g, out, 2]``)."""

    _kernel_buffers = ("weight", "scale_and_zeros")

    def __init__(self, linear: nn.Linear, group_size: int = DEFAULT_GROUP_SIZE):
        super().__init__()
        w = linear.weight
        self.in_features, self.out_features, self.group_size = linear.in_features, linear.out_features, group_size
        packed, sz = pack_int4(*quantize_int4(w, group_size), dtype=kernel_dtype(w.device, w.dtype))
        self.register_buffer("weight", packed)                                          # [out, in/2] uint8
        self.register_buffer("scale_and_zeros", sz)                                     # [in/g, out, 2]
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        return int4_linear(x, self.weight, self.scale_and_zeros, self.group_size, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"int4, group={self.group_size}")


class Int8AbsorbedProj(KernelFormatBuffers):
    """MLA's ``kv_b_proj`` in int8, stored in the two layouts the absorbed decode multiplies by.

    ``kv_b_proj.weight [H*(nope+v), r]`` is, per head, ``W_UK [nope, r]`` then ``W_UV [v, r]``. The
    absorbed query is ``q_nope @ W_UK`` (output: r latent channels), the output ``o_lat @ W_UV^T``
    (output: v channels), so each is stored as torch's int8 kernel takes a Linear, ``[out, in]``
    with one scale per output channel of *its* product:

        uk [H, r, nope] int8, uk_scale [H, r]      (W_UK^T per head)
        uv [H, v, r]    int8, uv_scale [H, v]      (W_UV per head)

    :meth:`absorb_query` / :meth:`absorb_output` run one kernel call per head (heads have different
    matrices; merging them into one GEMM would multiply by a block-diagonal matrix H times larger).
    ``weight`` is the dequantized ``[H*(nope+v), r]`` matrix in the original dtype, so the model's
    own forward (naive path, ``MLA.absorbed_weights`` for prompts) keeps working unchanged.
    """

    _kernel_buffers = ("uk", "uk_scale", "uv", "uv_scale")

    def __init__(self, linear: nn.Linear, n_heads: int, nope: int, v_dim: int):
        super().__init__()
        w = linear.weight.detach()
        if linear.bias is not None or w.shape[0] != n_heads * (nope + v_dim):
            raise ValueError(f"kv_b_proj {tuple(w.shape)} (bias {linear.bias is not None}) is not "
                             f"[{n_heads} heads x ({nope} + {v_dim}), r] without bias")
        self.n_heads, self.nope, self.v_dim, self.rank = n_heads, nope, v_dim, w.shape[1]
        self.in_features, self.out_features, self.dtype = linear.in_features, linear.out_features, w.dtype
        cd = kernel_dtype(w.device, w.dtype)
        per_head = w.view(n_heads, nope + v_dim, self.rank)
        uk = [quantize_int8(per_head[h, :nope].t()) for h in range(n_heads)]           # [r, nope] each
        uv = [quantize_int8(per_head[h, nope:]) for h in range(n_heads)]               # [v, r] each
        self.register_buffer("uk", torch.stack([q for q, _ in uk]).contiguous())         # [H, r, nope]
        self.register_buffer("uk_scale", torch.stack([s for _, s in uk]).to(cd))         # [H, r]
        self.register_buffer("uv", torch.stack([q for q, _ in uv]).contiguous())         # [H, v, r]
        self.register_buffer("uv_scale", torch.stack([s for _, s in uv]).to(cd))         # [H, v]

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized ``[H*(nope+v), r]`` weight in the original dtype (what the kernels apply)."""
        uk = dequantize_int8(self.uk, self.uk_scale).transpose(1, 2)                  # [H, nope, r]
        uv = dequantize_int8(self.uv, self.uv_scale)                                  # [H, v, r]
        return torch.cat([uk, uv], dim=1).reshape(self.out_features, self.rank).to(self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., r] -> [..., H*(nope+v)]
        return F.linear(x, self.weight.to(x.dtype))

    def absorb_query(self, q_nope: torch.Tensor) -> torch.Tensor:
        """``q_nope [N, H, nope] -> q_nope @ W_UK  [N, H, r]`` (q's dtype)."""
        a = q_nope.to(self.uk_scale.dtype)
        out = [torch.ops.aten._weight_int8pack_mm(a[:, h].contiguous(), self.uk[h], self.uk_scale[h])
               for h in range(self.n_heads)]                                          # H x [N, r]
        return torch.stack(out, dim=1).to(q_nope.dtype)

    def absorb_output(self, o_lat: torch.Tensor) -> torch.Tensor:
        """``o_lat [N, H, r] -> o_lat @ W_UV^T  [N, H, v]`` (o's dtype)."""
        a = o_lat.to(self.uv_scale.dtype)
        out = [torch.ops.aten._weight_int8pack_mm(a[:, h].contiguous(), self.uv[h], self.uv_scale[h])
               for h in range(self.n_heads)]                                          # H x [N, v]
        return torch.stack(out, dim=1).to(o_lat.dtype)

    def extra_repr(self) -> str:
        return f"heads={self.n_heads}, nope={self.nope}, v={self.v_dim}, rank={self.rank}, int8 (absorbed layouts)"


def _is_stacked_experts(module: nn.Module) -> bool:
    """An experts module holding stacked ``gate_proj``/``up_proj`` [E, I, D] and ``down_proj`` [E, D, I]
    (``RoutedExperts`` and the implementations that take over its Parameters)."""
    ts = [getattr(module, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
    return all(isinstance(t, torch.Tensor) and t.dim() == 3 for t in ts)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers, each storage counted once."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def quantize_weight_only(model: nn.Module, scheme: str, group_size: int = DEFAULT_GROUP_SIZE,
                         head: bool = False, latent: bool = False, activations: str = "float") -> dict:
    """Replace ``model``'s linear layers and routed experts by ``scheme`` (``int8`` | ``int4``) ones, in place.

    group_size: int4's input channels per scale (32, 64, 128 or 256). head: also quantize ``lm_head``.
    latent: also MLA's ``kv_b_proj``, as :class:`Int8AbsorbedProj` (int8 for either scheme).
    activations: of the int8 linear layers and experts (:data:`ACTIVATIONS`): ``"float"`` keeps them
    weight-only; ``"int8"`` also rounds their inputs to 7 bits per call (fbgemm; faster on AVX2, about
    twice the error; int4 layers and ``Int8AbsorbedProj`` stay weight-only).
    The model must be on the CPU (the kernels are torch's CPU ones) and is meant for inference only
    (the new layers hold buffers, not Parameters). Returns a summary: the scheme, the replaced module
    names by kind, int4 layers that fell back to int8 (with the reason) and the weight bytes before
    and after.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"quantize={scheme!r}: must be one of {', '.join(SCHEMES)}")
    if scheme == "int4":
        why = check_int4_shape(16, group_size, group_size)
        if why:
            raise ValueError(f"int4 group_size={group_size}: {why}")
    check_activations(activations)
    params = list(model.parameters())
    if params and params[0].device.type != "cpu":
        raise ValueError(f"weight-only {scheme} runs torch's CPU kernels; the model is on {params[0].device}")
    before = weight_bytes(model)
    summary: dict = {"scheme": scheme, "group_size": group_size if scheme == "int4" else None, "head": head,
                     "latent": latent, "activations": activations, "linear": [], "experts": [], "int8_fallback": {}, "kept": []}
    with torch.no_grad():
        for name, module in list(model.named_modules()):
            if not name:
                continue
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            if type(module) is nn.Linear and child == "kv_b_proj" and latent and isinstance(parent, MLA):
                new, why = Int8AbsorbedProj(module, parent.n_heads, parent.nope, parent.v_dim), None
                summary["linear"].append(name)
            elif type(module) is nn.Linear:
                if child in KEEP_LINEARS or (name == "lm_head" and not head):
                    summary["kept"].append(name)
                    continue
                new, why = _linear(module, scheme, group_size, activations)
                summary["linear"].append(name)
            elif _is_stacked_experts(module):
                new, why = _experts(module, scheme, group_size, activations)
                summary["experts"].append(name)
            else:
                continue
            if why:
                summary["int8_fallback"][name] = why
            setattr(parent, child, new)
    summary["bytes_before"], summary["bytes_after"] = before, weight_bytes(model)
    return summary


def _linear(linear: nn.Linear, scheme: str, group_size: int, activations: str) -> tuple[nn.Module, str | None]:
    if scheme == "int4":
        why = check_int4_shape(linear.out_features, linear.in_features, group_size)
        if why is None:
            return Int4Linear(linear, group_size), None
        return Int8Linear(linear, activations), why
    return Int8Linear(linear, activations), None


def _experts(experts: nn.Module, scheme: str, group_size: int, activations: str) -> tuple[nn.Module, str | None]:
    if scheme == "int4":
        E, inter, hidden = experts.gate_proj.shape
        why = check_int4_shape(2 * inter, hidden, group_size) or check_int4_shape(hidden, inter, group_size)
        if why is None:
            return Int4Experts(experts, group_size), None
        return Int8Experts(experts, activations), why
    return Int8Experts(experts, activations), None
