"""Where a batch-1 decode step of a V2-Lite-shaped model goes on the GPU: ``PYTHONPATH=src python benchmarks/gpu/profile_decode.py``.

Random V2-Lite weights in bf16, one sequence (prompt 256). Times the CUDA-graph decode step, then
profiles the same steps run eagerly (same kernels, plus launch gaps) and prints the kernels by GPU
time per step, so the kernel time of a step can be set against the graph-replayed step time and
the bytes the step must read. Writes ``profile_decode.json`` into ``$OUT`` when set.
"""

from __future__ import annotations

import json
import os
import time

import torch
from torch.profiler import ProfilerActivity, profile

from dsv3.bench.decode import decode_step_bytes, random_model, random_prompts
from dsv3.engine import LLM, SamplingParams

STEPS = 16
model = random_model("v2-lite", torch.bfloat16, torch.device("cuda"))
cfg = model.config
prompt = random_prompts(1, 256, cfg.vocab_size, 0)[0]
kwargs = dict(max_num_seqs=1, max_model_len=256 + STEPS + 8, prefix_caching=False)


def decode_steps(llm: LLM, n: int) -> float:
    """Prefill one request, then time ``n`` decode steps; returns seconds per step."""
    llm.add_request(prompt, SamplingParams(temperature=0, max_tokens=n + 1, ignore_eos=True))
    llm.step()                                            # prefill (+ first token)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        llm.step()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n


graphs = LLM(model, cuda_graphs=True, **kwargs)
decode_steps(graphs, 4)                                   # capture
graph_step = min(decode_steps(graphs, STEPS) for _ in range(3))

eager = LLM(model, **kwargs)
decode_steps(eager, 4)
eager_step = min(decode_steps(eager, STEPS) for _ in range(3))
eager.add_request(prompt, SamplingParams(temperature=0, max_tokens=STEPS + 1, ignore_eos=True))
eager.step()
torch.cuda.synchronize()
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    for _ in range(STEPS):
        eager.step()
    torch.cuda.synchronize()

rows = []
for e in prof.key_averages():
    t = getattr(e, "device_time_total", 0) or getattr(e, "cuda_time_total", 0)
    if t > 0 and e.key and not e.key.startswith(("aten::", "cuda", "Memcpy", "Memset", "ProfilerStep")):
        rows.append({"kernel": e.key[:90], "us_per_step": t / STEPS, "calls_per_step": e.count / STEPS})
rows.sort(key=lambda r: -r["us_per_step"])
kernel_us = sum(r["us_per_step"] for r in rows)
need = decode_step_bytes(cfg, 1, 256 + STEPS / 2, 2)
out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "graph_step_ms": 1e3 * graph_step,
       "eager_step_ms": 1e3 * eager_step, "kernel_ms_per_step": kernel_us / 1e3, "bytes_per_step": need,
       "kernels": rows[:40]}
print(f"{out['device']}: CUDA-graph step {out['graph_step_ms']:.2f} ms, eager step {out['eager_step_ms']:.2f} ms, "
      f"GPU kernel time {out['kernel_ms_per_step']:.2f} ms/step; must read {need['total'] / 1e9:.3f} GB/step")
for r in rows[:30]:
    print(f"  {r['us_per_step']:9.1f} us  {r['calls_per_step']:6.1f} calls  {r['kernel']}")
if os.environ.get("OUT"):
    with open(os.path.join(os.environ["OUT"], "profile_decode.json"), "w") as f:
        json.dump(out, f, indent=1)
