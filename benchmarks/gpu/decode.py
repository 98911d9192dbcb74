"""GPU decode fast path, in one run (< 10 min on an H100): run as ``PYTHONPATH=src python benchmarks/gpu/decode.py``.

1. The Triton paged MLA decode kernel against the pure-PyTorch reference: max error, and time per
   call with the cache bandwidth it reaches (V3 shape: 128 heads, r=512, rope=64; V2-Lite: 16 heads).
2. The engine on a random V2-Lite-shaped model in bf16, batch 1 and 8: eager vs CUDA graphs vs
   ``compile=True`` (compiled steps captured in CUDA graphs; tokens/s, greedy tokens equal) and the fraction of the memory-bandwidth roofline
   (bytes a decode step must move / step time, against measured copy bandwidth and the datasheet).
3. The GPU-marked unit tests of this area (pytest -m gpu); ``--no-tests`` leaves them out.

Writes ``decode.json`` into ``$OUT`` when set; the summary table is printed last.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback

import torch

from dsv3.bench.decode import bench_decode_roofline, format_bench_roofline
from dsv3.kernels.mla_decode import mla_decode

results: dict = {"torch": torch.__version__, "device": torch.cuda.get_device_name(), "kernel": [], "engine": []}


def _time_cuda(fn, iters: int = 50) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters / 1000          # seconds per call


def kernel_case(name: str, heads: int, batch: int, context: int, r: int = 512, rope: int = 64, block: int = 64):
    g = torch.Generator(device="cuda").manual_seed(0)
    blocks_per = -(-context // block)
    num_blocks = batch * blocks_per + 1
    kv = torch.randn(num_blocks * block, r + rope, device="cuda", generator=g).to(torch.bfloat16)
    tables = torch.randperm(num_blocks - 1, device="cuda", generator=g)[: batch * blocks_per]
    tables = tables.view(batch, blocks_per).to(torch.int32)
    lens = torch.full((batch,), context, device="cuda", dtype=torch.int32)
    q = torch.randn(batch, heads, r + rope, device="cuda", generator=g).to(torch.bfloat16)
    scale = (128 + 64) ** -0.5
    ref = mla_decode(q.float(), kv.float(), tables, lens, scale, r, block, backend="reference")
    out = mla_decode(q, kv, tables, lens, scale, r, block, backend="triton")
    err = (out.float() - ref).abs().max().item()
    t_tri = _time_cuda(lambda: mla_decode(q, kv, tables, lens, scale, r, block, backend="triton"))
    t_ref = _time_cuda(lambda: mla_decode(q, kv, tables, lens, scale, r, block, backend="reference"), iters=10)
    cache_bytes = batch * context * (r + rope) * 2
    row = {"case": name, "heads": heads, "batch": batch, "context": context, "max_abs_err_vs_fp32_ref": err,
           "triton_us": 1e6 * t_tri, "reference_us": 1e6 * t_ref, "speedup": t_ref / t_tri,
           "cache_gb_per_s": cache_bytes / t_tri / 1e9}
    results["kernel"].append(row)
    print(f"kernel {name:22s} err {err:.2e}  triton {1e6 * t_tri:8.1f} us  reference {1e6 * t_ref:9.1f} us  "
          f"cache read {row['cache_gb_per_s']:7.0f} GB/s", flush=True)


def main() -> int:
    t0 = time.time()
    for name, heads, batch, ctx in [("V3 b1 ctx4096", 128, 1, 4096), ("V3 b8 ctx4096", 128, 8, 4096),
                                    ("V3 b64 ctx1024", 128, 64, 1024), ("V2-Lite b1 ctx4096", 16, 1, 4096),
                                    ("V2-Lite b32 ctx2048", 16, 32, 2048)]:
        try:
            kernel_case(name, heads, batch, ctx)
        except Exception as e:  # noqa: BLE001 - report and go on
            results["kernel"].append({"case": name, "error": f"{type(e).__name__}: {e}"})
            traceback.print_exc()
    for batch in (1, 8):
        try:
            r = bench_decode_roofline("v2-lite", "bfloat16", batch=batch, prompt_len=256, gen_len=64, repeats=3,
                                      compile=True)
            results["engine"].append(r)
            print(format_bench_roofline(r), flush=True)
        except Exception as e:  # noqa: BLE001
            results["engine"].append({"batch": batch, "error": f"{type(e).__name__}: {e}"})
            traceback.print_exc()
        torch.cuda.empty_cache()
    tests = None
    if "--no-tests" not in sys.argv:
        tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/test_kernels_mla.py",
                                "tests/test_engine_fast.py"], capture_output=True, text=True, timeout=400)
        results["gpu_tests"] = {"returncode": tests.returncode, "tail": tests.stdout[-2000:] + tests.stderr[-2000:]}
    results["wall_s"] = time.time() - t0

    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "decode.json"), "w") as f:
            json.dump(results, f, indent=2)
    print("\n==== summary: GPU decode fast path", results["device"], "torch", results["torch"])
    for k in results["kernel"]:
        if "error" in k:
            print(f"  kernel {k['case']:22s} ERROR {k['error'][:120]}")
        else:
            print(f"  kernel {k['case']:22s} err {k['max_abs_err_vs_fp32_ref']:.1e}  triton {k['triton_us']:8.1f} us  "
                  f"{k['speedup']:6.1f}x reference  {k['cache_gb_per_s']:6.0f} GB/s")
    for e in results["engine"]:
        if "error" in e:
            print(f"  engine batch {e['batch']}: ERROR {e['error'][:150]}")
            continue
        for x in e["results"]:
            ds = x["fraction_of_datasheet_bandwidth"]
            print(f"  v2-lite bf16 batch {e['batch']} {x['name']:12s} {x['step_ms_median']:7.2f} ms/step "
                  f"{x['tokens_per_s']:8.1f} tok/s  roofline {100 * x['fraction_of_measured_bandwidth']:5.1f}% of measured"
                  + (f", {100 * ds:5.1f}% of datasheet" if ds else ""))
        if "cuda_graphs_speedup" in e:
            print(f"  v2-lite bf16 batch {e['batch']} CUDA graphs {e['cuda_graphs_speedup']:.2f}x eager, captured "
                  f"{e['cuda_graphs_captured']}, tokens equal eager: {e['cuda_graphs_tokens_equal_eager']}")
        if "compiled_speedup_vs_eager" in e:
            print(f"  v2-lite bf16 batch {e['batch']} compiled {e['compiled_speedup_vs_eager']:.2f}x eager, captured "
                  f"{e.get('compiled_captured')}, sequences equal eager: "
                  f"{100 * e['compiled_tokens_equal_eager_fraction']:.0f}% (first differing token "
                  f"{e['compiled_first_token_difference']})")
    if tests is not None:
        print(f"  gpu tests: rc={tests.returncode}: {tests.stdout.strip().splitlines()[-1] if tests.stdout.strip() else ''}")
    print(f"  wall {results['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
