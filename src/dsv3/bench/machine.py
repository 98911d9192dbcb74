"""What every benchmark shares: the device it runs on, its thread count, wall-clock timing, and a
record of the machine.

- :func:`resolve_device` (checked usable), :func:`torch_threads` (a thread count for a block,
  restored after), :func:`sync` (wait for queued device work before reading a clock);
- :func:`machine_info`: one JSON-ready dict for a result -- the host (CPU model, the cores this
  process may use, threads, torch / transformers / Python versions, date, load average), plus
  :func:`cpu_info`: the flags that select kernels, torch's CPU capability, the bf16 units
  (:func:`dsv3.cpu.cpu_features`) and the last-level cache size (which sizes the bandwidth probe).

The flags matter for comparing CPU engines: bf16 GEMMs are fast only with AVX512-BF16 or AMX, and
llama.cpp, oneDNN and vLLM's CPU backend each pick their kernels from them. Cache sizes come from
sysfs (Linux); elsewhere they are ``None`` rather than errors.
"""

from __future__ import annotations

import datetime
import os
import platform
from contextlib import contextmanager
from pathlib import Path

import torch

from .. import device as dsv3_device

_SYSFS_CPU = Path("/sys/devices/system/cpu")


def parse_size(text: str) -> int:
    """A sysfs / lscpu cache size (``32768K``, ``1M``, ``512 KiB``, ``2097152``) in bytes."""
    t = text.strip().upper().replace("IB", "").replace(" ", "")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(t[-1:], 1)
    digits = t[:-1] if t[-1:] in "KMG" else t
    try:
        return int(float(digits) * scale)
    except ValueError:
        raise ValueError(f"not a cache size: {text!r}") from None


def l3_cache_bytes(sysfs: Path = _SYSFS_CPU) -> int | None:
    """Total last-level (L3) cache of the machine in bytes: the sum over distinct L3 instances.

    Each instance is listed once per CPU that shares it (``shared_cpu_list``); an EPYC has one per
    core complex, so one CPU's entry alone would undercount. Falls back to glibc's
    ``SC_LEVEL3_CACHE_SIZE`` (one instance); ``None`` when neither is known.
    """
    seen: dict[str, int] = {}
    for cache in sysfs.glob("cpu[0-9]*/cache/index[0-9]*"):
        try:
            if (cache / "level").read_text().strip() != "3":
                continue
            shared = (cache / "shared_cpu_list").read_text().strip()
            seen.setdefault(shared, parse_size((cache / "size").read_text()))
        except (OSError, ValueError):
            continue
    if seen:
        return sum(seen.values())
    try:
        size = os.sysconf("SC_LEVEL3_CACHE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
    return size if size > 0 else None


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (runnable processes), or ``None`` where unknown."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def cpu_info() -> dict:
    """CPU model, its kernel-selecting flags and torch's CPU capability (:func:`dsv3.cpu.cpu_features`),
    plus the L3 size and the cores this process may use."""
    from ..cpu import cpu_features

    f = cpu_features()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "cpu_model": f["model"],
        "cpu_arch": f["arch"],
        "cpu_flags": f["flags"],
        "bf16_units": f["bf16_units"],
        "torch_cpu_capability": f["torch_cpu_capability"],
        "l3_cache_bytes": l3_cache_bytes(),
        "usable_cores": usable,
    }


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU), so wall-clock times cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The benchmark device (default: cuda if available), checked usable; ValueError otherwise."""
    try:
        dev = dsv3_device.resolve_device(device)
        torch.empty(0, device=dev)
    except (RuntimeError, AssertionError) as e:
        raise ValueError(f"device {device!r}: {e}") from None
    return dev


@contextmanager
def torch_threads(threads: int | None):
    """Run with ``threads`` intra-op threads (None: unchanged), restoring the process-wide setting."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def machine_info(threads: int, device: torch.device) -> dict:
    """What the numbers were measured on: host, versions, date and load, and :func:`cpu_info`."""
    info = {
        **cpu_info(),
        "cpu": cpu_info()["cpu_model"] or platform.processor() or "unknown",
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "device": str(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    load = load_average()
    if load is not None:
        info["load_avg_1m"] = load[0]   # other processes competing for the cores
    return info
