"""The memory roofline of a decode step: the bytes it must read, and the bandwidth to read them with.

A decode step of a small batch is memory bound: every weight it uses is read once per step (the
activations are a few KB), so ``step time >= bytes per step / memory bandwidth``. The fraction of
that bound an engine reaches is ``bytes per step / (bandwidth * step time)``.

Bytes per step, counted at the precision each tensor is stored in (fp32, bf16, int8 + scales, FP8):

- every weight of the main model except the embedding table and the routed experts: attention,
  dense MLPs, shared experts, routers, norms and the ``lm_head`` (all read for any batch);
- ``batch`` rows of the embedding table;
- the routed experts the batch touches: per MoE layer, each of the ``B`` tokens picks ``k`` of the
  ``E`` experts; under uniform routing the expected number of distinct experts is
  ``E (1 - (1 - k/E)^B)`` (``k`` at ``B = 1``, at most ``E``). The benchmark can count the real
  number instead (:class:`ExpertCounter`);
- the latent cache: ``batch * context`` positions of ``kv_lora_rank + qk_rope_head_dim`` values in
  every layer.

MTP modules are not part of a plain decode step and are left out.

Bandwidth: a stream read (``sum``) of a buffer at least 4x the last-level cache, with the threads the
benchmark uses; a copy (read + write) is recorded beside it. The read is the roofline's bandwidth:
decoding reads weights, it writes almost nothing.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from ..accounting import decode_step_bytes, expected_distinct_experts  # noqa: F401  (their home; kept importable here)
from .machine import l3_cache_bytes, sync

# Peak memory bandwidth (bytes/s) from vendor datasheets, matched against the device name.
DATASHEET_BANDWIDTH = (("H200", 4.8e12), ("H100 PCIe", 2.0e12), ("H100 NVL", 3.9e12), ("H100", 3.35e12),
                       ("A100-SXM4-80GB", 2.039e12), ("A100-SXM4-40GB", 1.555e12), ("A100-PCIE", 1.935e12),
                       ("L40S", 0.864e12), ("A10", 0.6e12))
# Probe buffer: at least this many bytes, and at least L3_MULTIPLE x the last-level cache (CPU), so
# that the probe reads memory, not cache.
MIN_PROBE_BYTES = {"cuda": 1 << 30, "cpu": 1 << 28}
L3_MULTIPLE = 4


def model_step_bytes(model: nn.Module, batch: int, mean_context: float, cache_value_bytes: int,
                     experts_per_moe_layer: float | None = None) -> dict:
    """Bytes a decode step of ``model`` must read, from its tensors at their stored precision.

    Counts ``model.state_dict()`` (parameters and persistent buffers, so quantized weights and their
    scales are included): tensors under ``.experts.`` (stacked ``[E, ...]``) by the fraction of
    experts the batch touches, ``embed_tokens.weight`` by ``batch`` rows, MTP modules (``mtp.``) not
    at all, everything else in full. A tensor stored twice under two names (a tied head) is read once.
    ``cache_value_bytes`` is the element size of the latent cache. Returns bytes by part and the
    weight bytes by stored dtype.
    """
    config = model.config
    E, k = config.n_routed_experts, config.num_experts_per_tok
    distinct = expected_distinct_experts(E, k, batch) if experts_per_moe_layer is None else experts_per_moe_layer
    parts = {"embedding_rows": 0.0, "routed_experts": 0.0, "other_weights": 0.0}
    by_dtype: dict[str, float] = {}
    seen: set[tuple[int, int]] = set()
    tensors = model.state_dict(keep_vars=True)
    # A tied head: the embedding table is read in full as the output projection; count it there.
    tied = {n for n, t in tensors.items() if n == "embed_tokens.weight"
            and any(m != n and u.data_ptr() == t.data_ptr() for m, u in tensors.items())}
    for name, t in tensors.items():
        if name.startswith("mtp.") or not isinstance(t, torch.Tensor) or t.numel() == 0:
            continue
        key = (t.data_ptr(), t.nbytes)
        if key in seen:
            continue
        seen.add(key)
        full = float(t.numel() * t.element_size())
        if ".experts." in name and E:
            if t.shape[0] != E:
                raise ValueError(f"{name}: expected experts stacked along dim 0 ({E}), got shape {tuple(t.shape)}")
            part, used = "routed_experts", full * distinct / E
        elif name == "embed_tokens.weight" and name not in tied:
            part, used = "embedding_rows", full * min(batch, t.shape[0]) / t.shape[0]
        else:
            part, used = "other_weights", full
        parts[part] += used
        dtype = str(t.dtype).removeprefix("torch.")
        by_dtype[dtype] = by_dtype.get(dtype, 0.0) + used
    weights = sum(parts.values())
    cache = batch * mean_context * config.num_hidden_layers * config.latent_dim * cache_value_bytes
    return {"weights": weights, "cache": cache, "total": weights + cache, **parts,
            "weights_by_dtype": by_dtype, "experts_per_moe_layer": distinct,
            "experts_per_moe_layer_uniform": expected_distinct_experts(E, k, batch),
            "mean_context": mean_context, "batch": batch}


# Bytes per cached value of llama.cpp's KV cache types (q8_0: blocks of 32 int8 values + one fp16 scale).
GGUF_CACHE_VALUE_BYTES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32}


def gguf_step_bytes(path, config, batch: int, mean_context: float, cache_value_bytes: float,
                    experts_per_moe_layer: float | None = None) -> dict:
    """Bytes a decode step of llama.cpp reads from the GGUF at ``path``, by the rules of
    :func:`model_step_bytes`, from the file's own tensor sizes (its types: q8_0 blocks, f16 fallbacks).

    ``*_exps`` tensors (stacked experts) count by the fraction of experts touched, ``token_embd`` by
    ``batch`` rows (in full when there is no ``output.weight``: the head is then the table), the
    nextn (MTP) blocks ``blk.{num_hidden_layers + i}`` not at all.
    """
    import gguf

    E, k = config.n_routed_experts, config.num_experts_per_tok
    distinct = expected_distinct_experts(E, k, batch) if experts_per_moe_layer is None else experts_per_moe_layer
    tensors = gguf.GGUFReader(str(path)).tensors
    tied = not any(t.name == "output.weight" for t in tensors)
    parts = {"embedding_rows": 0.0, "routed_experts": 0.0, "other_weights": 0.0}
    by_type: dict[str, float] = {}
    for t in tensors:
        name, full = t.name, float(t.n_bytes)
        if name.startswith("blk.") and int(name.split(".")[1]) >= config.num_hidden_layers:
            continue
        if "_exps." in name and E:
            part, used = "routed_experts", full * distinct / E
        elif name == "token_embd.weight" and not tied:
            part, used = "embedding_rows", full * min(batch, config.vocab_size) / config.vocab_size
        else:
            part, used = "other_weights", full
        parts[part] += used
        by_type[t.tensor_type.name] = by_type.get(t.tensor_type.name, 0.0) + used
    weights = sum(parts.values())
    cache = batch * mean_context * config.num_hidden_layers * config.latent_dim * cache_value_bytes
    return {"weights": weights, "cache": cache, "total": weights + cache, **parts, "weights_by_dtype": by_type,
            "experts_per_moe_layer": distinct, "mean_context": mean_context, "batch": batch}


class ExpertCounter:
    """Counts the distinct routed experts each decode step uses, per MoE layer of the main model.

    Reads each ``Router``'s ``last_topk [T, k]`` after a step (``observe()``); a router whose
    ``last_topk`` did not change since the previous call did not run eagerly (a compiled or captured
    step) and is not counted. ``mean()`` is the average over observed (step, layer) pairs, or
    ``None`` when nothing was observed.
    """

    def __init__(self, model: nn.Module):
        from ..model.moe import Router

        self.routers = [m for layer in model.layers for m in layer.modules() if isinstance(m, Router)]
        self._last: list[object] = [None] * len(self.routers)
        self.counts: list[int] = []

    def reset(self) -> None:
        """Forget the routers' current ``last_topk`` (call before the steps to count)."""
        self._last = [r.last_topk for r in self.routers]

    def observe(self) -> None:
        """Count the experts of the step that just ran."""
        for i, r in enumerate(self.routers):
            topk = r.last_topk
            if topk is None or topk is self._last[i]:
                continue
            self._last[i] = topk
            self.counts.append(int(torch.unique(topk).numel()))

    def mean(self) -> float | None:
        return statistics.fmean(self.counts) if self.counts else None


