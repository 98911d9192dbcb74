"""Integer weight formats for weight-only quantized decoding, and the torch kernels that multiply them.

Two formats, each exactly what one of torch's CPU kernels consumes (no repacking per call):

int8, symmetric per output channel (``torch.ops.aten._weight_int8pack_mm``)
    q [N, K] int8 in [-127, 127], scale [N];      W[n, k] ~ q[n, k] * scale[n]
    scale = max_k |W[n, k]| / 127.

int4, asymmetric per group of ``g`` input channels (``torch.ops.aten._weight_int4pack_mm_for_cpu``)
    q [N, K] in [0, 15], scale, zero [N, K/g];    W[n, k] ~ (q[n, k] - 8) * scale[n, k//g] + zero[n, k//g]
    scale = (max - min) / 15 over the group, zero = min + 8 * scale (so q = 0 is the group's min).
    The kernel takes q packed two per byte (``_convert_weight_to_int4pack_for_cpu``: [N, K/2] uint8)
    and ``scale_and_zeros [K/g, N, 2]``; it needs N % 16 == 0 and g in {32, 64, 128, 256}.

Scales and zeros are rounded to bf16 *before* q is computed: on x86 the kernels run their vectorized
code only for bf16 activations (fp32 takes a scalar loop, ~7x slower, measured in
docs/engine-performance.md), with scales in the activations' dtype. Rounding first keeps the
integer codes consistent with the scales the kernel multiplies by, and makes the fp32 dequantized
weight (:func:`dequantize_int8` / :func:`dequantize_int4`) exactly the matrix the kernel applies.

:func:`kernel_dtype` is the activation dtype the kernels are fast in on a device; the ``*_linear``
functions cast to it and back.
"""

from __future__ import annotations

import platform
import weakref

import torch

INT8_MAX = 127
INT4_GROUP_SIZES = (32, 64, 128, 256)
INT4_N_MULTIPLE = 16       # _convert_weight_to_int4pack_for_cpu: "expect N to be dividable by 16"
_TINY = 1e-12              # floor of a scale, so an all-zero row or group quantizes to zeros, not NaN


def kernel_dtype(device: torch.device | str, x_dtype: torch.dtype) -> torch.dtype:
    """The activation dtype torch's weight-only CPU kernels run vectorized code for.

    x86 (AVX2 and AVX-512 alike): bf16 only; fp32 and fp16 fall back to a scalar loop. aarch64:
    NEON code for fp32, fp16 and bf16, so the activations stay as they are.
    """
    dev = torch.device(device)
    if dev.type != "cpu":
        raise ValueError(f"weight-only int8/int4 layers run torch's CPU kernels; the tensors are on {dev}")
    if platform.machine().lower() in ("aarch64", "arm64"):
        return x_dtype
    return torch.bfloat16


def _bf16_representable(t: torch.Tensor) -> torch.Tensor:
    """``t`` rounded to the nearest bf16 value, kept in fp32."""
    return t.to(torch.bfloat16).float()


# --------------------------------------------------------------------------------------------- int8
def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W [N, K] (any float dtype) -> (q [N, K] int8, scale [N] fp32, bf16-representable)."""
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"int8 quantization needs a 2-D floating-point weight, got {tuple(w.shape)} {w.dtype}")
    w = w.detach().float()
    scale = _bf16_representable((w.abs().amax(dim=1) / INT8_MAX).clamp_min(_TINY))          # [N]
    # bf16 rounding may have moved the scale down a little: clamp the few codes that overshoot.
    q = (w / scale[:, None]).round_().clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)          # [N, K]
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(q [..., N, K] int8, scale [..., N]) -> W [..., N, K] in ``dtype``."""
    return (q.float() * scale.float()[..., None]).to(dtype)


