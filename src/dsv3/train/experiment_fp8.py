"""FP8 vs high-precision training (DeepSeek-V3 §3.3, Figure 10), reproduced at tiny scale.

The same model, data, seed and steps, trained twice:
  baseline   the trainer's own precision: bf16 autocast on a GPU, fp32 on CPU
  fp8        FP8 GEMMs in forward and backward (train/fp8.py), fp32 master weights, bf16 Adam moments
and compared step by step. The relative loss error ``|L_fp8 - L_base| / L_base`` is reported per step,
on loss curves smoothed over ``SMOOTH`` steps (the per-step noise of a tiny batch is not a precision
effect), and on the final validation loss. The paper reports < 0.25% (smoothed curves, 16B/230B models).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ..device import resolve_device
from .trainer import TrainConfig, train

SMOOTH = 10             # moving-average window (steps) for the smoothed curves
PAPER_REL_ERR = 0.0025  # DeepSeek-V3 report: relative loss error below 0.25%


def _moving_average(xs: list[float], w: int) -> list[float]:
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x
        if i >= w:
            acc -= xs[i - w]
        out.append(acc / min(i + 1, w))
    return out


def _records(run: Path) -> tuple[list[dict], list[dict]]:
    recs = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return [r for r in recs if "kind" not in r], [r for r in recs if r.get("kind") == "eval"]


def run_fp8_experiment(base: TrainConfig, out: str | Path, log=print) -> dict:
    """Train both arms under ``out/<arm>`` on one shared tokenizer/dataset; write table, JSON and plot."""
    out = Path(out)
    on_gpu = resolve_device(base.device).type == "cuda"
    for arm, use_fp8 in (("baseline", False), ("fp8", True)):
        cfg = dataclasses.replace(base, out=str(out / arm), cache_dir=str(out / "shared"), sample_tokens=0,
                                  save_every=0, fp8=use_fp8)
        log(f"== {arm} ({'FP8 GEMMs' if use_fp8 else 'bf16 autocast' if on_gpu else 'fp32'})")
        train(cfg, log=log)
    return summarize_fp8_experiment(out, base.fp8_block, "bf16 autocast" if on_gpu else "fp32")


def summarize_fp8_experiment(out: str | Path, fp8_block: int, baseline_precision: str) -> dict:
    """Compare the two finished runs in ``out``; writes ``fp8_results.{json,md}`` and ``fp8.png``."""
    out = Path(out)
    (base_steps, base_evals), (fp8_steps, fp8_evals) = _records(out / "baseline"), _records(out / "fp8")
    base_l, fp8_l = [r["loss"] for r in base_steps], [r["loss"] for r in fp8_steps]
    n = min(len(base_l), len(fp8_l))
    if n == 0:
        raise ValueError(f"{out}: no training steps to compare")
    signed = [(f - b) / b for b, f in zip(base_l[:n], fp8_l[:n])]
    rel = [abs(v) for v in signed]
    sb, sf = _moving_average(base_l[:n], SMOOTH), _moving_average(fp8_l[:n], SMOOTH)
    rel_smooth = [abs(f - b) / b for b, f in zip(sb, sf)]
    vb, vf = base_evals[-1]["val_loss"], fp8_evals[-1]["val_loss"]

    def tps(steps):
        last = [r["tokens_per_s"] for r in steps[-20:]]
        return sum(last) / len(last)

    result = {
        "steps": n, "baseline_precision": baseline_precision, "fp8_block": fp8_block, "smooth_window": SMOOTH,
        "rel_err_per_step_mean": sum(rel) / n, "rel_err_per_step_max": max(rel),
        # signed: > 0 where FP8's loss is higher; near 0 means the curves wander, not that FP8 is worse
        "rel_diff_signed_mean": sum(signed) / n,
        "rel_err_smoothed_mean": sum(rel_smooth) / n, "rel_err_smoothed_max": max(rel_smooth),
        # after the first SMOOTH steps the window is full
        "rel_err_smoothed_max_after_window": max(rel_smooth[SMOOTH:], default=None),
        "val_loss_baseline": vb, "val_loss_fp8": vf, "rel_err_val_loss": abs(vf - vb) / vb,
        "final_loss_baseline": base_l[n - 1], "final_loss_fp8": fp8_l[n - 1],
        "tokens_per_s_baseline": tps(base_steps), "tokens_per_s_fp8": tps(fp8_steps),
        "paper_rel_err": PAPER_REL_ERR,
    }
    (out / "fp8_results.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "fp8_results.md").write_text(format_report(result) + "\n")
    plot_fp8(out / "fp8.png", base_l[:n], fp8_l[:n], rel, rel_smooth, baseline_precision)
    return result


def format_report(r: dict) -> str:
    def pct(v):
        return "n/a" if v is None else f"{100 * v:.3f}%"
    return "\n".join([
        f"| FP8 vs {r['baseline_precision']} ({r['steps']} steps, block {r['fp8_block']}) | value |",
        "|---|---|",
        f"| relative loss error, smoothed over {r['smooth_window']} steps: mean | {pct(r['rel_err_smoothed_mean'])} |",
        f"| relative loss error, smoothed: max (full windows) | {pct(r['rel_err_smoothed_max_after_window'])} |",
        f"| relative loss error per step: mean / max | {pct(r['rel_err_per_step_mean'])} / {pct(r['rel_err_per_step_max'])} |",
        f"| signed mean (FP8 - baseline) / baseline per step | {pct(r['rel_diff_signed_mean'])} |",
        f"| final val loss: baseline / fp8 (relative error) | {r['val_loss_baseline']:.4f} / {r['val_loss_fp8']:.4f} "
        f"({pct(r['rel_err_val_loss'])}) |",
        f"| tokens/s: baseline / fp8 | {r['tokens_per_s_baseline']:,.0f} / {r['tokens_per_s_fp8']:,.0f} |",
        f"| paper (DeepSeek-V3, 16B and 230B) | < {pct(r['paper_rel_err'])} |",
    ])


def plot_fp8(path: Path, base: list[float], fp8: list[float], rel: list[float], rel_smooth: list[float],
             baseline_name: str) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    steps = list(range(1, len(base) + 1))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    axes[0].plot(steps, base, lw=1, label=baseline_name)
    axes[0].plot(steps, fp8, lw=1, label="FP8", alpha=0.8)
    axes[0].set_title("training loss"), axes[0].set_xlabel("step"), axes[0].legend()
    axes[1].plot(steps, [100 * v for v in rel], lw=0.8, alpha=0.5, label="per step")
    axes[1].plot(steps, [100 * v for v in rel_smooth], lw=1.5, label=f"smoothed ({SMOOTH} steps)")
    axes[1].axhline(100 * PAPER_REL_ERR, color="k", ls="--", lw=1, label="paper bound 0.25%")
    axes[1].set_title(f"relative loss error FP8 vs {baseline_name} (%)"), axes[1].set_xlabel("step")
    axes[1].legend()
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
