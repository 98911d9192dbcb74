"""Load-balance ablation (DeepSeek-V3 §2.1.2 / arXiv 2408.15664), reproduced at tiny scale.

The same model, data, seed and steps, trained three ways:
  aux_loss   classic auxiliary balance loss, alpha = 1e-3
  aux_free   auxiliary-loss-free bias updates, gamma = 1e-3
  none       no balancing at all
and compared on validation perplexity, MaxVio_global (validation) and mean MaxVio_batch.
The paper (1B model) reports MaxVio_global 0.72 (aux loss) vs 0.04 (aux-free), ppl 9.56 vs 9.50.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from .trainer import TrainConfig, train

ARMS = {
    "aux_loss": dict(aux_loss_alpha=1e-3, bias_update_rate=0.0, seq_aux_alpha=0.0),
    "aux_free": dict(aux_loss_alpha=0.0, bias_update_rate=1e-3, seq_aux_alpha=0.0),
    "none": dict(aux_loss_alpha=0.0, bias_update_rate=0.0, seq_aux_alpha=0.0),
}


def run_balance_experiment(base: TrainConfig, out: Path, log=print) -> dict:
    """Train every arm under ``out/<arm>`` (sharing one tokenizer and dataset); write the table and plot."""
    out = Path(out)
    results = {}
    for arm, knobs in ARMS.items():
        cfg = dataclasses.replace(base, out=str(out / arm), cache_dir=str(out / "shared"), sample_tokens=0,
                                  save_every=0, **knobs)
        log(f"== {arm}: {knobs}")
        summary = train(cfg, log=log)
        steps = [json.loads(ln) for ln in (out / arm / "metrics.jsonl").read_text().splitlines()
                 if ln.strip() and "kind" not in json.loads(ln)]
        vio = [r["maxvio_batch_mean"] for r in steps if "maxvio_batch_mean" in r]
        results[arm] = {"val_ppl": summary["val_ppl"], "val_loss": summary["val_loss"],
                        "maxvio_global": summary["maxvio_global"],
                        "maxvio_batch_mean": sum(vio) / len(vio) if vio else None,
                        "maxvio_batch_last50": sum(vio[-50:]) / len(vio[-50:]) if vio else None,
                        "steps": summary["steps"], **knobs}
    table = format_table(results)
    (out / "balance_results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "balance_results.md").write_text(table + "\n")
    plot_balance(out, list(ARMS))
    return results


def format_table(results: dict) -> str:
    rows = ["| run | val ppl | MaxVio_global | mean MaxVio_batch | MaxVio_batch (last 50 steps) |",
            "|---|---|---|---|---|"]
    for arm, r in results.items():
        rows.append(f"| {arm} | {r['val_ppl']:.3f} | {r['maxvio_global']:.3f} | {r['maxvio_batch_mean']:.3f} "
                    f"| {r['maxvio_batch_last50']:.3f} |")
    return "\n".join(rows)


def plot_balance(out: Path, arms: list[str]) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for arm in arms:
        recs = [json.loads(ln) for ln in (out / arm / "metrics.jsonl").read_text().splitlines() if ln.strip()]
        steps = [r for r in recs if "kind" not in r]
        evals = [r for r in recs if r.get("kind") == "eval"]
        axes[0].plot([r["step"] for r in steps], [r.get("maxvio_batch_mean") for r in steps], lw=1, label=arm)
        axes[1].plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label=arm)
    axes[0].set_title("MaxVio_batch (mean over MoE layers)"), axes[0].set_xlabel("step"), axes[0].legend()
    axes[1].set_title("validation loss"), axes[1].set_xlabel("step"), axes[1].legend()
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out / "balance.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