def int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [..., K] @ (q * scale)^T (+ bias)`` -> ``[..., N]`` in x's dtype.

    ``scale`` must already be in :func:`kernel_dtype` (the kernel takes it in the activations'
    dtype; a cast here would be a new tensor every call, and under torch.compile a pointwise node
    that inductor's lowering of the kernel does not accept).
    """
    if x.shape[-1] != q.shape[1]:
        raise ValueError(f"input has {x.shape[-1]} features, the int8 weight {tuple(q.shape)} expects {q.shape[1]}")
    lead = x.shape[:-1]
    cd = scale.dtype
    a = x.reshape(-1, x.shape[-1]).to(cd).contiguous()                     # [M, K]; the kernel reads rows densely
    y = torch.ops.aten._weight_int8pack_mm(a, q, scale).to(x.dtype)        # [M, N]
    if bias is not None:                      # added in x's dtype, not in the kernel's (bf16 would round it)
        y = y + bias.to(y.dtype)
    return y.view(*lead, q.shape[0])


# ------------------------------------------------------------------- int8 with dynamic int8 activations
def fbgemm_available() -> bool:
    """Whether torch was built with fbgemm (x86), the engine of :func:`int8_dynamic_linear`."""
    return "fbgemm" in torch.backends.quantized.supported_engines


def pack_int8_dynamic(q: torch.Tensor, scale: torch.Tensor) -> torch.ScriptObject:
    """(q [N, K] int8, scale [N]) -> fbgemm's prepacked weight (its own copy of the codes, in its blocked
    layout). The dequantized weight is exactly ``q * scale``.

    torch 2.13 warns that its quantized tensor types (the qint8 tensor fbgemm packs from) are deprecated
    (pytorch issue 184982): this path is opt-in for that reason too, and goes when they do."""
    if not fbgemm_available():
        raise RuntimeError("int8 activations need torch's fbgemm engine (x86 builds); this torch has "
                           f"{torch.backends.quantized.supported_engines}")
    torch.backends.quantized.engine = "fbgemm"
    s = scale.double()
    qw = torch._make_per_channel_quantized_tensor(q.contiguous(), s, torch.zeros_like(s, dtype=torch.long), 0)
    return torch.ops.quantized.linear_prepack(qw, None)


# (data_ptr of q, index) -> (weakref to q, packed). The packed weights live beside the int8 buffer they
# were made from, not in the module: a torchbind object cannot be a custom op's argument, and this
# keeps torch.compile's graph to plain tensors. q is the module's buffer itself (for stacked experts
# [E, N, K], ``index`` is the expert); a dead weakref means the address may have been reused, so repack.
_PACKED: dict[tuple[int, int], tuple[weakref.ref, torch.ScriptObject]] = {}


def packed_int8(q: torch.Tensor, scale: torch.Tensor, index: int = -1) -> torch.ScriptObject:
    """fbgemm's packed weight of ``q [N, K]`` (index -1) or of ``q[index]`` for stacked ``q [E, N, K]``,
    packed once while ``q`` lives."""
    key = (q.data_ptr(), index)
    hit = _PACKED.get(key)
    if hit is None or hit[0]() is None:
        for k in [k for k, (r, _) in _PACKED.items() if r() is None]:     # drop entries of freed weights
            del _PACKED[k]
        w, s = (q, scale) if index < 0 else (q[index], scale[index])
        hit = _PACKED[key] = (weakref.ref(q), pack_int8_dynamic(w, s))
    return hit[1]


@torch.library.custom_op("dsv3::int8_dynamic_mm", mutates_args=())
def int8_dynamic_mm(a: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``a [M, K] fp32 @ (q [N, K] int8 * scale [N])^T -> [M, N] fp32``, ``a`` quantized on the fly.

    fbgemm's dynamic linear rounds the activations to 7-bit unsigned integers with one scale and zero
    point for all M rows (``reduce_range``: AVX2 without VNNI multiplies u8 x s8 pairs into int16,
    which 8-bit activations could overflow), multiplies them by the int8 codes with integer dot
    products (int32 accumulation) and rescales in fp32. Its error is the weight's int8 rounding plus
    the activations' 7-bit rounding (benchmarks/int8_gemv_cpu.py: about twice weight-only's).
    """
    return torch.ops.quantized.linear_dynamic(a.float().contiguous(), packed_int8(q, scale), True)


@int8_dynamic_mm.register_fake
def _(a, q, scale):
    return a.new_empty(a.shape[0], q.shape[0], dtype=torch.float32)


def int8_dynamic_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                        bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [..., K] @ (q * scale)^T (+ bias)`` with int8 activations (:func:`int8_dynamic_mm`) -> ``[..., N]``
    in x's dtype. fbgemm packs ``q`` on the first call and keeps it while ``q`` lives."""
    if x.shape[-1] != q.shape[1]:
        raise ValueError(f"input has {x.shape[-1]} features, the int8 weight {tuple(q.shape)} expects {q.shape[1]}")
    lead = x.shape[:-1]
    y = torch.ops.dsv3.int8_dynamic_mm(x.reshape(-1, x.shape[-1]), q, scale).to(x.dtype)   # [M, N]
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.view(*lead, q.shape[0])


