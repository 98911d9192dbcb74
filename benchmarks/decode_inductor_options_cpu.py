"""In-process A/B of inductor options for the compiled decode step on a CPU (issue 14).

    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/decode_inductor_options_cpu.py CHECKPOINT
        --variants base,cpp_wrapper,freezing,cpp_wrapper+freezing [--quantize int8] [--batch 1]
        [--threads 1] [--steps 16] [--rounds 5] [--out result.json]

A variant is ``base`` (``compile_options.BASE_OPTIONS`` only) or ``+``-joined switches of
``dsv3.engine.compile_options.SWITCHES`` (``cpp_wrapper``, ``freezing``, ``max_autotune``,
``skip_guard_eval``) and the extra switches below; ``adopted`` is what ``decode_compile_options`` picks for the CPU now. Each
variant is one ``LLM(CHECKPOINT, compile=True)`` built with those options; all variants decode the
same greedy batch. One warmup round each first (it compiles the bucket: its wall time is reported as
the compile time), then rounds in rotating order. A round's time is the median of its decode steps
(every ``LLM.step`` after the one that ran the prompts); the report is each variant's lower-quartile
round (other jobs on a shared machine only ever add time), the ratio base/variant of those and the
range of the per-round ratios, and whether its greedy tokens equal the first variant's.

Extra switches (not inductor options, measured here only):
  noguards   ``guard_filter_fn=torch.compiler.skip_guard_on_all_nn_modules_unsafe`` (drops dynamo's
             guards on module attributes and parameters)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import time

import torch

import dsv3.engine.compile_options as compile_options
from dsv3.bench.decode import random_prompts
from dsv3.engine import LLM, SamplingParams

EXTRA = ("noguards",)


@contextlib.contextmanager
def variant(name: str):
    """Build engines with the options of variant ``name`` inside this context."""
    switches = [s for s in name.split("+") if s and s != "base"]
    if name == "adopted":
        switches = list(compile_options.ADOPTED["cpu"])
    inductor = tuple(s for s in switches if s not in EXTRA)
    for s in inductor:
        if s not in compile_options.SWITCHES:
            raise SystemExit(f"unknown switch {s!r} in {name!r}; choose from "
                             f"{list(compile_options.SWITCHES) + list(EXTRA)}, base, adopted")
    saved = dict(compile_options.ADOPTED)
    saved_fn = compile_options.decode_compile_options
    compile_options.ADOPTED["cpu"] = inductor

    def options(device):
        opts = saved_fn(device)
        if "noguards" in switches:
            opts["guard_filter_fn"] = torch.compiler.skip_guard_on_all_nn_modules_unsafe
        return opts
    import dsv3.engine.cuda_graph as cuda_graph
    saved_cg = cuda_graph.decode_compile_options
    cuda_graph.decode_compile_options = options
    try:
        yield
    finally:
        compile_options.ADOPTED.clear()
        compile_options.ADOPTED.update(saved)
        cuda_graph.decode_compile_options = saved_cg


def decode_round(llm: LLM, prompts: list[list[int]], steps: int) -> tuple[float, list[list[int]]]:
    """Median seconds per decode step of one greedy batch, and its tokens."""
    params = SamplingParams(temperature=0, max_tokens=steps + 1, ignore_eos=True)
    seqs = [llm.add_request(p, params) for p in prompts]
    llm.step()                                           # the prompts (and the first token)
    times = []
    while not all(s.finished for s in seqs):
        t0 = time.perf_counter()
        llm.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), [list(s.output) for s in seqs]


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--variants", default="base,cpp_wrapper,freezing,cpp_wrapper+freezing")
    ap.add_argument("--quantize", default=None)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--out", default=None, help="write the rounds and summary as JSON here")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    names = a.variants.split(",")
    load_before = os.getloadavg()
    llms, compile_s, tokens = {}, {}, {}
    prompts = None
    for n in names:
        with variant(n):
            llms[n] = LLM(a.model, compile=True, quantize=a.quantize, max_num_seqs=a.batch,
                          max_model_len=a.prompt_len + a.steps + 8, prefix_caching=False)
        if prompts is None:
            prompts = random_prompts(a.batch, a.prompt_len, llms[n].config.vocab_size, 0)
        t0 = time.perf_counter()                          # warmup: compiles the bucket
        _, tokens[n] = decode_round(llms[n], prompts, a.steps)
        compile_s[n] = time.perf_counter() - t0
        print(f"warmup (compile) {n}: {compile_s[n]:.1f} s", flush=True)
    rounds = {n: [] for n in names}
    for r in range(a.rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            t, _ = decode_round(llms[n], prompts, a.steps)
            rounds[n].append(t)
        print(f"round {r + 1}: " + ", ".join(f"{n} {rounds[n][-1] * 1e3:.2f} ms" for n in names), flush=True)
    load_after = os.getloadavg()
    base = names[0]
    lq = {n: sorted(rounds[n])[len(rounds[n]) // 4] for n in names}
    print(f"{a.model} quantize={a.quantize} batch={a.batch} threads={a.threads}, compiled, ms per decode step "
          f"(lower quartile of {a.rounds} rounds); load {load_before[0]:.1f} -> {load_after[0]:.1f}; {cpu_model()}")
    summary = {}
    for n in names:
        pair = [b / t for b, t in zip(rounds[base], rounds[n])]
        summary[n] = {"ms": lq[n] * 1e3, "ratio_vs_first": lq[base] / lq[n], "per_round": [min(pair), max(pair)],
                      "compile_s": compile_s[n], "tokens_equal_first": tokens[n] == tokens[base]}
        print(f"  {n:28s} {lq[n] * 1e3:8.2f} ms   {base}/{n}: {lq[base] / lq[n]:.2f}x "
              f"(per round {min(pair):.2f}-{max(pair):.2f}x)   compile {compile_s[n]:5.1f} s   "
              f"tokens equal {base}: {tokens[n] == tokens[base]}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"args": vars(a), "cpu": cpu_model(), "torch": torch.__version__, "load": [load_before, load_after],
                       "rounds_s": rounds, "summary": summary}, f, indent=1)


if __name__ == "__main__":
    main()
