"""In-process A/B of decode-step variants of our engine on a CPU: the measurement behind each change
of issue 14 (kv_b_proj row-major, int8 head and kv_b_proj).

    nice .venv/bin/python benchmarks/decode_ab_cpu.py CHECKPOINT --variants old,new [--quantize int8]
        [--batch 1] [--threads 1] [--steps 12] [--rounds 5] [--eager]

Each variant is one ``LLM(CHECKPOINT, compile=True)`` (``--eager``: plain) built with the switches
it names; the variants then take turns, round after round in rotating order, each decoding the
same greedy batch (one warmup round first: it compiles). A round's time is the median of its
decode steps (every ``LLM.step`` after the one that ran the prompts); the report is each variant's
lower-quartile round (a shared machine's other jobs only ever add time) and the ratios to the first
variant, per round pair and overall. Greedy tokens are compared with the first variant's.

Variants:
  old      column-major for every fp32 Linear incl. kv_b_proj; int8 keeps lm_head and kv_b_proj fp32
  new      kv_b_proj row-major (engine/weight_layout.py ROW_MAJOR); int8 with DECODE_OPTIONS
  nohead   as new, int8 without the int8 head
  nolatent as new, int8 without the int8 kv_b_proj (kept fp32, row-major)
  int8act  as new, int8 layers with int8 activations too (fbgemm dynamic linear, activations="int8")
A ``:SCHEME`` suffix quantizes that variant (``new,new:int8`` compares fp32 with int8 in one process).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

import dsv3.engine.weight_layout as weight_layout
import dsv3.quant.weight_only as weight_only
from dsv3.bench.decode import random_prompts
from dsv3.engine import LLM, SamplingParams


@contextlib.contextmanager
def variant(name: str):
    saved = weight_layout.ROW_MAJOR, dict(weight_only.DECODE_OPTIONS)
    opts = {"old": ((), {"int8": {}, "int4": {}}),
            "new": (saved[0], saved[1]),
            "nohead": (saved[0], {**saved[1], "int8": {**saved[1]["int8"], "head": False}}),
            "nolatent": (saved[0], {**saved[1], "int8": {**saved[1]["int8"], "latent": False}}),
            "int8act": (saved[0], {**saved[1], "int8": {**saved[1]["int8"], "activations": "int8"}})}
    if name not in opts:
        raise SystemExit(f"unknown variant {name!r}; choose from {sorted(opts)}")
    weight_layout.ROW_MAJOR, options = opts[name]
    weight_only.DECODE_OPTIONS.clear()
    weight_only.DECODE_OPTIONS.update(options)
    try:
        yield
    finally:
        weight_layout.ROW_MAJOR = saved[0]
        weight_only.DECODE_OPTIONS.clear()
        weight_only.DECODE_OPTIONS.update(saved[1])


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--variants", default="old,new")
    ap.add_argument("--quantize", default=None)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--eager", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    names = a.variants.split(",")
    llms = {}
    for n in names:
        base_name, _, scheme = n.partition(":")            # "new:int8": variant new, quantized int8
        with variant(base_name):
            llms[n] = LLM(a.model, compile=not a.eager, quantize=scheme or a.quantize, max_num_seqs=a.batch,
                          max_model_len=a.prompt_len + a.steps + 8, prefix_caching=False)
    prompts = random_prompts(a.batch, a.prompt_len, llms[names[0]].config.vocab_size, 0)
    tokens = {}
    for n in names:                                       # warmup: compiles the bucket
        t0 = time.perf_counter()
        _, tokens[n] = decode_round(llms[n], prompts, a.steps)
        print(f"warmup {n}: {time.perf_counter() - t0:.1f} s", flush=True)
    rounds = {n: [] for n in names}
    for r in range(a.rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            t, _ = decode_round(llms[n], prompts, a.steps)
            rounds[n].append(t)
        print(f"round {r + 1}: " + ", ".join(f"{n} {rounds[n][-1] * 1e3:.1f} ms" for n in names), flush=True)
    base = names[0]
    print(f"{a.model} quantize={a.quantize} batch={a.batch} threads={a.threads} "
          f"{'eager' if a.eager else 'compiled'}, ms per decode step (lower quartile of {a.rounds} rounds)")
    for n in names:
        q = sorted(rounds[n])[len(rounds[n]) // 4]
        pair = [b / t for b, t in zip(rounds[base], rounds[n])]
        print(f"  {n:9s} {q * 1e3:8.1f} ms   {base}/{n}: {sorted(rounds[base])[len(rounds[base]) // 4] / q:.2f}x "
              f"(per round {min(pair):.2f}-{max(pair):.2f}x)   tokens equal {base}: {tokens[n] == tokens[base]}")


if __name__ == "__main__":
    main()