# --------------------------------------------------------------------------------------------- int4
def check_int4_shape(n: int, k: int, group_size: int) -> str | None:
    """Why an ``[n, k]`` weight cannot be int4 with ``group_size`` (None when it can)."""
    if group_size not in INT4_GROUP_SIZES:
        return f"group size {group_size} not in {INT4_GROUP_SIZES}"
    if k % group_size:
        return f"{k} input features are not a multiple of the group size {group_size}"
    if n % INT4_N_MULTIPLE:
        return f"{n} output features are not a multiple of {INT4_N_MULTIPLE} (the CPU kernel's packing)"
    return None


def quantize_int4(w: torch.Tensor, group_size: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W [N, K] -> (q [N, K] int32 in [0, 15], scale [N, K/g], zero [N, K/g]), fp32 bf16-representable."""
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"int4 quantization needs a 2-D floating-point weight, got {tuple(w.shape)} {w.dtype}")
    why = check_int4_shape(*w.shape, group_size)
    if why:
        raise ValueError(f"cannot quantize a {tuple(w.shape)} weight to int4: {why}")
    N, K = w.shape
    g = w.detach().float().view(N, K // group_size, group_size)                              # [N, G, g]
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)                                                   # [N, G]
    scale = _bf16_representable(((hi - lo) / 15).clamp_min(_TINY))
    zero = _bf16_representable(lo + 8 * scale)
    q = ((g - zero[..., None]) / scale[..., None] + 8).round_().clamp_(0, 15).to(torch.int32)
    return q.view(N, K), scale, zero


def dequantize_int4(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(q [..., N, K] in [0, 15], scale/zero [..., N, K/g]) -> W [..., N, K] in ``dtype``."""
    g = q.shape[-1] // scale.shape[-1]
    s = scale.float().repeat_interleave(g, dim=-1)
    z = zero.float().repeat_interleave(g, dim=-1)
    return ((q.float() - 8) * s + z).to(dtype)


def pack_int4(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
              dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's layout: (packed [N, K/2] uint8, scale_and_zeros [K/g, N, 2] in ``dtype``)."""
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)
    sz = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(dtype)          # [G, N, 2]
    return packed, sz


def int4_linear(x: torch.Tensor, packed: torch.Tensor, scale_and_zeros: torch.Tensor, group_size: int,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [..., K] @ dequant(W)^T (+ bias)`` for W in :func:`pack_int4`'s layout -> ``[..., N]`` in x's dtype.

    ``scale_and_zeros`` must already be in :func:`kernel_dtype` (see :func:`int8_linear`).
    """
    n, k = packed.shape[0], packed.shape[1] * 2
    if x.shape[-1] != k:
        raise ValueError(f"input has {x.shape[-1]} features, the int4 weight ({n} x {k}) expects {k}")
    lead = x.shape[:-1]
    cd = scale_and_zeros.dtype
    a = x.reshape(-1, k).to(cd).contiguous()                                                    # [M, K]
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(a, packed, group_size, scale_and_zeros).to(x.dtype)  # [M, N]
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.view(*lead, n)


# --------------------------------------------------------------------------------------------- storage
class KernelFormatBuffers(torch.nn.Module):
    """Base of modules whose buffers are in a kernel's format: ``model.to(dtype)`` / ``.float()`` /
    ``.half()`` leave them as they are (only the device follows).

    ``nn.Module.to(dtype)`` casts every floating-point buffer, which would turn the bf16 scales the
    kernels require into fp32 ones (and the kernels would then refuse them). Subclasses list the
    buffers in ``_kernel_buffers``.
    """

    _kernel_buffers: tuple[str, ...] = ()

    def _apply(self, fn, recurse=True):
        kept = {name: self._buffers.pop(name) for name in self._kernel_buffers if name in self._buffers}
        super()._apply(fn, recurse)
        for name, t in kept.items():
            device = fn(torch.empty(0, device=t.device)).device     # where fn sends tensors
            self._buffers[name] = torch.empty_like(t, device=device) if t.is_meta else t.to(device)
        return self
