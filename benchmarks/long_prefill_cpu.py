"""Long prefill through ``dsv3.LLM`` on the CPU: time and peak memory against the FLOP floor.

    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/long_prefill_cpu.py --lengths 4096,16384,65536 \
        --json runs/long_prefill.json --plot runs/long_prefill.png

Model: the random ``tiny`` preset (4 layers, hidden 256, 4 heads, MLA latent 512 + 64, MoE) with
``max_position_embeddings`` = max(65,536, longest length), fp32, seed 0. Each length runs in a fresh
subprocess (so its peak RSS is its own): ``dsv3.LLM(model, max_num_batched_tokens=--chunk,
max_num_seqs=1, max_model_len=length + 1)`` after a 64-token warm-up on a throwaway engine, one prompt of ``length``
random tokens with ``max_tokens=1`` (prefill in chunks of ``--chunk`` tokens, logits of the last only).
``--kernel online|flash`` picks the blocked attention kernel of the prompt chunks (the eager online
softmax, the engine's default, or torch's fused CPU flash kernel per key block), for A/B runs.

Reported per length:

- ``wall_s`` and ``cpu_s`` (process CPU time) of that generate call. On a shared machine the CPU
  time is the steadier number (other processes take turns on the cores; CPU time counts only ours).
- ``peak_rss_delta_bytes``: peak RSS (``VmHWM``, reset through ``/proc/self/clear_refs`` where the
  kernel allows, else ``ru_maxrss``) while building the engine and prefilling, minus the RSS with the
  model built and warmed up: the engine's latent cache plus the working set.
- ``latent_cache_bytes``: what the prompt's latents occupy (``length x layers x (r + rope) x 4``), and
  ``cache_allocated_bytes`` (the engine's whole cache, its MTP layer and scratch block included).
- FLOPs (multiply-adds count 2), the *floor* the issue measures against:

      weights   = 2 * (matmul_params - vocab*hidden) * n + 2 * vocab*hidden
                  (active weight matrices per token from dsv3.accounting.flops_per_token; the head runs
                  for the last position only)
      attention = L * 2 * H * (qk_head_dim + v_head_dim) * n (n + 1) / 2
                  (QK^T and PV per head over the causal pairs, the cheapest exact form)
      floor     = weights + attention

  and, separately, what chunking adds on top: each chunk decompresses the per-head K/V of every key
  it attends over again, ``L * 2 * r * H * (nope + v) * (sum over chunks of context - n)``
  (``rework_flops``; the floor already holds one decompression per key in ``weights``).
- ``gemm_peak_flops``: a measured fp32 GEMM peak (best of 1024^3 matmuls, CPU time) in the same
  process and thread count, just before the prefill; ``floor_s = floor / peak`` and
  ``time_over_floor = cpu_s / floor_s`` (the issue's goal: <= 2).

Writes a JSON list and, with ``--plot``, a two-panel figure (time and memory vs length, log-log).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

WARMUP_TOKENS = 64


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS; False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_bytes(reset_ok: bool) -> int:
    if reset_ok:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def gemm_peak(torch, size: int = 1024, repeats: int = 7) -> float:
    """Best fp32 GEMM rate (FLOP/s of process CPU time) of ``size^3`` matmuls at the current threads."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.process_time()
        a @ b
        best = min(best, time.process_time() - t0)
    return 2 * size ** 3 / best


def floor_flops(config, n: int, chunk: int) -> dict:
    """The FLOP floor of prefilling ``n`` tokens (module docstring) and what chunking adds."""
    from dsv3.accounting import flops_per_token
    c = config
    head = c.vocab_size * c.hidden_size
    weights = 2 * (flops_per_token(c, n)["matmul_params"] - head) * n + 2 * head
    L, H = c.num_hidden_layers, c.num_attention_heads
    attention = L * 2 * H * (c.qk_head_dim + c.v_head_dim) * n * (n + 1) // 2
    ends = list(range(chunk, n, chunk)) + [n]
    rework = L * 2 * c.kv_lora_rank * H * (c.qk_nope_head_dim + c.v_head_dim) * (sum(ends) - n)
    return {"weights_flops": weights, "attention_flops": attention, "floor_flops": weights + attention,
            "rework_flops": rework}


