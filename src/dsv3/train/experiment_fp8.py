"""FP8 vs high-precision training (DeepSeek-V3 §3.3, Figure 10), reproduced at tiny scale.

The same model, data, seed and steps, trained twice:
  baseline   the trainer's own precision (``--dtype``; auto: bf16 autocast on a GPU or a CPU with bf16
             units, fp32 elsewhere)
  fp8        FP8 GEMMs in forward and backward (train/fp8.py), fp32 master weights, bf16 Adam moments
and compared step by step. The relative loss error ``|L_fp8 - L_base| / L_base`` is reported per step,
on loss curves smoothed over ``SMOOTH`` steps (the per-step noise of a tiny batch is not a precision
effect), and on the final validation loss. The paper reports < 0.25% (smoothed curves, 16B/230B models).

The noise floor: a third run, ``floor``, in the baseline precision at seed + 1 (another init and
data order), compared with ``baseline`` by exactly the same formulas. An FP8 error below the floor
is indistinguishable from the difference between two equally good high-precision runs.

The shape (:class:`FP8ExperimentConfig`): hidden 1024 by default, so the K dimension of the q/kv
down-projections and of the MLP/expert up-projections spans 1024 / 128 = 8 blocks -- FP8's
per-block error averages over 8 independently scaled blocks as in the paper's models (7168 / 128 =
56 there), where hidden 256 gave only 2. Few layers keep the three runs in minutes on 2 CPU cores.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..device import resolve_device
from ..knobs import knob, positive_int
from .precision import train_dtype
from .trainer import TrainConfig, train

SMOOTH = 10             # moving-average window (steps) for the smoothed curves
PAPER_REL_ERR = 0.0025  # DeepSeek-V3 report: relative loss error below 0.25%


@dataclass
class FP8ExperimentConfig:
    """The shape of ``dsv3 experiment fp8`` (ModelConfig fields, applied over the preset unless
    ``--model-set`` names the same field) and whether to measure the noise floor.

    Sizes are multiples of the FP8 block (128) so no GEMM has a ragged last block.
    """

    hidden_size: int = knob(1024, "hidden size: K of the q/kv down- and MLP up-projections spans hidden / 128 "
                                  "FP8 blocks (default: %(default)s, 8 blocks)", type=positive_int)
    num_hidden_layers: int = knob(2, "layers (the first dense, the rest MoE)", type=positive_int)
    intermediate_size: int = knob(1024, "dense MLP width (K of its down-projection)", type=positive_int)
    moe_intermediate_size: int = knob(256, "width of each expert (K of its down-projection)", type=positive_int)
    num_attention_heads: int = knob(8, "attention heads (K of o_proj = heads * v_head_dim)", type=positive_int)
    q_lora_rank: int = knob(256, "q down-projection rank (K of q_b_proj)", type=positive_int)
    noise_floor: bool = knob(True, "skip the third run (baseline precision at seed + 1) that measures the noise "
                                   "floor of the relative loss error")

    def model_overrides(self) -> dict:
        """The ModelConfig fields this experiment sets."""
        d = {k: getattr(self, k) for k in ("hidden_size", "num_hidden_layers", "intermediate_size",
                                             "moe_intermediate_size", "num_attention_heads", "q_lora_rank")}
        d["num_key_value_heads"] = self.num_attention_heads   # MLA: one latent shared by every head
        return d


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


def run_fp8_experiment(base: TrainConfig, out: str | Path, exp: FP8ExperimentConfig | None = None,
                       log=print) -> dict:
    """Train the arms under ``out/<arm>`` on one shared tokenizer/dataset; write table, JSON and plot.

    ``exp`` (default :class:`FP8ExperimentConfig`) sets the shape; fields already in
    ``base.model_overrides`` (``--model-set``) win.
    """
    exp = exp or FP8ExperimentConfig()
    out = Path(out)
    # the baseline runs in the trainer's precision (--dtype; auto: bf16 on a GPU or a CPU with bf16 units)
    high = "bf16 autocast" if train_dtype(base.dtype, resolve_device(base.device)) == torch.bfloat16 else "fp32"
    overrides = {**exp.model_overrides(), **base.model_overrides}
    arms = [("baseline", False, base.seed), ("fp8", True, base.seed)]
    if exp.noise_floor:
        arms.append(("floor", False, base.seed + 1))
    for arm, use_fp8, seed in arms:
        cfg = dataclasses.replace(base, out=str(out / arm), cache_dir=str(out / "shared"), sample_tokens=0,
                                  save_every=0, fp8=use_fp8, seed=seed, model_overrides=overrides)
        log(f"== {arm} ({'FP8 GEMMs' if use_fp8 else high}, seed {seed})")
        train(cfg, log=log)
    result = summarize_fp8_experiment(out, base.fp8_block, high)
    result["model_overrides"] = overrides
    result["k_blocks_hidden"] = overrides["hidden_size"] / base.fp8_block
    (out / "fp8_results.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def _compare(base_l: list[float], other_l: list[float], base_v: float, other_v: float) -> dict:
    """The relative loss error of ``other`` against ``base``: per step, smoothed, final validation."""
    n = min(len(base_l), len(other_l))
    signed = [(f - b) / b for b, f in zip(base_l[:n], other_l[:n])]
    rel = [abs(v) for v in signed]
    sb, sf = _moving_average(base_l[:n], SMOOTH), _moving_average(other_l[:n], SMOOTH)
    rel_smooth = [abs(f - b) / b for b, f in zip(sb, sf)]
    return {
        "rel_err_per_step_mean": sum(rel) / n, "rel_err_per_step_max": max(rel),
        # signed: > 0 where the other run's loss is higher; near 0 means the curves wander
        "rel_diff_signed_mean": sum(signed) / n,
        "rel_err_smoothed_mean": sum(rel_smooth) / n, "rel_err_smoothed_max": max(rel_smooth),
        # after the first SMOOTH steps the window is full
        "rel_err_smoothed_max_after_window": max(rel_smooth[SMOOTH:], default=None),
        "rel_err_val_loss": abs(other_v - base_v) / base_v,
        "_rel": rel, "_rel_smooth": rel_smooth,
    }


def summarize_fp8_experiment(out: str | Path, fp8_block: int, baseline_precision: str) -> dict:
    """Compare the finished runs in ``out``; writes ``fp8_results.{json,md}`` and ``fp8.png``.

    ``out/floor`` (the noise-floor run) is optional: when present, ``floor`` holds the same metrics
    for it against ``baseline``.
    """
    out = Path(out)
    (base_steps, base_evals), (fp8_steps, fp8_evals) = _records(out / "baseline"), _records(out / "fp8")
    base_l, fp8_l = [r["loss"] for r in base_steps], [r["loss"] for r in fp8_steps]
    n = min(len(base_l), len(fp8_l))
    if n == 0:
        raise ValueError(f"{out}: no training steps to compare")
    vb, vf = base_evals[-1]["val_loss"], fp8_evals[-1]["val_loss"]
    cmp = _compare(base_l, fp8_l, vb, vf)
    rel, rel_smooth = cmp.pop("_rel"), cmp.pop("_rel_smooth")

    def tps(steps):
        last = [r["tokens_per_s"] for r in steps[-20:]]
        return sum(last) / len(last)

    result = {
        "steps": n, "baseline_precision": baseline_precision, "fp8_block": fp8_block, "smooth_window": SMOOTH,
        **cmp,
        "val_loss_baseline": vb, "val_loss_fp8": vf,
        "final_loss_baseline": base_l[n - 1], "final_loss_fp8": fp8_l[n - 1],
        "tokens_per_s_baseline": tps(base_steps), "tokens_per_s_fp8": tps(fp8_steps),
        "paper_rel_err": PAPER_REL_ERR, "floor": None,
    }
    floor_rel_smooth = None
    if (out / "floor" / "metrics.jsonl").exists():
        floor_steps, floor_evals = _records(out / "floor")
        floor_l = [r["loss"] for r in floor_steps]
        if floor_l and floor_evals:
            fc = _compare(base_l, floor_l, vb, floor_evals[-1]["val_loss"])
            fc.pop("_rel")
            floor_rel_smooth = fc.pop("_rel_smooth")
            result["floor"] = {**fc, "val_loss_floor": floor_evals[-1]["val_loss"],
                               "steps": min(len(base_l), len(floor_l))}
    (out / "fp8_results.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "fp8_results.md").write_text(format_report(result) + "\n")
    plot_fp8(out / "fp8.png", base_l[:n], fp8_l[:n], rel, rel_smooth, baseline_precision, floor_rel_smooth)
    return result


def format_report(r: dict) -> str:
    def pct(v):
        return "n/a" if v is None else f"{100 * v:.3f}%"
    f = r.get("floor") or {}
    floor = bool(f)

    def row(name: str, key: str) -> str:
        return f"| {name} | {pct(r[key])} |" + (f" {pct(f[key])} |" if floor else "")
    head = f"| FP8 vs {r['baseline_precision']} ({r['steps']} steps, block {r['fp8_block']}) | FP8 |"
    lines = [head + (f" noise floor ({r['baseline_precision']}, seed + 1) |" if floor else ""),
             "|---|---|" + ("---|" if floor else "")]
    lines += [
        row(f"relative loss error, smoothed over {r['smooth_window']} steps: mean", "rel_err_smoothed_mean"),
        row("relative loss error, smoothed: max (full windows)", "rel_err_smoothed_max_after_window"),
        row("relative loss error per step: mean", "rel_err_per_step_mean"),
        row("relative loss error per step: max", "rel_err_per_step_max"),
        row("signed mean (other - baseline) / baseline per step", "rel_diff_signed_mean"),
        row("final val loss: relative error", "rel_err_val_loss"),
    ]
    blank = " |" if floor else ""
    lines += [
        f"| final val loss: baseline / fp8{' / floor' if floor else ''} | {r['val_loss_baseline']:.4f} / "
        f"{r['val_loss_fp8']:.4f}" + (f" / {f['val_loss_floor']:.4f}" if floor else "") + " |" + blank,
        f"| tokens/s: baseline / fp8 | {r['tokens_per_s_baseline']:,.0f} / {r['tokens_per_s_fp8']:,.0f} |" + blank,
        f"| paper (DeepSeek-V3, 16B and 230B) | < {pct(r['paper_rel_err'])} |" + blank,
    ]
    return "\n".join(lines)


def plot_fp8(path: Path, base: list[float], fp8: list[float], rel: list[float], rel_smooth: list[float],
             baseline_name: str, floor_rel_smooth: list[float] | None = None) -> Path:
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
    if floor_rel_smooth is not None:
        axes[1].plot(range(1, len(floor_rel_smooth) + 1), [100 * v for v in floor_rel_smooth], lw=1.2, ls=":",
                     label=f"noise floor: {baseline_name} seed + 1, smoothed")
    axes[1].axhline(100 * PAPER_REL_ERR, color="k", ls="--", lw=1, label="paper bound 0.25%")
    axes[1].set_title(f"relative loss error FP8 vs {baseline_name} (%)"), axes[1].set_xlabel("step")
    axes[1].legend()
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
