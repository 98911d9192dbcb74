"""Where one CPU decode step of our engine goes: attention, router, routed experts, shared experts, dense
MLPs, the rest of the model body, the head, sampling and the engine's own Python.

    PYTHONPATH=src python benchmarks/profile_decode_cpu.py MODEL_DIR [--batch 1] [--threads 1]
        [--dtype float32] [--quantize int8] [--prompt-len 32] [--steps 32] [--json OUT]

Two passes over the same decode steps (after a prefill of ``--batch`` random prompts):

1. wall clock of each part: the model's leaf modules of each kind and the engine's head and
   sampling calls are wrapped with ``perf_counter`` timers (the CPU runs synchronously, so a call's
   wall time is its cost); "rest of the body" is ``hidden_states`` minus the modules inside it
   (embedding, norms, residual adds, RoPE, the calls themselves), "engine" is ``LLM.step`` minus
   the model body, the head and sampling (scheduling, packing, bookkeeping);
2. ``torch.profiler`` without the timers: aten ops per step and their summed self time, so that
   "step - op time" is what Python and dispatch cost beyond the kernels; the top ops by self time.
"""

from __future__ import annotations

import argparse
import collections
import json
import time

import torch
from torch.profiler import ProfilerActivity, profile

import dsv3.engine.llm as engine_llm
from dsv3.bench.decode import random_prompts
from dsv3.engine import LLM, SamplingParams
from dsv3.model.mla import MLA
from dsv3.model.moe import MoE, Router

PARTS = ("attention (MLA)", "router", "routed experts", "shared experts", "dense MLP", "rest of the body",
         "head (lm_head)", "sampling", "engine (schedule, pack, bookkeeping)")


def timed(fn, totals: dict, key: str):
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[key] += time.perf_counter() - t0
    return wrapper


def instrument(llm: LLM, totals: dict) -> None:
    """Wrap the engine's and the model's parts with timers that add into ``totals``."""
    model = llm.model
    for layer in model.layers:
        for m in layer.modules():
            if isinstance(m, MLA):
                m.forward = timed(m.forward, totals, "attention (MLA)")
            elif isinstance(m, Router):
                m.forward = timed(m.forward, totals, "router")
            elif isinstance(m, MoE):
                m.experts.forward = timed(m.experts.forward, totals, "routed experts")
                if m.shared_experts is not None:
                    m.shared_experts.forward = timed(m.shared_experts.forward, totals, "shared experts")
        if not isinstance(layer.mlp, MoE):
            layer.mlp.forward = timed(layer.mlp.forward, totals, "dense MLP")
    model.hidden_states = timed(model.hidden_states, totals, "body")
    llm.runner.logits = timed(llm.runner.logits, totals, "head (lm_head)")
    engine_llm.sample = timed(engine_llm.sample, totals, "sampling")


def decode(llm: LLM, prompts: list[list[int]], steps: int, on_step=None) -> float:
    """Prefill ``prompts``, then run ``steps`` decode steps; returns their wall time."""
    params = SamplingParams(temperature=0, max_tokens=steps + 1, ignore_eos=True)
    for p in prompts:
        llm.add_request(p, params)
    llm.step()                                          # prefill + first token
    if on_step is not None:
        on_step()
    t0 = time.perf_counter()
    for _ in range(steps):
        llm.step()
    dt = time.perf_counter() - t0
    while llm.scheduler.has_work():
        llm.step()
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--quantize", default=None)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    kwargs = dict(dtype=args.dtype, max_num_seqs=args.batch, max_model_len=args.prompt_len + args.steps + 8,
                  prefix_caching=False, max_num_batched_tokens=max(1024, args.batch * args.prompt_len))
    if args.quantize:
        kwargs["quantize"] = args.quantize
    llm = LLM(args.model, **kwargs)
    prompts = random_prompts(args.batch, args.prompt_len, llm.config.vocab_size, 0)
    decode(llm, prompts, 4)                             # warmup

    # 2. the profiler first, on the uninstrumented engine.
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        prof_wall = decode(llm, prompts, args.steps)
    events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    op_calls = sum(e.count for e in events)
    op_self_s = sum(e.self_cpu_time_total for e in events) / 1e6
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:12]

    # 1. the timers.
    totals: dict[str, float] = collections.defaultdict(float)
    instrument(llm, totals)
    step_fn = llm.step
    llm.step = timed(step_fn, totals, "step")
    wall = decode(llm, prompts, args.steps, on_step=totals.clear)
    n = args.steps
    inside = sum(totals[k] for k in ("attention (MLA)", "router", "routed experts", "shared experts", "dense MLP"))
    parts = {k: totals[k] for k in ("attention (MLA)", "router", "routed experts", "shared experts", "dense MLP")}
    parts["rest of the body"] = totals["body"] - inside
    parts["head (lm_head)"] = totals["head (lm_head)"]
    parts["sampling"] = totals["sampling"]
    parts["engine (schedule, pack, bookkeeping)"] = (totals["step"] - totals["body"] - totals["head (lm_head)"]
                                                     - totals["sampling"])
    step_ms = 1000 * totals["step"] / n

    print(f"{args.model}: batch {args.batch}, {args.threads} threads, {args.dtype}"
          f"{' ' + args.quantize if args.quantize else ''}, prompt {args.prompt_len}, {n} decode steps")
    print(f"step (timers on): {step_ms:.2f} ms; without timers, under the profiler: {1000 * prof_wall / n:.2f} ms")
    for k in PARTS:
        print(f"  {k:<40} {1000 * parts[k] / n:8.3f} ms  {100 * parts[k] / totals['step']:5.1f}%")
    print(f"aten ops per step: {op_calls / n:,.0f}, their self time {1000 * op_self_s / n:.2f} ms of "
          f"{1000 * prof_wall / n:.2f} ms (the rest: Python, dispatch, profiler)")
    print("top aten ops by self time per step:")
    for e in top:
        print(f"  {e.key:<36} {e.count / n:7.1f} calls  {e.self_cpu_time_total / 1000 / n:8.3f} ms")
    if args.json:
        out = {"model": args.model, "batch": args.batch, "threads": args.threads, "dtype": args.dtype,
               "quantize": args.quantize, "prompt_len": args.prompt_len, "steps": n, "step_ms": step_ms,
               "wall_s": wall, "parts_ms": {k: 1000 * v / n for k, v in parts.items()},
               "profiler_step_ms": 1000 * prof_wall / n, "aten_ops_per_step": op_calls / n,
               "aten_self_ms_per_step": 1000 * op_self_s / n,
               "top_ops": [{"op": e.key, "calls_per_step": e.count / n, "self_ms_per_step": e.self_cpu_time_total / 1000 / n}
                           for e in top]}
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
