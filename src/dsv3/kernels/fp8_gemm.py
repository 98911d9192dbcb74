"""Block-scaled FP8 GEMM: ``out = A @ B^T`` with E4M3 operands and fp32 accumulation per K chunk.

Operands (the layout of DeepSeek-V3's inference and training kernels):
  A [M, K]  float8_e4m3fn, scales ``a_scale [M, ceil(K/tile)]``: one per row per ``tile`` columns
            (activations: one scale per token per 128 channels).
  B [N, K]  float8_e4m3fn, scales ``b_scale [ceil(N/bn), ceil(K/tile)]`` for ``bn x tile`` blocks:
            bn = 128 for weights (128x128 blocks), bn = 1 when B is itself a tiled activation or
            gradient (the weight-gradient GEMM of FP8 training).
Each K chunk of ``tile`` columns contributes ``(A_c @ B_c^T) * a_scale[:, c] * b_scale[n, c]``; the
chunk products are exact (E4M3 x E4M3 fits fp32) and summed in fp32, and the chunk results are added
in fp32 -- the "promote to fp32 every 128 along K" rule of the V3 report (§3.3.2).

:func:`fp8_gemm` is the one entry point. Backends:
  ``reference``  pure PyTorch, any device; exact emulation of the above (CPU default).
  ``scaled_mm``  ``torch.nn.functional.scaled_mm`` / ``torch._scaled_mm`` with 1x128 / 128x128
                 block scales (cuBLAS, sm90, CUDA >= 12.9).
  ``triton``     a Triton kernel doing the same chunk loop on tensor cores.
On CUDA, ``auto`` uses the first fast backend that passes a one-time check against the reference,
and the reference otherwise.
"""

from __future__ import annotations

import math

import torch

from ..fp8 import DEFAULT_TILE, FP8_DTYPE

BACKENDS = ("auto", "reference", "scaled_mm", "triton")
# Relative error (Frobenius) a fast backend may show against the reference in its self-check: both
# accumulate in fp32, so only summation order and the bf16 output rounding differ.
SELF_CHECK_RTOL = 1e-2


def _check(a, a_scale, b, b_scale, tile: int, bn: int) -> tuple[int, int, int, int]:
    if a.dtype != FP8_DTYPE or b.dtype != FP8_DTYPE:
        raise TypeError(f"fp8_gemm needs float8_e4m3fn operands, got {a.dtype} and {b.dtype}")
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"fp8_gemm computes A[M,K] @ B[N,K]^T, got A {tuple(a.shape)} and B {tuple(b.shape)}")
    M, K = a.shape
    N = b.shape[0]
    C = math.ceil(K / tile)
    if tuple(a_scale.shape) != (M, C):
        raise ValueError(f"a_scale has shape {tuple(a_scale.shape)}, expected {(M, C)} (1x{tile} tiles of A {(M, K)})")
    if tuple(b_scale.shape) != (math.ceil(N / bn), C):
        raise ValueError(f"b_scale has shape {tuple(b_scale.shape)}, expected {(math.ceil(N / bn), C)} "
                         f"({bn}x{tile} blocks of B {(N, K)})")
    return M, N, K, C