def probe_bytes(device: torch.device) -> tuple[int, int | None]:
    """(bytes the bandwidth probe reads on ``device``, the L3 size it was sized from or None)."""
    floor = MIN_PROBE_BYTES.get(device.type, 1 << 28)
    if device.type != "cpu":
        return floor, None
    l3 = l3_cache_bytes()
    return max(floor, L3_MULTIPLE * l3 if l3 else 0), l3


def bandwidth_probe(device: torch.device, repeats: int = 7, nbytes: int | None = None) -> dict:
    """Memory bandwidth of ``device`` with the current torch threads, in bytes/s.

    ``read``: ``sum`` over an fp32 buffer of ``nbytes`` (default: the larger of 256 MiB (1 GiB on
    CUDA) and 4x the L3 cache), bytes read / time. ``copy``: ``dst.copy_(src)`` of the same size,
    counting read + write. Medians and bests of ``repeats`` timed passes after one untimed one.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    size, l3 = probe_bytes(device)
    if nbytes is not None:
        size = nbytes
    n = max(size // 4, 1)
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)

    def timed(fn) -> list[float]:
        fn()
        sync(device)
        out = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            sync(device)
            out.append(time.perf_counter() - t0)
        return out

    read = timed(lambda: src.sum())
    copy = timed(lambda: dst.copy_(src))
    del src, dst
    nb = 4 * n
    return {
        "read_bytes_per_s": nb / statistics.median(read), "read_bytes_per_s_best": nb / min(read),
        "copy_bytes_per_s": 2 * nb / statistics.median(copy), "copy_bytes_per_s_best": 2 * nb / min(copy),
        "probe_bytes": nb, "l3_cache_bytes": l3, "repeats": repeats, "threads": torch.get_num_threads(),
        "device": str(device),
    }


def measure_bandwidth(device: torch.device, repeats: int = 7) -> float:
    """The roofline's bandwidth of ``device``: the median stream-read bandwidth of :func:`bandwidth_probe`."""
    return bandwidth_probe(device, repeats)["read_bytes_per_s"]


def datasheet_bandwidth(device: torch.device) -> tuple[str, float | None]:
    """(device name, datasheet peak bytes/s or None): known GPUs only."""
    if device.type != "cuda":
        return "cpu", None
    name = torch.cuda.get_device_name(device)
    return name, next((bw for key, bw in DATASHEET_BANDWIDTH if key in name), None)
