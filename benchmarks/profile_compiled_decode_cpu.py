"""Where a *compiled* CPU decode step of our engine goes, by kernel: inductor's generated C++ loops
(named after the ops they fused) and the library calls it makes (MKL GEMMs, torch's int8 kernels).

    PYTHONPATH=src python benchmarks/profile_compiled_decode_cpu.py MODEL_DIR [--batch 1] [--threads 1]
        [--quantize int8] [--steps 12] [--top 25]

``benchmarks/profile_decode_cpu.py`` times the model's modules with Python timers, which only works
eagerly (the timers would break the compiled graph). Here the step is compiled once (a warmup
batch), then ``torch.profiler`` records ``--steps`` decode steps with inductor's per-kernel
profiling on (``torch._inductor.config.cpp.enable_kernel_profile``): each generated loop shows up as
``graph_<n>_cpp_fused_<ops>`` and each library call as its aten op. Prints ms per step by kernel,
grouped into the parts of a step by the op names the kernel fused.
"""

from __future__ import annotations

import argparse
import collections
import time

import torch
import torch._inductor.config as inductor_config
from torch.profiler import ProfilerActivity, profile

from dsv3.bench.decode import random_prompts
from dsv3.engine import LLM, SamplingParams


def part_of(name: str) -> str:
    """A coarse part of the step from a kernel's name (inductor names loops after the ops they fuse)."""
    n = name.lower()
    if "int8pack" in n or "int4pack" in n:
        return "int8/int4 kernel calls"
    if n.startswith("aten::") and any(k in n for k in ("mm", "addmm", "bmm", "linear")):
        return "GEMM library calls (MKL)"
    if "sort" in n or "topk" in n:
        return "router / expert sort"
    if "index" in n and ("mul" in n or "sum" in n):
        return "gathered experts (fused loops)"
    if "bmm" in n or "einsum" in n:
        return "absorbed products (fused loops)"
    if "softmax" in n or "amax" in n or "exp" in n:
        return "attention softmax / sampling"
    if n.startswith("graph_"):
        return "other fused loops"
    return "other aten ops"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quantize", default=None)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--top", type=int, default=25)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    inductor_config.cpp.enable_kernel_profile = True
    llm = LLM(a.model, compile=True, quantize=a.quantize, max_num_seqs=a.batch,
              max_model_len=a.prompt_len + 2 * a.steps + 8, prefix_caching=False)
    prompts = random_prompts(a.batch, a.prompt_len, llm.config.vocab_size, 0)

    def run(n: int, prof=None) -> float:
        params = SamplingParams(temperature=0, max_tokens=n + 1, ignore_eos=True)
        seqs = [llm.add_request(p, params) for p in prompts]
        llm.step()                                        # the prompts
        if prof is not None:
            prof.start()
        t0 = time.perf_counter()
        while not all(s.finished for s in seqs):
            llm.step()
        dt = time.perf_counter() - t0
        if prof is not None:
            prof.stop()
        return dt / n

    t0 = time.perf_counter()
    run(2)
    print(f"warmup (compiles): {time.perf_counter() - t0:.1f} s", flush=True)
    plain = run(a.steps)
    prof = profile(activities=[ProfilerActivity.CPU])
    profiled = run(a.steps, prof)
    rows = [(e.key, e.self_cpu_time_total / 1e3 / a.steps, e.count / a.steps) for e in prof.key_averages()]
    rows = [r for r in rows if r[1] > 0]
    total = sum(r[1] for r in rows)
    parts = collections.Counter()
    for name, ms, _ in rows:
        parts[part_of(name)] += ms
    print(f"{a.model} quantize={a.quantize} batch={a.batch} threads={a.threads}: step {plain * 1e3:.1f} ms "
          f"unprofiled, {profiled * 1e3:.1f} ms profiled, {total:.1f} ms in recorded ops/kernels (self time)")
    for part, ms in parts.most_common():
        print(f"  {part:36s} {ms:7.2f} ms  {100 * ms / total:5.1f}%")
    print(f"top {a.top} by self time per step:")
    for name, ms, calls in sorted(rows, key=lambda r: -r[1])[: a.top]:
        print(f"  {ms:7.2f} ms  {calls:6.1f} calls  {name[:110]}")


if __name__ == "__main__":
    main()
