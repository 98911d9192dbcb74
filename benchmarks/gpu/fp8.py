"""FP8 on a GPU: block-scaled FP8 GEMM vs bf16 matmul on DeepSeek-V3 shapes, fast paths vs the
reference, and decode tokens/s of a V2-Lite-shaped random model with FP8 vs bf16 weights.

Run from the repository root (no installs needed; < 5 minutes on one H100):
    PYTHONPATH=src python benchmarks/gpu/fp8.py            # writes $OUT/fp8.json when OUT is set
Options: --quick (fewer shapes, no decode), --decode-layers N (default: all 27 of V2-Lite).
The last lines printed are a summary table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import torch

from dsv3 import fp8
from dsv3.kernels import fp8_gemm as G

# (name, N = out_features, K = in_features) of DeepSeek-V3 linear layers
V3_SHAPES = [
    ("expert gate/up 2048x7168", 2048, 7168),
    ("expert down 7168x2048", 7168, 2048),
    ("q_a_proj 1536x7168", 1536, 7168),
    ("q_b_proj 24576x1536", 24576, 1536),
    ("kv_a_proj 576x7168", 576, 7168),
    ("kv_b_proj 32768x512", 32768, 512),
    ("o_proj 7168x16384", 7168, 16384),
    ("dense gate/up 18432x7168", 18432, 7168),
]
TOKENS = [16, 128, 1024, 4096]


def bench(fn, warmup: int = 5, iters: int = 20) -> float:
    """Median seconds per call (CUDA events)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return times[len(times) // 2]


def gemm_section(shapes, tokens, backends, log) -> list[dict]:
    rows = []
    g = torch.Generator(device="cuda").manual_seed(0)
    for name, N, K in shapes:
        w = torch.randn(N, K, device="cuda", generator=g) * 0.02
        wq, ws = fp8.quantize_blockwise(w)
        w_bf16 = w.to(torch.bfloat16)
        for M in tokens:
            x = torch.randn(M, K, device="cuda", generator=g)
            x_bf16 = x.to(torch.bfloat16)
            xq, xs = fp8.quantize_tiles(x)
            flops = 2 * M * N * K
            row = {"shape": name, "M": M, "N": N, "K": K}
            t = bench(lambda: x_bf16 @ w_bf16.T)
            row["bf16_tflops"] = flops / t / 1e12
            row["bf16_ms"] = t * 1e3
            ref = None
            if M <= 128:  # the chunk-loop reference is slow; check correctness on the small-M cases
                ref = G.fp8_gemm_reference(xq, xs, wq, ws, out_dtype=torch.float32)
            for b in backends:
                try:
                    out = G.fp8_gemm(xq, xs, wq, ws, out_dtype=torch.bfloat16, backend=b)
                    t = bench(lambda: G.fp8_gemm(xq, xs, wq, ws, out_dtype=torch.bfloat16, backend=b))
                    row[f"{b}_tflops"] = flops / t / 1e12
                    row[f"{b}_ms"] = t * 1e3
                    row[f"{b}_speedup_vs_bf16"] = row["bf16_ms"] / row[f"{b}_ms"]
                    # with the on-the-fly 1x128 activation quantization, as FP8Linear runs it
                    t_q = bench(lambda: G.fp8_gemm(*fp8.quantize_tiles(x_bf16), wq, ws, backend=b))
                    row[f"{b}_with_act_quant_ms"] = t_q * 1e3
                    if ref is not None:
                        row[f"{b}_rel_err_vs_reference"] = float((out.float() - ref).norm() / ref.norm())
                except Exception as e:  # report and go on: one missing backend must not stop the run
                    row[f"{b}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            rows.append(row)
            log(json.dumps(row))
        del w, wq, ws, w_bf16
        torch.cuda.empty_cache()
    return rows


def decode_section(layers: int | None, batches, prompt_len: int, gen_len: int, log) -> list[dict]:
    """Greedy decode over the contiguous latent cache (absorbed MLA), bf16 weights then FP8 weights."""
    import dsv3
    from dsv3.quant import quantize_model
    cfg = dsv3.preset("v2-lite")
    if layers:
        cfg = cfg.replace(num_hidden_layers=layers)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    torch.set_default_dtype(torch.bfloat16)   # built in bf16 directly: 16B params in fp32 would not fit
    try:
        with torch.device("cuda"):
            model = dsv3.Transformer(cfg, max_seq_len=prompt_len + gen_len)
    finally:
        torch.set_default_dtype(torch.float32)
    model.to(torch.bfloat16).eval()
    for m in model.modules():   # keep the router's bias in fp32, as the checkpoints do
        if getattr(m, "e_score_correction_bias", None) is not None:
            m.e_score_correction_bias.data = m.e_score_correction_bias.data.float()
    log(f"built V2-Lite-shaped model ({cfg.num_hidden_layers} layers) in {time.perf_counter() - t0:.1f} s")
    rows = []

    def run(label):
        for B in batches:
            ids = torch.randint(0, cfg.vocab_size, (B, prompt_len), device="cuda")
            with torch.no_grad():
                def decode():
                    cache = model.new_cache(B, prompt_len + gen_len, dtype=torch.bfloat16)
                    logits = model(ids, cache=cache, absorb=True)
                    tok = logits[:, -1].argmax(-1, keepdim=True)
                    out = [tok]
                    for i in range(gen_len - 1):
                        logits = model(tok, start_pos=prompt_len + i, cache=cache, absorb=True)
                        tok = logits[:, -1].argmax(-1, keepdim=True)
                        out.append(tok)
                    return torch.cat(out, 1)
                decode()  # warm-up (and backend self-checks)
                torch.cuda.synchronize()
                t = time.perf_counter()
                toks = decode()
                torch.cuda.synchronize()
                dt = time.perf_counter() - t
            weight_gb = sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 1e9
            row = {"weights": label, "batch": B, "gen_len": gen_len, "tokens_per_s": B * gen_len / dt,
                   "weight_gb": weight_gb, "peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9,
                   "tokens": toks[0, :16].tolist()}
            rows.append(row)
            log(json.dumps(row))

    run("bf16")
    with torch.no_grad():
        quantize_model(model)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    run("fp8")
    for r in rows[len(rows) // 2:]:   # greedy tokens: how many of the first 16 agree with bf16
        base = next(b for b in rows if b["weights"] == "bf16" and b["batch"] == r["batch"])
        r["first16_tokens_equal_to_bf16"] = sum(a == b for a, b in zip(r["tokens"], base["tokens"]))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="3 shapes, 2 token counts, no decode")
    ap.add_argument("--decode-layers", type=int, default=None, help="layers of the V2-Lite model (default: 27)")
    ap.add_argument("--gen-len", type=int, default=64, help="decode steps")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 1
    log = print
    result = {"torch": torch.__version__, "device": torch.cuda.get_device_name(),
              "capability": list(torch.cuda.get_device_capability()),
              "has_F_scaled_mm": hasattr(torch.nn.functional, "scaled_mm")}
    try:
        import triton
        result["triton"] = triton.__version__
    except ImportError:
        result["triton"] = None
    log(json.dumps(result))
    result["auto_backend"] = {f"bn={bn},{dt}": G.select_backend(torch.device("cuda"), 128, bn, dt)
                              for bn in (128, 1) for dt in (torch.bfloat16, torch.float32)}
    log("auto backend: " + json.dumps(result["auto_backend"]))
    shapes = V3_SHAPES[:3] + V3_SHAPES[4:5] if args.quick else V3_SHAPES
    tokens = [16, 1024] if args.quick else TOKENS
    result["gemm"] = gemm_section(shapes, tokens, ["scaled_mm", "triton"], log)
    if not args.quick:
        try:
            result["decode"] = decode_section(args.decode_layers, [1, 16], 32, args.gen_len, log)
        except Exception:
            result["decode_error"] = traceback.format_exc()[-2000:]
            log(result["decode_error"])
    out = os.environ.get("OUT")
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "fp8.json"), "w") as f:
            json.dump(result, f, indent=2)

    print("\n== FP8 block-scaled GEMM vs bf16 matmul (TFLOP/s; rel err vs reference at M<=128)")
    print(f"{'shape':28s} {'M':>5s} {'bf16':>7s} {'scaled_mm':>10s} {'triton':>8s} {'best/bf16':>9s} {'rel err':>9s}")
    for r in result["gemm"]:
        fast = [r.get(f"{b}_tflops") for b in ("scaled_mm", "triton") if r.get(f"{b}_tflops")]
        errs = [r.get(f"{b}_rel_err_vs_reference") for b in ("scaled_mm", "triton")
                if r.get(f"{b}_rel_err_vs_reference") is not None]

        def f(v):
            return f"{v:.1f}" if v else "fail"
        print(f"{r['shape']:28s} {r['M']:5d} {r['bf16_tflops']:7.1f} {f(r.get('scaled_mm_tflops')):>10s} "
              f"{f(r.get('triton_tflops')):>8s} {(max(fast) / r['bf16_tflops'] if fast else 0):9.2f} "
              f"{(max(errs) if errs else float('nan')):9.1e}")
    for r in result.get("decode", []):
        print(f"decode V2-Lite-shaped {r['weights']:4s} batch {r['batch']:2d}: {r['tokens_per_s']:8.1f} tok/s, "
              f"weights {r['weight_gb']:.1f} GB, peak {r['peak_mem_gb']:.1f} GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