def fp8_gemm_reference(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                       tile: int = DEFAULT_TILE, bn: int = 128, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The pure-PyTorch definition: A [M,K] @ B [N,K]^T -> [M,N] ``out_dtype`` (see the module docstring)."""
    M, N, K, C = _check(a, a_scale, b, b_scale, tile, bn)
    af, bf = a.float(), b.float()                              # E4M3 -> fp32 is exact
    b_rows = b_scale.float().repeat_interleave(bn, dim=0)[:N]  # [N, C]: each row's scale per chunk
    acc = torch.zeros(M, N, dtype=torch.float32, device=a.device)
    for c in range(C):
        k = slice(c * tile, min((c + 1) * tile, K))
        partial = af[:, k] @ bf[:, k].T                         # [M, N] fp32 sum of exact products
        acc += partial * a_scale[:, c : c + 1].float() * b_rows[:, c]
    return acc.to(out_dtype)


# --------------------------------------------------------------------------------------------- scaled_mm
def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def fp8_gemm_scaled_mm(a, a_scale, b, b_scale, tile: int = DEFAULT_TILE, bn: int = 128,
                       out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """cuBLAS block-scaled FP8 GEMM through torch's ``scaled_mm`` (1x128 A scales, 128x128 or 1x128 B scales).

    cuBLAS wants K a multiple of 128 and whole 128-row weight blocks; partial edges are zero-padded
    here (V3's 576-row ``kv_a_proj_with_mqa`` becomes 640 rows for the call). Scales go in the
    layouts torch's own tests use: A's ``[M, K/128]`` column-major; B's 1x128 ``[N, K/128]``
    column-major; B's 128x128 as the transpose of a row-major ``[N/128, round_up(K/128, 4)]``.
    """
    M, N, K, C = _check(a, a_scale, b, b_scale, tile, bn)
    if tile != 128 or bn not in (1, 128):
        raise ValueError(f"scaled_mm supports 1x128 and 128x128 scales only, got tile={tile}, bn={bn}")
    a, b = a.contiguous(), b.contiguous()   # cuBLAS: A row-major, B (passed as B^T) column-major
    Kp = C * 128
    if Kp != K:
        a = torch.nn.functional.pad(a.view(torch.uint8), (0, Kp - K)).view(FP8_DTYPE)
        b = torch.nn.functional.pad(b.view(torch.uint8), (0, Kp - K)).view(FP8_DTYPE)
    Np = _round_up(N, 128) if bn == 128 else _round_up(N, 16)
    if Np != N:
        b = torch.nn.functional.pad(b.view(torch.uint8), (0, 0, 0, Np - N)).view(FP8_DTYPE)
        if bn == 1:
            b_scale = torch.nn.functional.pad(b_scale, (0, 0, 0, Np - N), value=1.0)
    Mp = _round_up(M, 16)
    if Mp != M:
        a = torch.nn.functional.pad(a.view(torch.uint8), (0, 0, 0, Mp - M)).view(FP8_DTYPE)
        a_scale = torch.nn.functional.pad(a_scale, (0, 0, 0, Mp - M), value=1.0)
    sa = a_scale.float().t().contiguous().t()                          # [Mp, C], column-major
    if bn == 128:
        L4 = _round_up(C, 4)
        sb = torch.nn.functional.pad(b_scale.float(), (0, L4 - C), value=1.0).contiguous().t()  # [L4, Np/128]
    else:
        sb = b_scale.float().t().contiguous().t()                      # [Np, C], column-major
    bt = b.t()                                                         # [Kp, Np], column-major
    F = torch.nn.functional
    if hasattr(F, "scaled_mm") and hasattr(F, "ScalingType"):
        ST = F.ScalingType
        out = F.scaled_mm(a, bt, sa, ST.BlockWise1x128, sb, ST.BlockWise128x128 if bn == 128 else ST.BlockWise1x128,
                          output_dtype=out_dtype)
    else:
        out = torch._scaled_mm(a, bt, scale_a=sa, scale_b=sb, out_dtype=out_dtype)
    return out[:M, :N]


# --------------------------------------------------------------------------------------------- Triton
_triton_kernel = None


def _build_triton_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(a_ptr, b_ptr, c_ptr, as_ptr, bs_ptr, M, N, K, C, BN_SCALE,
               stride_am, stride_bn, stride_cm, stride_asm, stride_bsn,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TILE: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, TILE)
        m_ok = rm < M
        n_ok = rn < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for c in range(0, C):
            k = c * TILE + rk
            k_ok = k < K
            a = tl.load(a_ptr + rm[:, None] * stride_am + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_ptr + rn[:, None] * stride_bn + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            sa = tl.load(as_ptr + rm * stride_asm + c, mask=m_ok, other=0.0)                 # [BLOCK_M]
            sb = tl.load(bs_ptr + (rn // BN_SCALE) * stride_bsn + c, mask=n_ok, other=0.0)   # [BLOCK_N]
            # One K chunk on the tensor cores, then promoted into the fp32 accumulator with its scales.
            part = tl.dot(a, tl.trans(b), out_dtype=tl.float32)
            acc += part * sa[:, None] * sb[None, :]
        tl.store(c_ptr + rm[:, None] * stride_cm + rn[None, :], acc.to(c_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])

    return kernel


def fp8_gemm_triton(a, a_scale, b, b_scale, tile: int = DEFAULT_TILE, bn: int = 128,
                    out_dtype: torch.dtype = torch.bfloat16, block_m: int = 64, block_n: int = 128) -> torch.Tensor:
    """The chunk loop of :func:`fp8_gemm_reference` as a Triton kernel (CUDA only; partial edges masked)."""
    global _triton_kernel
    M, N, K, C = _check(a, a_scale, b, b_scale, tile, bn)
    if tile < 16 or tile & (tile - 1):
        raise ValueError(f"the Triton kernel needs a power-of-two tile >= 16, got {tile}")
    if _triton_kernel is None:
        _triton_kernel = _build_triton_kernel()
    a, b = a.contiguous(), b.contiguous()
    a_scale, b_scale = a_scale.float().contiguous(), b_scale.float().contiguous()
    out = torch.empty(M, N, dtype=out_dtype, device=a.device)
    grid = (math.ceil(M / block_m), math.ceil(N / block_n))
    _triton_kernel[grid](a, b, out, a_scale, b_scale, M, N, K, C, bn,
                         a.stride(0), b.stride(0), out.stride(0), a_scale.stride(0), b_scale.stride(0),
                         BLOCK_M=block_m, BLOCK_N=block_n, TILE=tile)
    return out


# --------------------------------------------------------------------------------------------- dispatch
_FAST = {"scaled_mm": fp8_gemm_scaled_mm, "triton": fp8_gemm_triton}
_verdicts: dict[tuple, bool] = {}   # (backend, tile, bn, out_dtype) -> passed its self-check


def _self_check(name: str, tile: int, bn: int, out_dtype: torch.dtype, device: torch.device) -> bool:
    """Run ``name`` once on a random problem with partial edges and compare it with the reference."""
    key = (name, tile, bn, out_dtype)
    if key not in _verdicts:
        from ..fp8 import quantize_blockwise, quantize_tiles
        g = torch.Generator(device="cpu").manual_seed(0)
        M, N, K = 50, 3 * 128 + 64, 4 * tile
        a, sa = quantize_tiles(torch.randn(M, K, generator=g).to(device), tile)
        w = torch.randn(N, K, generator=g).to(device)
        b, sb = quantize_blockwise(w, (bn, tile)) if bn > 1 else quantize_tiles(w, tile)
        try:
            got = _FAST[name](a, sa, b, sb, tile, bn, out_dtype=out_dtype).float()
            ref = fp8_gemm_reference(a, sa, b, sb, tile, bn)
            ok = bool(((got - ref).norm() / ref.norm()) < SELF_CHECK_RTOL)
        except Exception:  # not supported by this torch / GPU / driver: fall through to the next one
            ok = False
        _verdicts[key] = ok
    return _verdicts[key]


def select_backend(device: torch.device, tile: int = DEFAULT_TILE, bn: int = 128,
                   out_dtype: torch.dtype = torch.bfloat16) -> str:
    """The backend ``auto`` picks on ``device``: a fast one that passed its check, else ``reference``."""
    if torch.device(device).type != "cuda":
        return "reference"
    for name in _FAST:
        if _self_check(name, tile, bn, out_dtype, torch.device(device)):
            return name
    return "reference"


def fp8_gemm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
             tile: int = DEFAULT_TILE, bn: int = 128, out_dtype: torch.dtype = torch.bfloat16,
             backend: str = "auto") -> torch.Tensor:
    """``A [M,K] @ B [N,K]^T -> [M,N]`` from E4M3 operands with block scales, accumulated in fp32.

    a_scale ``[M, ceil(K/tile)]`` (1 x tile), b_scale ``[ceil(N/bn), ceil(K/tile)]`` (bn x tile blocks).
    backend: one of :data:`BACKENDS`; ``auto`` is the reference on CPU and the fastest checked
    backend on CUDA.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: must be one of {BACKENDS}")
    if backend == "auto":
        backend = select_backend(a.device, tile, bn, out_dtype)
    if backend == "reference":
        return fp8_gemm_reference(a, a_scale, b, b_scale, tile, bn, out_dtype)
    if a.device.type != "cuda":
        raise ValueError(f"backend={backend!r} runs on CUDA only, the operands are on {a.device}")
    return _FAST[backend](a, a_scale, b, b_scale, tile, bn, out_dtype=out_dtype)
