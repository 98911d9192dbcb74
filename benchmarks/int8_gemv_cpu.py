"""Which CPU kernel streams int8 weights fastest for decode-sized products (issue 14)?

For ``y [M, N] = x [M, K] @ (q [N, K] int8 * s [N])^T`` with M = 1 or 8 (batch-1 / batch-8 decode),
on one thread, it times each candidate and reports GB/s of *int8 weight bytes* (N*K per call; fp32
F.linear's row also gives its own fp32 bytes):

- ``int8pack``: ``torch.ops.aten._weight_int8pack_mm`` on bf16 activations (what ``quant/`` used);
- ``compile_mm``: ``torch.compile(dynamic=False)`` of ``(x @ q.to(x.dtype).T) * s``;
- ``compile_red``: ``torch.compile(dynamic=False)`` of ``(x[:, None, :] * q.to(x.dtype)).sum(-1) * s``
  (a reduction inductor writes as one vectorized loop that reads the int8 bytes once);
- ``int4pack``: ``_weight_int4pack_mm_for_cpu`` (group 32, bf16), bytes = N*K/2 + scales;
- ``fp32``: ``F.linear`` with the fp32 weight (MKL), the reference;
- ``torchao`` / ``torchao_compiled``: torchao's ``Int8WeightOnlyConfig`` (when torchao imports);
- dynamic int8 activations (the weights' quality is the same int8; the activations are rounded too):
  ``int_mm`` (``torch._int_mm`` int8 x int8 -> int32, row and column scales) and ``fbgemm``
  (``torch.ops.quantized.linear_dynamic``, fbgemm's AVX2 int8 dot products).

Each call reads a different copy of the weights (a pool of >= 96 MB of int8), so the bytes come
from DRAM as in a decode step of a model larger than the cache. Rounds interleave the candidates
(the machine is shared); the JSON has every round, the median GB/s, the median per-round ratio to
``int8pack`` and each candidate's relative error against the exact fp32 product.

    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/int8_gemv_cpu.py --rounds 5 --out r.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

SHAPES = {"2048": (2048, 2048), "4096": (4096, 4096), "expert_gate_up": (512, 768), "head": (32768, 768)}
POOL_BYTES = 96 << 20


def _quantize(w):  # [N, K] -> q int8 [N, K], s fp32 [N] (symmetric per output channel)
    s = (w.abs().amax(1) / 127).clamp_min(1e-12).to(torch.bfloat16).float()
    return (w / s[:, None]).round().clamp(-127, 127).to(torch.int8), s


def _mm_form(x, q, s):
    return (x @ q.to(x.dtype).T) * s


def _red_form(x, q, s):
    return (x[:, None, :] * q.to(x.dtype)).sum(-1) * s


def _int_mm_dyn(x, q_t, s):  # x fp32 [M, K], q_t int8 [K, N] (column-major view), s [N]
    xs = (x.abs().amax(1, keepdim=True) / 127).clamp_min(1e-12)                     # [M, 1]
    xq = (x / xs).round().clamp(-127, 127).to(torch.int8)
    return torch._int_mm(xq, q_t).float() * xs * s


def build(name, N, K, M, copies):
    """-> (fn() that runs the next call, bytes per call, relative error vs exact fp32), or None."""
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(N, K, generator=g) * 0.02 for _ in range(min(copies, 2))]
    x = torch.randn(M, K, generator=g)
    qs = [_quantize(w) for w in ws]
    # the pool: copies of the quantized weights (random content is irrelevant to speed)
    idx = [i % len(ws) for i in range(copies)]
    exact = F.linear(x, ws[0])
    state = {"i": 0}

    def cycler(items, call):
        def fn():                             # the first call uses copy 0 (whose exact product is `exact`)
            i = state["i"]
            state["i"] = (i + 1) % len(items)
            return call(items[i])
        return fn

    def err(y):
        return ((y.float() - exact).norm() / exact.norm()).item()

    nbytes = N * K
    if name == "int8pack":
        xb = x.bfloat16()
        items = [(qs[i][0].clone(), qs[i][1].bfloat16()) for i in idx]
        call = lambda it: torch.ops.aten._weight_int8pack_mm(xb, it[0], it[1])
    elif name in ("compile_mm", "compile_red"):
        f = torch.compile(_mm_form if name == "compile_mm" else _red_form, dynamic=False)
        items = [(qs[i][0].clone(), qs[i][1]) for i in idx]
        call = lambda it: f(x, it[0], it[1])
    elif name == "fp32":
        items = [ws[i].clone() for i in idx]
        call = lambda w: F.linear(x, w)
    elif name == "int4pack":
        if N % 16 or K % 32:
            return None
        items = []
        for i in idx:
            w = ws[i].view(N, K // 32, 32)
            lo, hi = w.amin(-1), w.amax(-1)
            sc = ((hi - lo) / 15).clamp_min(1e-12).bfloat16().float()
            zero = (lo + 8 * sc).bfloat16().float()
            qi = ((w - zero[..., None]) / sc[..., None] + 8).round().clamp(0, 15).to(torch.int32).view(N, K)
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(qi, 1)
            sz = torch.stack([sc, zero], -1).transpose(0, 1).contiguous().bfloat16()
            items.append((packed, sz))
        nbytes = N * K // 2 + items[0][1].numel() * 2
        xb = x.bfloat16()
        call = lambda it: torch.ops.aten._weight_int4pack_mm_for_cpu(xb, it[0], 32, it[1])
    elif name in ("torchao", "torchao_compiled"):
        try:
            from torchao.quantization import Int8WeightOnlyConfig, quantize_
        except Exception:                     # noqa: BLE001 - any import failure means "not available"
            return None
        items = []
        for i in idx:
            lin = torch.nn.Linear(K, N, bias=False)
            lin.weight.data.copy_(ws[i])
            quantize_(lin, Int8WeightOnlyConfig())
            items.append(torch.compile(lin, dynamic=False) if name == "torchao_compiled" else lin)
        call = lambda m: m(x)
    elif name == "int_mm":
        try:
            torch._int_mm(torch.zeros(M, K, dtype=torch.int8), qs[0][0].T)
        except Exception:                     # noqa: BLE001
            return None
        items = [(qs[i][0].clone().T, qs[i][1]) for i in idx]                     # [K, N] views
        call = lambda it: _int_mm_dyn(x, it[0], it[1])
    elif name == "fbgemm":
        if "fbgemm" not in torch.backends.quantized.supported_engines:
            return None
        torch.backends.quantized.engine = "fbgemm"
        items = []
        for i in idx:
            q, s = qs[i]
            qw = torch.quantize_per_channel(q.float() * s[:, None], s.double(), torch.zeros(N, dtype=torch.long), 0,
                                            torch.qint8)
            items.append(torch.ops.quantized.linear_prepack(qw, None))
        call = lambda p: torch.ops.quantized.linear_dynamic(x, p, True)
    else:
        raise ValueError(name)
    fn = cycler(items, call)
    state["i"] = 0
    e = err(fn())
    for _ in range(3):
        fn()                                  # compile / warm
    return fn, nbytes, e, len(items)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=0, help="calls per timing (0: enough for ~64 MB of int8)")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--candidates", default="int8pack,compile_mm,compile_red,int4pack,fp32,torchao,"
                                            "torchao_compiled,int_mm,fbgemm")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    torch.set_num_threads(1)
    names = a.candidates.split(",")
    results = []
    for sk in a.shapes.split(","):
        N, K = SHAPES[sk]
        copies = max(2, -(-POOL_BYTES // (N * K)))
        for M in (int(b) for b in a.batch.split(",")):
            built = {}
            for n in names:
                b = build(n, N, K, M, copies)
                if b is not None:
                    built[n] = b
            calls = a.calls or max(4, (64 << 20) // (N * K))
            rounds = {n: [] for n in built}
            for r in range(a.rounds):
                order = list(built)[r % len(built):] + list(built)[:r % len(built)]     # rotate who goes first
                for n in order:
                    fn, nb, _, _ = built[n]
                    t0 = time.perf_counter()
                    for _ in range(calls):
                        fn()
                    dt = (time.perf_counter() - t0) / calls
                    rounds[n].append({"s_per_call": dt, "int8_GBps": N * K / dt / 1e9, "own_GBps": nb * (4 if n == "fp32" else 1) / dt / 1e9})
            base = rounds.get("int8pack")
            for n, rs in rounds.items():
                row = {"shape": sk, "N": N, "K": K, "M": M, "candidate": n, "rel_err_vs_fp32": built[n][2],
                       "pool_copies": built[n][3], "calls_per_round": calls,
                       "us_per_call_median": 1e6 * statistics.median(x["s_per_call"] for x in rs),
                       "int8_GBps_median": statistics.median(x["int8_GBps"] for x in rs),
                       "own_bytes_GBps_median": statistics.median(x["own_GBps"] for x in rs),
                       "rounds": rs}
                if base:
                    row["speedup_vs_int8pack_median"] = statistics.median(
                        b["s_per_call"] / x["s_per_call"] for x, b in zip(rs, base))
                results.append(row)
                print(f"{sk:>15} M={M} {n:>17}: {row['us_per_call_median']:9.1f} us  "
                      f"{row['int8_GBps_median']:6.2f} GB/s(int8-eq)  own {row['own_bytes_GBps_median']:6.2f} GB/s  "
                      f"x{row.get('speedup_vs_int8pack_median', float('nan')):.2f} vs int8pack  "
                      f"err {row['rel_err_vs_fp32']:.4f}", flush=True)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(), "load": os.getloadavg(), "threads": 1,
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=1)
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
