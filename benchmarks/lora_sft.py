"""LoRA / QLoRA vs full SFT on the demo model: trainable weights, peak RSS, step time, sort-task accuracy.

    OMP_NUM_THREADS=1 python benchmarks/lora_sft.py [--base runs/tiny/final] [--out runs/lora-bench]
        [--steps 150] [--arms full,lora8,lora16,qlora16] [--no-eval]
    OMP_NUM_THREADS=1 python benchmarks/lora_sft.py --ab 5      # step times, the arms interleaved

Each arm is one ``dsv3 sft`` run (the post-training demo's SFT stage: its synthetic sort data, held-out
problems removed, batch 16 x 128 tokens, same seed) in its own process; its peak resident set is sampled
every 20 ms during the run (and the growth over the process before the model was loaded); the step time is the median over steps 4.. of ``tokens / tokens_per_s`` from ``metrics.jsonl``.
Then the demo's evaluation: greedy accuracy on its 100 held-out problems (``dsv3.eval.tasks.task_accuracy``)
of the full model, or of base + adapter merged (``merge_adapter``). Writes ``OUT/lora_bench.json`` and
prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ARMS = {  # name -> SFT settings beyond the demo's
    "full": {"lr": 1e-3},
    "lora8": {"lr": 5e-3, "lora_rank": 8, "lora_targets": "q,kv,o,shared,experts"},
    "lora16": {"lr": 5e-3, "lora_rank": 16, "lora_targets": "q,kv,o,shared,experts"},
    "qlora16": {"lr": 5e-3, "lora_rank": 16, "lora_targets": "q,kv,o,shared,experts", "lora_base_dtype": "int8"},
    # PEFT's modules_to_save: the embedding and head trained whole (the new chat tokens' rows)
    "lora16eh": {"lr": 5e-3, "lora_rank": 16, "lora_targets": "q,kv,o,shared,experts", "lora_modules_to_save": "embed,head"},
}
BASELINE = {"lora_modules_to_save": ""}  # LoRA arms without the key: the old behaviour, whatever the default


def rss_mb() -> float:
    """This process's resident set now (MB), from /proc."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


class RSSPeak:
    """The largest resident set seen while the block runs, sampled every 20 ms by a thread (MB)."""

    def __enter__(self):
        import threading
        self.mb, self.stop = rss_mb(), threading.Event()

        def sample():
            while not self.stop.wait(0.02):
                self.mb = max(self.mb, rss_mb())
        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.mb = max(self.mb, rss_mb())


def run_arm(name: str, base: Path, out: Path, steps: int, evaluate: bool = True) -> dict:
    """One arm in this process: SFT, then the held-out accuracy; returns its measurements."""
    import torch

    from dsv3.checkpoint import load_pretrained
    from dsv3.eval.tasks import task_accuracy
    from dsv3.post.demo import DemoConfig
    from dsv3.post.sft import SFTConfig, sft
    from dsv3.tasks import load_task, problems
    from dsv3.tokenizer import Tokenizer
    from dsv3.lora import merge_adapter

    demo = DemoConfig()
    task = load_task(demo.task)
    data = out / "sft_data.jsonl"
    if not data.exists():  # the demo's data: its seeds, held-out problems removed
        heldout = {p.prompt for p in problems(task, demo.eval_problems, demo.seed + 1)}
        train = [p for p in problems(task, demo.sft_examples, demo.seed + 2) if p.prompt not in heldout]
        data.write_text("".join(json.dumps(p.sft_record()) + "\n" for p in train), encoding="utf-8")
    settings = dict(model=str(base), data=[str(data)], out=str(out / name), max_steps=steps,
                    batch_size=demo.sft_batch_size, seq_len=128, seed=demo.seed, save_every=0,
                    eval_every=0, progress=False, **({**BASELINE, **ARMS[name]} if "lora_rank" in ARMS[name] else ARMS[name]))
    rss0 = rss_mb()  # torch and the data loaded, no model yet
    t0 = time.perf_counter()
    with RSSPeak() as peak:
        summary = sft(SFTConfig(**settings), log=lambda *a: None)
    wall = time.perf_counter() - t0
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    recs = [json.loads(ln) for ln in (out / name / "metrics.jsonl").read_text().splitlines()]
    steps_recs = [r for r in recs if "kind" not in r]
    tokens = demo.sft_batch_size * 129
    step_s = statistics.median(tokens / r["tokens_per_s"] for r in steps_recs[3:])
    final = Path(summary["final"])
    if "lora_rank" in ARMS[name]:
        model = merge_adapter(load_pretrained(base, dtype="float32"), final)
        trainable = summary["trainable_params"]
    else:
        model = load_pretrained(final, dtype="float32")
        trainable = sum(p.numel() for p in model.parameters())
    acc = (task_accuracy(model, Tokenizer.load(base), task, demo.eval_problems, seed=demo.seed + 1,
                         max_new_tokens=demo.max_new_tokens) if evaluate else {"accuracy": None, "format_rate": None})
    saved = sum(f.stat().st_size for f in final.iterdir() if f.suffix == ".safetensors")
    return {"arm": name, **ARMS[name], "steps": steps, "trainable_params": trainable, "peak_rss_mb": peak_rss_mb,
            "rss_before_mb": rss0, "sft_peak_rss_mb": peak.mb, "sft_rss_growth_mb": peak.mb - rss0,
            "step_s": step_s, "sft_wall_s": wall, "first_loss": summary["first_loss"], "last_loss": summary["last_loss"],
            "val_loss": summary.get("val_loss"), "val_token_acc": summary.get("val_token_acc"),
            "accuracy": acc["accuracy"], "format_rate": acc["format_rate"], "saved_mb": saved / 2**20,
            "threads": torch.get_num_threads()}


