"""PNG plots of a run from its ``metrics.jsonl``: loss curves, expert-load heat map, MaxVio."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def read_metrics(path: Path) -> tuple[list[dict], list[dict]]:
    """(train step records, eval records) from a metrics.jsonl."""
    train, evals = [], []
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        (evals if rec.get("kind") == "eval" else train).append(rec)
    return train, evals


def plot_run(metrics_file: Path, out_dir: Path) -> list[Path]:
    """Write loss.png, expert_load.png and maxvio.png into ``out_dir``; returns the files written."""
    train, evals = read_metrics(metrics_file)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    if train:
        fig, ax = plt.subplots(figsize=(7, 4))
        steps = [r["step"] for r in train]
        for key, label in (("loss", "total"), ("lm_loss", "LM"), ("mtp_loss", "MTP")):
            vals = [r.get(key) for r in train]
            if any(v is not None for v in vals):
                ax.plot(steps, [np.nan if v is None else v for v in vals], label=f"train {label}", lw=1)
        if evals:
            ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="val LM")
        ax.set_xlabel("step"), ax.set_ylabel("loss (nats)"), ax.legend(), ax.grid(alpha=0.3)
        ax.set_title("loss")
        written.append(save_figure(fig, out_dir / "loss.png"))

        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(steps, [r.get("maxvio_batch_mean", np.nan) for r in train], lw=1, label="MaxVio_batch (mean over layers)")
        if evals:
            ax.plot([r["step"] for r in evals], [r["maxvio_global"] for r in evals], "o-", label="MaxVio_global (val)")
        ax.set_xlabel("step"), ax.set_ylabel("MaxVio"), ax.legend(), ax.grid(alpha=0.3)
        ax.set_title("expert load imbalance")
        written.append(save_figure(fig, out_dir / "maxvio.png"))
    if evals and evals[-1].get("expert_load"):
        load = np.array(evals[-1]["expert_load"], dtype=float)          # [layers, experts]
        frac = load / np.maximum(load.sum(1, keepdims=True), 1) * load.shape[1]  # 1.0 = perfectly even
        fig, ax = plt.subplots(figsize=(8, 1 + 0.5 * load.shape[0]))
        im = ax.imshow(frac, aspect="auto", cmap="viridis")
        ax.set_xlabel("expert"), ax.set_ylabel("MoE layer")
        ax.set_title(f"expert load on validation, step {evals[-1]['step']} (1.0 = even)")
        fig.colorbar(im, ax=ax)
        written.append(save_figure(fig, out_dir / "expert_load.png"))
    return written


def save_figure(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
