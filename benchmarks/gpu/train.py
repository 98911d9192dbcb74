"""`dsv3 bench train` on a GPU: one full training step (bf16 autocast), ours vs transformers, same run.

For each case, the steps of every implementation are interleaved (dsv3.bench.train.bench_train):
  dsv3            ours, loss as `dsv3 train` computes it (fused, chunked head + cross-entropy)
  dsv3[plain-ce]  ours with full logits + F.cross_entropy (as transformers computes its loss)
  dsv3[compiled]  ours with train/compile.py's regional torch.compile (compiled in the warmup steps)
  transformers    DeepseekV3ForCausalLM holding the same weights (sdpa attention, default experts)

Run from the repository root (about 3-4 minutes on an H100, most of it torch.compile and loading):
    PYTHONPATH=src python3 benchmarks/gpu/train.py
Writes train_gpu.json into $OUT when that variable is set; prints a summary table last.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

import torch

from dsv3.bench.train import bench_train

# (preset, batch, seq_len, timed steps, warmup steps): the CPU bench's shape, and the 0.5B preset.
CASES = [
    ("tiny", 8, 256, 10, 3),
    ("small", 8, 1024, 8, 3),
]


def main() -> int:
    if not torch.cuda.is_available():
        print("benchmarks/gpu/train.py needs a CUDA device", file=sys.stderr)
        return 2
    results, errors = [], {}
    for preset, batch, seq, steps, warmup in CASES:
        t0 = time.perf_counter()
        try:
            r = bench_train(preset=preset, batch_size=batch, seq_len=seq, steps=steps, warmup=warmup,
                            device="cuda", plain_ce=True, compile=True)
        except Exception as e:  # noqa: BLE001 - one failing case must not hide the others
            errors[preset] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
            continue
        r["wall_s"] = time.perf_counter() - t0
        results.append(r)
        print(f"[{preset}] done in {r['wall_s']:.0f} s", flush=True)

    out_dir = os.environ.get("OUT")
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "train_gpu.json"), "w") as f:
            json.dump({"results": results, "errors": errors}, f, indent=2)

    print(f"\ntraining step, bf16 autocast, AdamW (fused), {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    print(summary_table(results, errors))
    return 1 if errors else 0


def summary_table(results: list[dict], errors: dict[str, str]) -> str:
    """One row per implementation and case: tokens/s, ratio to transformers, first-step loss difference."""
    lines = [f"{'preset':<7} {'tokens/step':>11} {'implementation':<40} {'tokens/s':>11} {'vs transformers':>15} "
             f"{'|loss diff|':>11}"]
    for r in results:
        diffs = r.get("first_loss_abs_diff_by_impl", {})
        ratios = r.get("ratios", {})
        for x in r["results"]:
            name = x["name"]
            ratio = f"{ratios[name]:.2f}x" if name in ratios else "1.00x" if name.startswith("transformers") else "-"
            diff = f"{diffs[name]:.1e}" if name in diffs else "-"
            lines.append(f"{r['preset']:<7} {r['tokens_per_step']:>11,} {name:<40} {x['tokens_per_s']:>11,.0f} "
                         f"{ratio:>15} {diff:>11}")
    lines += [f"{preset}: FAILED: {err}" for preset, err in errors.items()]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