def step_ab(base: Path, out: Path, rounds: int) -> dict:
    """Step time of every arm in one process, the arms interleaved round by round so that a loaded
    machine slows them alike: one SFT step each (forward, the SFT losses, backward, AdamW) on the same
    demo batch; returns the median seconds per arm (after one warm-up round)."""
    import torch

    from dsv3.checkpoint import load_pretrained
    from dsv3.lora import apply_lora, lora_parameters
    from dsv3.post.chat_data import pack, read_chat_jsonl
    from dsv3.post.sft import SFTConfig, sft_losses
    from dsv3.tokenizer import Tokenizer

    tok = Tokenizer.load(base)
    rows = pack(read_chat_jsonl([str(out / "sft_data.jsonl")], tok)[:200], 128, tok.pad_id)
    batch = rows.rows(list(range(16)))
    models, opts = {}, {}
    for name, arm in ARMS.items():
        torch.manual_seed(0)
        m = load_pretrained(base, dtype=torch.float32).train()
        if "lora_rank" in arm:
            apply_lora(m, arm["lora_rank"], targets=arm["lora_targets"], base_dtype=arm.get("lora_base_dtype", "fp32"))
            params = lora_parameters(m)
        else:
            params = list(m.parameters())
        models[name], opts[name] = m, torch.optim.AdamW(params, lr=arm["lr"], foreach=False)
    cfg = SFTConfig()
    times: dict[str, list[float]] = {n: [] for n in ARMS}
    for r in range(rounds + 1):
        for name, m in models.items():
            t0 = time.perf_counter()
            sft_losses(m, batch, cfg)["loss"].backward()
            opts[name].step()
            opts[name].zero_grad(set_to_none=True)
            if r:  # round 0 warms up (first-touch allocations, AdamW state)
                times[name].append(time.perf_counter() - t0)
    return {n: statistics.median(t) for n, t in times.items()}


def fmt(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="runs/tiny/final")
    ap.add_argument("--out", default="runs/lora-bench")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--no-eval", action="store_true", help="skip the held-out accuracy (timing and memory only)")
    ap.add_argument("--ab", type=int, default=0, metavar="ROUNDS",
                    help="instead: every arm's step time in one process, interleaved for ROUNDS rounds")
    ap.add_argument("--arm", default=None, help=argparse.SUPPRESS)  # internal: run one arm, print its JSON
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.ab:
        print(json.dumps({"step_s_interleaved": step_ab(Path(args.base), out, args.ab)}))
        return 0
    if args.arm:
        print(json.dumps(run_arm(args.arm, Path(args.base), out, args.steps, not args.no_eval)))
        return 0
    results = []
    for name in args.arms.split(","):
        proc = subprocess.run([sys.executable, __file__, "--arm", name, "--base", args.base, "--out", args.out,
                               "--steps", str(args.steps)] + (["--no-eval"] if args.no_eval else []),
                              capture_output=True, text=True)
        if proc.returncode:
            print(proc.stderr, file=sys.stderr)
            return proc.returncode
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
        (out / "lora_bench.json").write_text(json.dumps(results, indent=2) + "\n")
    print("| arm | trainable weights | peak RSS in SFT (MB) | growth over start (MB) | step (s) | loss first -> last "
          "| sort accuracy | format |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['arm']} (lr {r['lr']:g}) | {r['trainable_params']:,} | {r['sft_peak_rss_mb']:.0f} | "
              f"{r['sft_rss_growth_mb']:.0f} | {r['step_s']:.2f} | "
              f"{r['first_loss']:.3f} -> {r['last_loss']:.3f} | {fmt(r['accuracy'])} | {fmt(r['format_rate'])} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
