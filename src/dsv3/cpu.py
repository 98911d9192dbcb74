"""What this CPU computes fast, so that precisions are chosen where the code runs.

The machine changes from session to session (an AVX2 EPYC without bf16 units one day, a Xeon with
AVX512-BF16 and AMX the next), and the fastest decode precision changes with it:

- without bf16 units (AVX2, plain AVX-512) a bf16 GEMM converts every value to fp32 first: on the
  project's AVX2 EPYC a bf16 ``F.linear`` of 8 rows is ~3x *slower* than fp32 (docs/engine-performance.md);
- with AVX512-BF16 / AMX the GEMMs are fast, but torch's plain bf16 GEMV (1 row, a decode step)
  was measured streaming 5.4 GB/s against fp32's 8.2 GB/s on such a Xeon (issue 14), so having the
  units is not enough: :func:`auto_dtype` also times the two on this machine before picking bf16.

:func:`cpu_features` is the one probe (CPU model, the flags that select kernels, torch's dispatch
level, the bf16 units); the benchmarks record it in their JSON and ``dtype="auto"`` decides from it.
Everything reads ``/proc/cpuinfo`` (Linux); elsewhere the flags are empty and the answer is fp32.
"""

from __future__ import annotations

import functools
import platform
import time

import torch

# The instruction-set extensions that give bf16 arithmetic units (not just bf16 loads/converts).
BF16_UNIT_FLAGS = ("amx_bf16", "avx512_bf16")
# Flags worth recording next to a measurement: they select torch's / oneDNN's CPU kernels.
RECORDED_FLAGS = ("avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16",
                  "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")
# auto_dtype picks bf16 only when it beats fp32 by this factor (timings of a few ms are noisy).
BF16_MARGIN = 1.05


def _cpuinfo(path: str = "/proc/cpuinfo") -> tuple[str | None, str | None, frozenset[str]]:
    """(model name, vendor, flags) of the first processor listed in ``path``; Nones and {} when unreadable."""
    model = vendor = None
    flags: frozenset[str] = frozenset()
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if not line.strip() and (model or flags):
                    break                                           # end of the first processor's block
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model is None:
                    model = value.strip()
                elif key == "vendor_id" and vendor is None:
                    vendor = value.strip()
                elif key in ("flags", "Features") and not flags:   # x86 / aarch64 spelling
                    flags = frozenset(value.split())
    except OSError:
        pass
    return model, vendor, flags


@functools.lru_cache(maxsize=None)
def cpu_features(cpuinfo: str = "/proc/cpuinfo") -> dict:
    """This CPU: ``{"model", "vendor", "arch", "torch_cpu_capability", "flags" {name: bool}, "bf16_units" [..]}``.

    ``torch_cpu_capability`` is the level ATen's vectorized kernels dispatch to (``AVX2``, ``AVX512``,
    ...), which can be lower than the flags allow; ``bf16_units`` lists the :data:`BF16_UNIT_FLAGS`
    present (empty: bf16 math is emulated through fp32). Cached: the CPU does not change under a process.
    """
    model, vendor, flags = _cpuinfo(cpuinfo)
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        capability = None
    return {
        "model": model or platform.processor() or None,
        "vendor": vendor,
        "arch": platform.machine(),
        "torch_cpu_capability": capability,
        "flags": {name: name in flags for name in RECORDED_FLAGS},
        "bf16_units": [name for name in BF16_UNIT_FLAGS if name in flags],
    }


def has_bf16_units() -> bool:
    """Whether this CPU has bf16 arithmetic (AMX-BF16 or AVX512-BF16) and torch dispatches to AVX-512."""
    f = cpu_features()
    return bool(f["bf16_units"]) and str(f["torch_cpu_capability"] or "").upper().startswith("AVX512")


def _best_ms(fn, repeats: int = 5) -> float:
    fn()                                                   # first call: allocation, kernel selection
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return 1e3 * best


@functools.lru_cache(maxsize=None)
def bf16_decode_speedup(hidden: int = 2048, rows: tuple[int, ...] = (1, 8)) -> float:
    """fp32 time / bf16 time of decode-shaped GEMMs (``rows`` x ``hidden`` times a weight of
    ``4 * hidden`` x ``hidden``, larger than a core's L2 so it streams as a decode step does), the
    worst over ``rows``. > 1: bf16 is faster here. About 0.1 s; cached per process."""
    torch.manual_seed(0)
    w = torch.randn(4 * hidden, hidden) * 0.02
    wb = w.to(torch.bfloat16)
    worst = float("inf")
    with torch.inference_mode():
        for m in rows:
            x = torch.randn(m, hidden)
            xb = x.to(torch.bfloat16)
            fp32 = _best_ms(lambda: torch.nn.functional.linear(x, w))
            bf16 = _best_ms(lambda: torch.nn.functional.linear(xb, wb))
            worst = min(worst, fp32 / bf16)
    return worst


def auto_dtype(device: str | torch.device | None = None) -> torch.dtype:
    """The decode dtype ``dtype="auto"`` means on ``device``.

    CPU: bfloat16 where the CPU has bf16 units (:func:`has_bf16_units`) *and* bf16 decode GEMMs
    measure at least :data:`BF16_MARGIN` x faster than fp32 here (:func:`bf16_decode_speedup`);
    float32 everywhere else, so a CPU without bf16 units is never slowed down. CUDA: bfloat16 where
    the GPU supports it (tensor cores), else float32.
    """
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if dev.type != "cpu" or not has_bf16_units():
        return torch.float32
    return torch.bfloat16 if bf16_decode_speedup() >= BF16_MARGIN else torch.float32


def resolve_dtype(dtype: torch.dtype | str | None, device: str | torch.device | None = None) -> torch.dtype | None:
    """``"auto"`` -> :func:`auto_dtype`; a name (``"bfloat16"``, ``"float32"``, ...) -> that torch dtype;
    a torch dtype or None as given. ValueError for anything else."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return auto_dtype(device)
    dt = getattr(torch, str(dtype), None)
    if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
        raise ValueError(f"dtype={dtype!r}: expected 'auto', 'float32', 'bfloat16' or 'float16'")
    return dt
