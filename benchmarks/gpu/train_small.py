"""Tokens/s and model FLOPs utilization of `dsv3 train`'s step for the `small` preset on one GPU.

    PYTHONPATH=src python3 benchmarks/gpu/train_small.py          # JSON to $OUT/train_small.json if OUT is set

What is timed (bf16 autocast, as `dsv3 train` runs on CUDA): the trainer's own step -- forward with
MTP (``compute_losses``: LM + lambda * MTP + sequence-wise balance loss), backward, gradient clipping,
AdamW (the trainer's optimizer) and the aux-loss-free bias update -- on a random token batch, three ways
in the same process:

  plain         the single-device model, exactly the single-process trainer path;
  fsdp2-1gpu    the same model after ``parallelize()`` on a 1-rank NCCL group: FSDP2 with the bf16
                mixed-precision policy, global grad-norm clip and all-reduced expert counts, i.e. the
                code path of every rank of a multi-GPU run, minus the communication (one rank).
                The trainer's fused head + cross-entropy reads ``lm_head.weight`` directly, which a
                sharded root doesn't allow, so this line computes full logits + F.cross_entropy:
                the ratio to ``plain`` includes that difference;
  transformers  the peer: ``dsv3 bench train``'s step of transformers' DeepseekV3ForCausalLM on the
                same shape without MTP, beside ours without MTP (its own ratio).

MFU = tokens/s x training FLOPs/token (``dsv3.accounting.flops_per_token``: 3 x forward, active
weights only, attention over the full context -- the PaLM / nanochat convention -- MTP included when
the step runs it) / the GPU's dense bf16 peak (H100 SXM / H200: 989 TFLOP/s, H100 PCIe: 756).
Meant to finish well under 5 minutes on an H100 (written without a GPU: not run yet).
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import sys
import time

import torch

BATCH, SEQ = 8, 1024
WARMUP, STEPS = 3, 10
PEAK_BF16 = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}


def peak_flops(name: str) -> float | None:
    for key, value in PEAK_BF16.items():  # most specific first
        if key in name:
            return value
    return None


def trainer_step_runner(model, dp=None):
    """One `dsv3 train` optimizer step as a closure; ``dp``: the ParallelTraining of the FSDP2 variant."""
    from dsv3.train import balance
    from dsv3.train.optim import build_optimizer
    from dsv3.train.trainer import TrainConfig, _autocast, compute_losses

    cfg = TrainConfig(preset="small")
    device = next(model.parameters()).device
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay)
    routers = balance.routers(model)
    gen = torch.Generator().manual_seed(0)
    window = torch.randint(0, model.config.vocab_size, (BATCH, SEQ + 1), generator=gen).to(device)

    def step() -> float:
        with _autocast(device):
            losses = compute_losses(model, window, cfg)
        losses["loss"].backward()
        sums = {"loss": float(losses["loss"].detach())}
        counts = {n: r.last_counts for n, r in routers}
        if dp is None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        else:
            sums, _, counts = dp.reduce_step(sums, True, counts)
            dp.clip_grad_norm(model, cfg.grad_clip)
        optimizer.step()
        for n, r in routers:
            balance.update_bias(r, counts[n], cfg.bias_update_rate)
        optimizer.zero_grad(set_to_none=True)
        return sums["loss"]

    return step


def time_steps(step) -> dict:
    for _ in range(WARMUP):
        step()
    torch.cuda.synchronize()
    times, loss = [], None
    for _ in range(STEPS):
        t0 = time.perf_counter()
        loss = step()                     # float(loss) syncs, as the trainer's logging does
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {"median_step_s": med, "tokens_per_s": BATCH * SEQ / med, "last_loss": loss,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    if not torch.cuda.is_available():
        print("train_small.py needs a CUDA GPU", file=sys.stderr)
        return 1
    from dsv3 import Transformer, preset
    from dsv3.accounting import flops_per_token

    config = preset("small")
    gpu = torch.cuda.get_device_name(0)
    peak = peak_flops(gpu)
    fl = flops_per_token(config, seq_len=SEQ)
    result = {"gpu": gpu, "torch": torch.__version__, "preset": "small", "batch": BATCH, "seq_len": SEQ,
              "tokens_per_step": BATCH * SEQ, "warmup": WARMUP, "steps": STEPS, "precision": "bf16 autocast",
              "flops_per_token_training_with_mtp": fl["training_with_mtp"], "flops_per_token_training": fl["training"],
              "peak_bf16_flops": peak, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "runs": {}}

    def record(name: str, r: dict, flops: int) -> None:
        if peak:
            r["mfu"] = r["tokens_per_s"] * flops / peak
        result["runs"][name] = r
        print(f"{name}: {r['tokens_per_s']:,.0f} tok/s" + (f", MFU {r['mfu']:.1%}" if peak else ""), flush=True)

    # 1. the single-process trainer step
    torch.manual_seed(0)
    model = Transformer(config).cuda()
    record("plain", time_steps(trainer_step_runner(model)), fl["training_with_mtp"])
    del model
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()

    # 2. the same step through the distributed code path (FSDP2 + bf16 policy) on a 1-rank NCCL group
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    try:
        from dsv3.train.parallel.dist import init_distributed
        from dsv3.train.parallel.training import ParallelTraining
        dp = ParallelTraining(init_distributed("cuda"), ep=1)
        torch.manual_seed(0)
        model = Transformer(config).cuda()
        dp.parallelize(model)
        record("fsdp2-1gpu", time_steps(trainer_step_runner(model, dp)), fl["training_with_mtp"])
        dp.ctx.close()
        del model
    except Exception as e:  # record, don't lose the other numbers
        result["runs"]["fsdp2-1gpu"] = {"error": f"{type(e).__name__}: {e}"}
        print(f"fsdp2-1gpu failed: {e}", flush=True)
    torch.cuda.empty_cache()

    # 3. the peer: transformers' DeepseekV3ForCausalLM beside ours, both without MTP
    try:
        from dsv3.bench.train import bench_train
        peer = bench_train(preset="small", batch_size=BATCH, seq_len=SEQ, steps=5, warmup=2, device="cuda")
        for r in peer["results"]:
            r = {k: v for k, v in r.items() if k != "step_s_all"}
            record(f"bench-train:{r['name']}", r, fl["training"])
        result["ratio_ours_vs_transformers"] = peer.get("ratio")
    except Exception as e:
        result["runs"]["transformers"] = {"error": f"{type(e).__name__}: {e}"}
        print(f"transformers peer failed: {e}", flush=True)

    plain, fsdp = result["runs"]["plain"], result["runs"].get("fsdp2-1gpu", {})
    if "tokens_per_s" in fsdp:
        result["ratio_fsdp2_vs_plain"] = fsdp["tokens_per_s"] / plain["tokens_per_s"]
    out = os.environ.get("OUT")
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "train_small.json"), "w") as f:
            json.dump(result, f, indent=2, default=str)

    print(f"\nsmall preset, batch {BATCH} x {SEQ} tokens, bf16 autocast, {gpu}, torch {torch.__version__}")
    print(f"{'run':<32} {'tokens/s':>10} {'MFU':>7} {'ms/step':>8} {'peak GiB':>9}")
    for name, r in result["runs"].items():
        if "error" in r:
            print(f"{name:<32} error: {r['error'][:80]}")
            continue
        ms = r.get("median_step_s", r.get("step_s_median", float("nan"))) * 1e3
        mfu = f"{r['mfu']:.1%}" if "mfu" in r else "n/a"
        mem = "n/a" if r.get("peak_memory_gib") is None else f"{r['peak_memory_gib']:.1f}"
        print(f"{name:<32} {r['tokens_per_s']:>10,.0f} {mfu:>7} {ms:>8.1f} {mem:>9}")
    if "ratio_fsdp2_vs_plain" in result:
        print(f"ratio fsdp2-1gpu / plain: {result['ratio_fsdp2_vs_plain']:.2f}x")
    if result.get("ratio_ours_vs_transformers"):
        print(f"ratio ours / transformers (no MTP): {result['ratio_ours_vs_transformers']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
