"""Load-balance ablation (DeepSeek-V3 §2.1.2 / arXiv 2408.15664), reproduced at tiny scale.

The same model, data and steps, trained several ways, each at several seeds:
  aux_free   auxiliary-loss-free bias updates, gamma = ``bias_update_rate`` (default 1e-2), no aux loss
             (plus the complementary sequence-wise loss when ``seq_aux_alpha`` > 0, V3's full recipe)
  aux_loss   classic (DeepSeek-V2) batch-wise auxiliary loss, alpha = ``aux_loss_alpha``, no bias update
  none       no balancing at all
and compared on validation perplexity, MaxVio_global (on the validation batches, after training) and
late MaxVio_batch: the mean of the per-step MaxVio_batch over the last 25% of the steps (``LATE_FRACTION``;
at least one step), when the bias has had time to move. MaxVio is averaged over the main model's MoE
layers. Each metric is reported as the mean and the sample standard deviation (n - 1) over the seeds.
The command runs without the MTP module by default (``--mtp-depth 0``): MTP does not route the main
layers MaxVio is measured on, and it costs about a third of a step.

Why gamma = 1e-2 and not the paper's 1e-3: each step moves a bias by at most gamma, so in 100 steps the
bias moves at most 100 * gamma, while the tiny router's experts differ in mean score by ~0.3-0.7 after
its first steps; 1e-3 needs hundreds of steps, 3e-2 oscillates (issue 17; ``gamma_sweep`` shows it).
The paper (1B model) reports MaxVio_global 0.72 (aux loss) vs 0.04 (aux-free), ppl 9.56 vs 9.50.

Outputs under OUT: ``summary.json`` (``{"arms": {NAME: {"val_ppl": {"mean", "std"}, "maxvio_global": ..,
"maxvio_batch_late": .., "settings": {..}}}}``), ``runs.json`` (every run's values), ``balance_results.md``
(the table), ``balance.png`` and, with a gamma sweep, ``gamma_sweep.png``; each run's own directory is
``OUT/<arm>/seed<N>``, the tokenizer and token cache ``OUT/shared`` (or ``cache_dir``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from ..knobs import choice_list, int_list, nonneg_float, positive_int
from .trainer import TrainConfig, train

ARM_KINDS = ("aux_free", "aux_loss", "none")
LATE_FRACTION = 0.25     # "late" MaxVio_batch: the last quarter of the steps
METRICS = ("val_ppl", "maxvio_global", "maxvio_batch_late")


def positive_float_list(text: str) -> tuple[float, ...]:
    """``"1e-3,1e-2"`` -> (0.001, 0.01): comma-separated numbers > 0 (argparse ``type=``)."""
    import argparse
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or not all(v > 0 and math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected one or more finite numbers > 0, got {text!r}")
    return values


# "aux_free,none" -> ("aux_free", "none"), each one of ARM_KINDS (argparse ``type=``)
name_list = choice_list(ARM_KINDS, "arms")


@dataclass
class BalanceExperimentConfig:
    """The knobs of ``dsv3 experiment balance`` (the other training settings come from TrainConfig).

    The arms set the TrainConfig fields named in :data:`ARM_FIELDS` themselves, so the command offers
    those only through this dataclass.
    """

    bias_update_rate: float = field(default=1e-2, metadata={
        "help": "gamma of the aux_free arm's bias update (the paper's 1e-3 needs hundreds of steps here)",
        "type": nonneg_float})
    aux_loss_alpha: float = field(default=1e-3, metadata={
        "help": "alpha of the aux_loss arm's classic batch-wise auxiliary loss", "type": nonneg_float})
    seq_aux_alpha: float = field(default=0.0, metadata={
        "help": "alpha of the complementary sequence-wise loss in the aux_free arm (V3's full recipe; "
                "0: aux-free alone)", "type": nonneg_float})
    max_steps: int = field(default=100, metadata={"help": "optimizer steps of every run", "type": positive_int})
    seeds: tuple[int, ...] = field(default=(0, 1), metadata={
        "help": "seeds (init and data order), each arm runs once per seed, comma-separated",
        "type": int_list, "metavar": "N,N"})
    arms: tuple[str, ...] = field(default=ARM_KINDS, metadata={
        "help": f"which arms to run, comma-separated, among {', '.join(ARM_KINDS)}",
        "type": name_list, "metavar": "ARM,ARM"})
    gamma_sweep: tuple[float, ...] = field(default=(), metadata={
        "help": "run the aux_free arm once per gamma instead of at --bias-update-rate, e.g. "
                "1e-3,3e-3,1e-2,3e-2 (tabulated and plotted against gamma)",
        "type": positive_float_list, "metavar": "G,G"})

    def __post_init__(self):
        self.seeds = tuple(self.seeds)
        self.arms = tuple(self.arms)
        self.gamma_sweep = tuple(self.gamma_sweep)
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be one or more distinct integers, got {self.seeds}")
        bad = [a for a in self.arms if a not in ARM_KINDS]
        if not self.arms or bad or len(set(self.arms)) != len(self.arms):
            raise ValueError(f"arms must be distinct names among {', '.join(ARM_KINDS)}, got {self.arms}")
        if self.gamma_sweep and "aux_free" not in self.arms:
            raise ValueError("gamma_sweep varies the aux_free arm, which is not among the arms")
        if any(not (g > 0 and math.isfinite(g)) for g in self.gamma_sweep):
            raise ValueError(f"gamma_sweep values must be finite and > 0, got {self.gamma_sweep}")
        for name in ("bias_update_rate", "aux_loss_alpha", "seq_aux_alpha"):
            v = getattr(self, name)
            if not (v >= 0 and math.isfinite(v)):
                raise ValueError(f"{name} must be a finite number >= 0, got {v}")
        if self.max_steps <= 0:
            raise ValueError(f"max_steps must be > 0, got {self.max_steps}")


# The TrainConfig fields every arm sets itself (from BalanceExperimentConfig): the command must not also
# offer them as training flags, or a user's value would be silently replaced.
ARM_FIELDS = ("bias_update_rate", "bias_update_schedule", "aux_loss_alpha", "seq_aux_alpha", "max_steps", "seed")


def arm_knobs(exp: BalanceExperimentConfig) -> dict[str, dict]:
    """Arm name -> the balance settings of that arm, in run order. A gamma sweep replaces ``aux_free``
    by one arm per gamma, named ``aux_free_gamma=<g>``."""
    arms = {}
    for kind in exp.arms:
        if kind == "aux_free":
            gammas = exp.gamma_sweep or (exp.bias_update_rate,)
            for g in gammas:
                name = f"aux_free_gamma={g:g}" if exp.gamma_sweep else "aux_free"
                arms[name] = dict(bias_update_rate=g, bias_update_schedule=None, aux_loss_alpha=0.0,
                                  seq_aux_alpha=exp.seq_aux_alpha)
        elif kind == "aux_loss":
            arms[kind] = dict(bias_update_rate=0.0, bias_update_schedule=None, aux_loss_alpha=exp.aux_loss_alpha,
                              seq_aux_alpha=0.0)
        else:
            arms[kind] = dict(bias_update_rate=0.0, bias_update_schedule=None, aux_loss_alpha=0.0, seq_aux_alpha=0.0)
    return arms


def late_steps(max_steps: int) -> int:
    """How many final steps "late" MaxVio_batch averages over: the last quarter, at least one."""
    return max(1, math.ceil(LATE_FRACTION * max_steps))


def read_steps(run_dir: Path) -> list[dict]:
    """The per-step records (not the eval ones) of a run's metrics.jsonl."""
    recs = [json.loads(ln) for ln in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return [r for r in recs if "kind" not in r]


def mean_std(values: list[float]) -> dict:
    """{"mean", "std"} with the sample standard deviation (0 for a single value)."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def run_balance_experiment(base: TrainConfig, out, exp: BalanceExperimentConfig | None = None, log=print) -> dict:
    """Train every arm at every seed under ``out/<arm>/seed<N>``; write summary.json, runs.json, the
    table and the plots. Returns the summary (``{"arms": {...}}``). ``base`` gives every other training
    setting; the fields in :data:`ARM_FIELDS` come from ``exp`` (default: BalanceExperimentConfig())."""
    exp = exp or BalanceExperimentConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    arms = arm_knobs(exp)
    n_late = late_steps(exp.max_steps)
    runs = []
    for seed in exp.seeds:  # seed-major: an interrupted experiment still has every arm at the first seeds
        for arm, knobs in arms.items():
            run_dir = out / arm / f"seed{seed}"
            cfg = dataclasses.replace(base, out=str(run_dir), cache_dir=base.cache_dir or str(out / "shared"),
                                      max_steps=exp.max_steps, seed=seed, **knobs)
            log(f"== {arm} seed {seed}: {knobs}")
            summary = train(cfg, log=log)
            vio = [r["maxvio_batch_mean"] for r in read_steps(run_dir) if "maxvio_batch_mean" in r]
            runs.append({"arm": arm, "seed": seed, "dir": str(run_dir), "val_ppl": summary["val_ppl"],
                         "val_loss": summary["val_loss"], "maxvio_global": summary["maxvio_global"],
                         "maxvio_batch_late": statistics.fmean(vio[-n_late:]) if vio else None,
                         "maxvio_batch_mean": statistics.fmean(vio) if vio else None,
                         "steps": summary["steps"], "wall_s": summary.get("wall_s")})
            # after every run, so an interrupted experiment keeps what it measured
            (out / "runs.json").write_text(json.dumps(runs, indent=2) + "\n")
    result = {"arms": {}}
    for arm, knobs in arms.items():
        mine = [r for r in runs if r["arm"] == arm]
        entry = {}
        for m in METRICS:
            vals = [r[m] for r in mine if r[m] is not None]
            entry[m] = mean_std(vals) if vals else {"mean": None, "std": None}
        entry["settings"] = {**knobs, "max_steps": exp.max_steps, "seeds": list(exp.seeds),
                             "late_steps": n_late, "preset": base.preset, "batch_size": base.batch_size,
                             "seq_len": base.seq_len, "grad_accum": base.grad_accum, "lr": base.lr,
                             "mtp_depth": base.mtp_depth,
                             "model_overrides": dict(base.model_overrides)}
        result["arms"][arm] = entry
    (out / "summary.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "balance_results.md").write_text(format_table(result) + "\n")
    plot_balance(out, result, runs)
    if exp.gamma_sweep:
        plot_gamma_sweep(out, result)
    return result


def _fmt(stat: dict, digits: int = 3) -> str:
    if stat["mean"] is None:
        return "n/a"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def _describe(settings: dict) -> str:
    parts = []
    if settings["bias_update_rate"]:
        parts.append(f"γ {settings['bias_update_rate']:g}")
    if settings["aux_loss_alpha"]:
        parts.append(f"aux α {settings['aux_loss_alpha']:g}")
    if settings["seq_aux_alpha"]:
        parts.append(f"seq α {settings['seq_aux_alpha']:g}")
    return ", ".join(parts) or "no balancing"


def format_table(result: dict) -> str:
    """The markdown table of a summary: mean ± sample std over seeds."""
    arms = result["arms"]
    first = next(iter(arms.values()))["settings"]
    rows = ["| arm | settings | val ppl | MaxVio_global | MaxVio_batch (late) |", "|---|---|---|---|---|"]
    for arm, r in arms.items():
        rows.append(f"| {arm} | {_describe(r['settings'])} | {_fmt(r['val_ppl'], 2)} | {_fmt(r['maxvio_global'])} "
                    f"| {_fmt(r['maxvio_batch_late'])} |")
    rows.append("")
    rows.append(f"Mean ± sample std over seeds {', '.join(map(str, first['seeds']))}; {first['max_steps']} steps of "
                f"{first['batch_size']} x {first['seq_len']} tokens; late = the last {first['late_steps']} steps "
                f"({LATE_FRACTION:.0%}); MaxVio averaged over the main model's MoE layers.")
    return "\n".join(rows)


def _series(runs: list[dict], arm: str, key: str, evals: bool) -> tuple[list[int], list[list[float]]]:
    """Steps and, per step, the values of every seed of ``arm`` (steps all seeds have)."""
    per_seed = []
    for r in (r for r in runs if r["arm"] == arm):
        recs = [json.loads(ln) for ln in (Path(r["dir"]) / "metrics.jsonl").read_text().splitlines() if ln.strip()]
        recs = [x for x in recs if (x.get("kind") == "eval") == evals and key in x]
        per_seed.append({x["step"]: x[key] for x in recs})
    steps = sorted(set.intersection(*(set(d) for d in per_seed))) if per_seed else []
    return steps, [[d[s] for d in per_seed] for s in steps]


def plot_balance(out: Path, result: dict, runs: list[dict]) -> Path:
    """balance.png: MaxVio_batch over the steps (mean over seeds, band = min..max), validation loss,
    and MaxVio_global per arm (mean ± std)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    arms = list(result["arms"])
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for arm in arms:
        steps, vals = _series(runs, arm, "maxvio_batch_mean", evals=False)
        if steps:
            mean = [statistics.fmean(v) for v in vals]
            line, = axes[0].plot(steps, mean, lw=1, label=arm)
            axes[0].fill_between(steps, [min(v) for v in vals], [max(v) for v in vals], color=line.get_color(),
                                 alpha=0.2, lw=0)
        steps, vals = _series(runs, arm, "val_loss", evals=True)
        if steps:
            axes[1].plot(steps, [statistics.fmean(v) for v in vals], "o-", label=arm)
    g = [result["arms"][a]["maxvio_global"] for a in arms]
    axes[2].bar(range(len(arms)), [s["mean"] or 0 for s in g], yerr=[s["std"] or 0 for s in g], capsize=4)
    axes[2].set_xticks(range(len(arms)), arms, rotation=20, ha="right")
    axes[0].set_title("MaxVio_batch (mean over MoE layers and seeds)"), axes[0].set_xlabel("step")
    axes[1].set_title("validation loss (mean over seeds)"), axes[1].set_xlabel("step")
    axes[2].set_title("MaxVio_global (validation), mean ± std")
    for ax in axes[:2]:
        ax.legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(out) / "balance.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_gamma_sweep(out: Path, result: dict) -> Path:
    """gamma_sweep.png: MaxVio_global, late MaxVio_batch and val ppl against gamma (mean ± std), with the
    non-swept arms as horizontal references."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    swept = [(r["settings"]["bias_update_rate"], r) for a, r in result["arms"].items() if a.startswith("aux_free")]
    swept.sort(key=lambda t: t[0])
    refs = {a: r for a, r in result["arms"].items() if not a.startswith("aux_free")}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, m, title in zip(axes, METRICS, ("val ppl", "MaxVio_global", "MaxVio_batch (late)")):
        ax.errorbar([g for g, _ in swept], [r[m]["mean"] for _, r in swept], yerr=[r[m]["std"] for _, r in swept],
                    fmt="o-", capsize=4, label="aux_free")
        for i, (arm, r) in enumerate(refs.items()):
            if r[m]["mean"] is not None:
                ax.axhline(r[m]["mean"], ls="--", color=f"C{i + 1}", label=arm)
        ax.set_xscale("log"), ax.set_xlabel("gamma (bias update rate)"), ax.set_title(title)
        ax.grid(alpha=0.3), ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(out) / "gamma_sweep.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