def run_one(n: int, chunk: int, threads: int, attention_block: int, max_pos: int, kernel: str = "online") -> dict:
    """One length, in this process (the parent starts a fresh one per length)."""
    import functools
    import torch
    torch.set_num_threads(threads)
    import dsv3
    from dsv3.config import preset
    from dsv3.model import Transformer
    from dsv3.model.mla import MLA
    # An A/B switch for this process only: every prompt chunk's blocked attention takes this kernel.
    MLA.attend_blocks = functools.partialmethod(MLA.attend_blocks, kernel=kernel)

    peak = gemm_peak(torch)
    torch.manual_seed(0)
    cfg = preset("tiny")
    cfg.max_position_embeddings = max_pos
    model = Transformer(cfg).eval()
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist()
    warm = torch.randint(0, cfg.vocab_size, (WARMUP_TOKENS,), generator=g).tolist()
    params = dsv3.SamplingParams(temperature=0, max_tokens=1)
    # Warm up on a throwaway engine: the one-off costs of a first forward (lazily imported modules,
    # the math libraries' buffers) are not the prefill's; the real engine's cache is.
    dsv3.LLM(model, max_num_batched_tokens=chunk, max_num_seqs=1, max_model_len=2 * WARMUP_TOKENS).generate(
        [warm], params)
    gc.collect()
    rss0 = _rss_bytes()
    reset_ok = _reset_peak()
    llm = dsv3.LLM(model, max_num_batched_tokens=chunk, max_num_seqs=1, max_model_len=n + 1)
    llm.runner.attention_block = attention_block
    w0, c0 = time.perf_counter(), time.process_time()
    out = llm.generate([prompt], params)
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    peak_rss = _peak_bytes(reset_ok)
    L = cfg.num_hidden_layers
    fl = floor_flops(cfg, n, chunk)
    floor_s = fl["floor_flops"] / peak
    return {
        "tokens": n, "chunk": chunk, "threads": threads, "attention_block": attention_block, "kernel": kernel,
        "max_position_embeddings": max_pos, "wall_s": wall, "cpu_s": cpu,
        "tokens_per_s_wall": n / wall, "peak_rss_delta_bytes": peak_rss - rss0,
        "peak_rss_reset": reset_ok, "latent_cache_bytes": n * L * cfg.latent_dim * 4,
        "cache_allocated_bytes": llm.cache.kv.numel() * llm.cache.kv.element_size(),
        **fl, "gemm_peak_flops": peak, "floor_s": floor_s, "time_over_floor": cpu / floor_s,
        "time_over_floor_wall": wall / floor_s, "achieved_fraction_of_peak": floor_s / cpu,
        "first_token": out[0].token_ids[0],
    }


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n = [r["tokens"] for r in rows]
    mb = 1 / 2 ** 20
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    a.loglog(n, [r["cpu_s"] for r in rows], "o-", label="prefill (CPU time)")
    a.loglog(n, [r["wall_s"] for r in rows], "s:", label="prefill (wall)")
    a.loglog(n, [r["floor_s"] for r in rows], "k--", label="FLOP floor / measured GEMM peak")
    a.loglog(n, [2 * r["floor_s"] for r in rows], "k:", alpha=0.5, label="2x floor (goal)")
    a.set_xlabel("prompt tokens"), a.set_ylabel("seconds"), a.set_title("time")
    a.legend(fontsize=8)
    b.loglog(n, [r["peak_rss_delta_bytes"] * mb for r in rows], "o-", label="peak RSS delta")
    b.loglog(n, [r["latent_cache_bytes"] * mb for r in rows], "k--", label="latent cache of the prompt")
    b.loglog(n, [r["cache_allocated_bytes"] * mb for r in rows], "k:", alpha=0.5, label="engine cache allocated")
    b.set_xlabel("prompt tokens"), b.set_ylabel("MiB"), b.set_title("memory")
    b.legend(fontsize=8)
    r0 = rows[0]
    fig.suptitle(f"dsv3.LLM long prefill, random tiny, chunk {r0['chunk']}, {r0['threads']} thread(s)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", default="4096,16384,65536", help="comma-separated prompt lengths")
    ap.add_argument("--chunk", type=int, default=1024, help="max_num_batched_tokens (prefill chunk)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--attention-block", type=int, default=512, help="cached positions per key block")
    ap.add_argument("--kernel", default="online", choices=["online", "flash"],
                    help="blocked attention kernel of the prompt chunks (online: the eager online softmax, the "
                         "engine's default; flash: torch's fused CPU flash kernel per key block)")
    ap.add_argument("--json", type=Path, help="write the rows here")
    ap.add_argument("--plot", type=Path, help="write the figure here (PNG)")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)  # child mode: one length, JSON on stdout
    args = ap.parse_args(argv)
    lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    if not lengths or min(lengths) <= WARMUP_TOKENS:
        raise SystemExit(f"--lengths must be integers > {WARMUP_TOKENS}")
    max_pos = max(65536, max(lengths))
    if args.one is not None:
        print(json.dumps(run_one(args.one, args.chunk, args.threads, args.attention_block, max_pos, args.kernel)))
        return 0
    rows = []
    for n in lengths:
        cmd = [sys.executable, __file__, "--one", str(n), "--lengths", args.lengths, "--chunk", str(args.chunk),
               "--threads", str(args.threads), "--attention-block", str(args.attention_block), "--kernel", args.kernel]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode:
            sys.stderr.write(res.stderr)
            raise SystemExit(f"length {n} failed (exit {res.returncode})")
        row = json.loads(res.stdout.strip().splitlines()[-1])
        row["load_average"] = list(os.getloadavg())
        rows.append(row)
        print(f"{n:>7} tokens  {args.kernel:<6}  wall {row['wall_s']:8.2f} s  cpu {row['cpu_s']:8.2f} s  floor {row['floor_s']:7.2f} s  "
              f"x{row['time_over_floor']:.2f}  peak RSS +{row['peak_rss_delta_bytes'] / 2**20:7.1f} MiB  "
              f"(latent cache {row['latent_cache_bytes'] / 2**20:.1f} MiB)", flush=True)
        if args.json:  # after every length, so a long run leaves its finished rows behind
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(rows, indent=1))
    if args.plot:
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
