"""Step time of every pipeline schedule on CPU (gloo) ranks, next to the theoretical bubble.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/pipeline_cpu.py [--world 2] [--steps 6] [--layers 8]

Trains a small random-text model (the tests' shape, widened: hidden 64, 8 layers, MoE, MTP 1) for a
few steps with ``dsv3 train``'s code path -- once in one process, then at ``--world`` pipeline ranks
for each schedule -- and prints the median step time of the steps after the first (which pays for
start-up) and the bubble fraction :func:`bubble_fraction` gives for that P and M. Each rank runs one
thread. What CPU ranks measure: whether a schedule's extra work (split backward, more P2P messages,
the embedding copy's all-reduce) costs time, and how the bubble shows when every rank has its own
core. They say nothing about compute/communication overlap on GPUs (gloo P2P is synchronous CPU
memory traffic), which is what DualPipe is for.
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import sys
import tempfile
import textwrap
from pathlib import Path

import torch

from dsv3.train.parallel.pipeline import SCHEDULES, bubble_fraction
from dsv3.train.trainer import TrainConfig, prepare_data, train


def config(cache: Path, out: Path, args, **over) -> TrainConfig:
    model = dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=args.layers,
                 num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=8,
                 qk_nope_head_dim=16, v_head_dim=16, n_routed_experts=8, n_group=2, topk_group=1,
                 num_experts_per_tok=2, first_k_dense_replace=1, num_nextn_predict_layers=1)
    base = dict(data=[str(cache / "corpus")], cache_dir=str(cache), out=str(out), max_steps=args.steps,
                batch_size=args.batch_size, seq_len=args.seq_len, lr=1e-3, warmup_steps=1, save_every=0,
                eval_every=0, eval_batches=1, vocab_size=512, tokenizer_train_mb=0.1, val_fraction=0.1, progress=False,
                sample_tokens=0, model_overrides=model, device="cpu")
    base.update(over)
    return TrainConfig(**base)


def median_step_s(out: Path, tokens: int) -> float:
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    tps = [r["tokens_per_s"] for r in recs if "kind" not in r][1:]   # the first step pays for start-up
    return statistics.median(tokens / t for t in tps)


def _worker(rank: int, world: int, cache: str, tmp: str, args) -> None:
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world)
    try:
        for s in SCHEDULES:
            train(config(Path(cache), Path(tmp) / s, args, pp=world, pp_schedule=s,
                         microbatches=args.microbatches), log=lambda *a: None)
    finally:
        dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--microbatches", type=int, default=None)
    args = p.parse_args()
    import torch.multiprocessing as mp
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        cache = tmp / "cache"
        (cache / "corpus").mkdir(parents=True)
        for mod in (textwrap, inspect, json, argparse):
            src = inspect.getsource(mod)
            for j in range(0, len(src), 3000):
                (cache / "corpus" / f"{mod.__name__}_{j}.txt").write_text(src[j:j + 3000])
        prepare_data(config(cache, tmp / "unused", args), cache)
        tokens = args.batch_size * args.seq_len
        train(config(cache, tmp / "single", args), log=lambda *a: None)
        mp.spawn(_worker, args=(args.world, str(cache), str(tmp), args), nprocs=args.world, join=True)
        single = median_step_s(tmp / "single", tokens)
        M = args.microbatches or min(m for m in range(2 * args.world, args.batch_size + 1) if args.batch_size % m == 0)
        print(f"torch {torch.__version__}, {args.layers} layers, hidden 64, batch {args.batch_size} x {args.seq_len}, "
              f"{args.steps} steps (median of steps 2..), 1 thread per rank; P = {args.world}, M = {M}")
        print(f"{'run':<14} {'step s':>8} {'vs 1 proc':>10} {'bubble (theory)':>16}")
        print(f"{'1 process':<14} {single:8.3f} {1.0:10.2f} {'-':>16}")
        for s in SCHEDULES:
            t = median_step_s(tmp / s, tokens)
            print(f"{s:<14} {t:8.3f} {t / single:10.2f} {bubble_fraction(s, args.world, M):16.1%}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
