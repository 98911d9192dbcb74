"""Training-step time of a preset at two MLA latent widths, in one process, rounds interleaved.

Issue 13 moved the `tiny` preset from kv_lora_rank 64 + qk_rope_head_dim 16 to the 512 + 64 that
vLLM and SGLang serve; this measures what that costs `make demo`. One step is what `dsv3 train` does:
`compute_losses` (LM + MTP + balance loss, fused head + cross-entropy), backward, AdamW, in fp32.
Both models are built from the same seed and take the same token batch. Each round times one step
of each width; the first round is a warm-up. On a shared machine the minimum over rounds is the
number least disturbed by other jobs, and the pairwise ratio (same round) the fairest comparison.

    python benchmarks/latent_width_step.py [--preset tiny] [--rounds 12] [--batch 1] [--threads 1]
        [--old 64,16] [--new 512,64]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from dsv3.config import preset
from dsv3.model import Transformer
from dsv3.train.optim import build_optimizer
from dsv3.train.trainer import TrainConfig, compute_losses


def widths(text: str) -> tuple[int, int]:
    kv, rope = (int(v) for v in text.split(","))
    return kv, rope


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--batch", type=int, default=1, help="sequences per step (the demo uses 8)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--old", type=widths, default=(64, 16), help="kv_lora_rank,qk_rope_head_dim")
    p.add_argument("--new", type=widths, default=(512, 64), help="kv_lora_rank,qk_rope_head_dim")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = TrainConfig(preset=args.preset, seq_len=args.seq_len)
    runs = {}
    for label, (kv, rope) in (("old", args.old), ("new", args.new)):
        torch.manual_seed(0)
        shape = preset(args.preset).replace(kv_lora_rank=kv, qk_rope_head_dim=rope, torch_dtype="float32")
        model = Transformer(shape).train()
        runs[f"{label} {kv}+{rope}"] = (model, build_optimizer(model, cfg.lr, cfg.weight_decay))
    batch = torch.randint(0, preset(args.preset).vocab_size, (args.batch, args.seq_len + 1))
    times: dict[str, list[float]] = {name: [] for name in runs}
    for i in range(args.rounds + 1):
        for name, (model, opt) in runs.items():
            t0 = time.perf_counter()
            compute_losses(model, batch, cfg)["loss"].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i:  # round 0 warms up
                times[name].append(time.perf_counter() - t0)
    for name, ts in times.items():
        print(f"{name:>12}: min {min(ts) * 1e3:8.1f} ms   median {statistics.median(ts) * 1e3:8.1f} ms/step")
    old, new = times.values()
    print(f"new/old: min {min(new) / min(old):.3f}, median {statistics.median(new) / statistics.median(old):.3f}, "
          f"pairwise median {statistics.median(n / o for n, o in zip(new, old)):.3f}")


if __name__ == "__main__":
    main()
