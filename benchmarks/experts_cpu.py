"""Routed-experts implementations on a CPU, per token count: the measurement behind
``dsv3.engine.experts.GATHERED_MAX_READS_PER_EXPERT``.

    nice .venv/bin/python benchmarks/experts_cpu.py --tokens 1,8,32,64,128,256 [--dtype bfloat16] [--threads 1]

One MoE layer of the ``small`` preset by default (64 experts, 768 x 256, top-6): the compiled
``gathered_swiglu`` (slots sorted by expert), the grouped GEMMs (``grouped_swiglu``) and the
reference per-expert loop, each over ``--sets`` distinct weight sets in turn so the weights come
from memory as in a model (a layer's experts are 151 MB in fp32). Prints the lower-quartile time per
call in ms (the quartile, not the mean: a shared machine's other jobs only ever add time).
"""

from __future__ import annotations

import argparse
import time

import torch

from dsv3.config import preset
from dsv3.kernels.gathered_experts import gathered_swiglu
from dsv3.kernels.grouped_experts import grouped_swiglu
from dsv3.model.moe import dispatch_experts, swiglu_expert


def loop(x, weights, topk, gate, up, down):
    per_expert = list(zip(gate.unbind(0), up.unbind(0), down.unbind(0)))
    return dispatch_experts(x, weights, topk, per_expert, swiglu_expert)


def time_call(fn, sets, T, E, D, k, dtype, calls: int) -> float:
    g = torch.Generator().manual_seed(T)
    x = torch.randn(T, D, generator=g).to(dtype)
    weights = torch.rand(T, k, generator=g)
    topk = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    for s in sets[:2]:                                  # compiles, warms up
        fn(x, weights, topk, *s)
    times = []
    for i in range(calls):
        s = sets[i % len(sets)]
        t0 = time.perf_counter()
        fn(x, weights, topk, *s)
        times.append(time.perf_counter() - t0)
    return 1000 * sorted(times)[len(times) // 4]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--tokens", default="1,8,32,64,128,256")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sets", type=int, default=6, help="distinct weight sets cycled through")
    ap.add_argument("--calls", type=int, default=18)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch._dynamo.config.recompile_limit = 64          # one graph per token count
    cfg = preset(args.preset)
    E, D, I, k = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts_per_tok
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    sets = [[(torch.randn(*shape) * 0.02).to(dtype) for shape in ((E, I, D), (E, I, D), (E, D, I))]
            for _ in range(args.sets)]
    impls = {"gathered (compiled)": torch.compile(gathered_swiglu, dynamic=False, fullgraph=True),
             "grouped GEMMs": grouped_swiglu, "loop": loop}
    print(f"{args.preset}: E={E} D={D} I={I} k={k} {args.dtype}, {args.threads} thread(s); ms per call")
    print(f"{'T':>5} {'T*k/E':>6} " + " ".join(f"{n:>20}" for n in impls))
    with torch.inference_mode():
        for T in (int(t) for t in args.tokens.split(",")):
            row = [time_call(f, sets, T, E, D, k, dtype, args.calls) for f in impls.values()]
            print(f"{T:>5} {T * k / E:>6.1f} " + " ".join(f"{v:>20.2f}" for v in row), flush=True)


if __name__ == "__main__":
    main()
