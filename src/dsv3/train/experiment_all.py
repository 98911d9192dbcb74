"""``dsv3 experiment all``: every paper reproduction in one command, one report.

Runs the registered experiments (:mod:`dsv3.train.experiments`) at their defaults, cheapest first, each
under ``OUT/<name>``, then writes ``OUT/report.md`` (a claims table with the paper's numbers beside
ours, then each experiment's own table and plots) and ``OUT/summary.json``. An experiment whose
summary file is already in ``OUT/<name>`` is reused rather than rerun (``force`` reruns it), so an
interrupted ``all`` picks up where it stopped and a single experiment can be redone alone.

``smoke`` shrinks every run to two steps of a tiny model: it checks the whole pipeline in a minute or
two and says nothing about the claims.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from ..knobs import choice_list, knob
from .experiments import EXPERIMENTS, get

# Cheapest first: an interrupted run still has the quick results.
ORDER = ("router", "fp8", "balance", "mtp")

# The paper's numbers the claims table puts beside ours.
PAPER = {
    "router": "MoE gating kept in original precision under FP8/bf16 training (V3 §3.3.1)",
    "fp8": "relative loss error < 0.25% (V3 §3.3, 16B and 230B models)",
    "balance": "loss-free MaxVio_global 0.04 vs aux loss 0.72 at lower ppl (Wang et al. 2024, 1B); "
               "V3 §4.5.2: aux-loss-free better on most benchmarks",
    "mtp": "2nd-token acceptance 85-90%, 1.8x TPS (V3 §5.4.3)",
}


# "fp8,mtp" -> ("fp8", "mtp"), each a registered experiment (argparse ``type=``)
name_tuple = choice_list(EXPERIMENTS, "experiments")


@dataclass
class AllExperimentsConfig:
    """The knobs of ``dsv3 experiment all``."""

    only: tuple[str, ...] = knob((), "run only these experiments, comma-separated (empty: all)",
                                 type=name_tuple, metavar="NAME,NAME")
    force: bool = knob(False, "rerun experiments whose summary is already in OUT/NAME instead of reusing it")
    smoke: bool = knob(False, "two steps of a tiny model per run: checks the pipeline, not the claims")


def _smoke(name: str, exp, train: dict) -> tuple[object, dict]:
    """The experiment's knobs and training changes for a smoke run."""
    small = {"max_steps": 2, "batch_size": 2, "seq_len": 32, "eval_batches": 1, "tokenizer_train_mb": 0.3,
             "vocab_size": 384, "progress": False, "warmup_steps": 1}
    narrow = {"hidden_size": 32, "intermediate_size": 64, "moe_intermediate_size": 16, "num_hidden_layers": 2,
              "num_attention_heads": 2, "num_key_value_heads": 2, "kv_lora_rank": 16, "q_lora_rank": 16,
              "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 8}
    if name == "router":
        return dataclasses.replace(exp, tokens=64), {**train, **small, "model_overrides": narrow}
    if name == "fp8":
        return (dataclasses.replace(exp, hidden_size=128, intermediate_size=128, moe_intermediate_size=128,
                                    num_attention_heads=2, q_lora_rank=128),
                {**train, **small})
    if name == "balance":
        return dataclasses.replace(exp, max_steps=2), {**train, **small, "model_overrides": narrow}
    if name == "mtp":
        return (dataclasses.replace(exp, prompts=1, prompt_len=8, gen_len=6, rounds=1, warmup=1, eager=True),
                {**train, **small, "model_overrides": {"num_hidden_layers": 2}})
    return exp, {**train, **small}


def run_all(out, cfg: AllExperimentsConfig | None = None, train: dict | None = None, log=print) -> dict:
    """Run (or reuse) every experiment under ``out/<name>`` and write ``report.md`` and ``summary.json``.

    ``train`` holds TrainConfig changes applied to every experiment's base (e.g. ``data``,
    ``device``). Returns the summary: ``{"experiments": {name: {"summary", "wall_s", "reused",
    "dir"}}, "claims": [...]}``.
    """
    cfg = cfg or AllExperimentsConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = [n for n in ORDER if n in EXPERIMENTS and (not cfg.only or n in cfg.only)]
    names += [n for n in EXPERIMENTS if n not in ORDER and (not cfg.only or n in cfg.only)]
    done: dict[str, dict] = {}
    # a reused experiment keeps the wall time an earlier `all` measured for it
    previous = {}
    if (out / "summary.json").exists():
        previous = json.loads((out / "summary.json").read_text()).get("experiments", {})
    t_all = time.perf_counter()
    for name in names:
        e = get(name)
        exp, changes = e.config(), dict(train or {})
        if cfg.smoke:
            exp, changes = _smoke(name, exp, changes)
        run_dir = out / name
        summary_file = run_dir / e.outputs(exp)[0]
        if summary_file.exists() and not cfg.force:
            log(f"== {name}: reusing {summary_file}")
            done[name] = {"summary": json.loads(summary_file.read_text()),
                          "wall_s": previous.get(name, {}).get("wall_s"), "reused": True,
                          "dir": str(run_dir), "outputs": list(e.outputs(exp))}
            continue
        log(f"== {name}")
        t0 = time.perf_counter()
        summary = e(e.base_config(**changes), run_dir, exp, log=log)
        done[name] = {"summary": summary, "wall_s": time.perf_counter() - t0, "reused": False,
                      "dir": str(run_dir), "outputs": list(e.outputs(exp))}
    result = {"date": datetime.date.today().isoformat(), "smoke": cfg.smoke, "machine": _machine(),
              "wall_s": time.perf_counter() - t_all, "experiments": done, "claims": claims(done)}
    (out / "summary.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (out / "report.md").write_text(format_report(result, out) + "\n")
    return result


def _machine() -> dict:
    from ..cpu import cpu_features
    f = cpu_features()
    return {"model": f["model"], "cores": os.cpu_count(), "torch_cpu_capability": f["torch_cpu_capability"],
            "flags": [k for k, v in f["flags"].items() if v]}


def _pm(stat: dict | None, digits: int) -> str:
    if not stat or stat.get("mean") is None:
        return "n/a"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def claims(done: dict) -> list[dict]:
    """One row per experiment: the claim, the paper's number, ours, and whether ours shows the claim."""
    rows = []
    if "router" in done:
        a = done["router"]["summary"]["arms"]
        rows.append({"experiment": "router", "claim": "fp32 gating under bf16 autocast picks the fp32 experts",
                     "paper": PAPER["router"],
                     "ours": f"shipped gate: {100 * a['autocast_bf16']['flipped_fraction']:.2f}% tokens flipped; "
                             f"a bf16 gate: {100 * a['bf16_gate']['flipped_fraction']:.2f}% flipped, max |Δw| "
                             f"{a['bf16_gate']['max_abs_weight_diff']:.1e}",
                     "holds": a["autocast_bf16"]["flipped_fraction"] == 0.0})
    if "fp8" in done:
        s = done["fp8"]["summary"]
        floor = (s.get("floor") or {}).get("rel_err_smoothed_mean")
        rows.append({"experiment": "fp8", "claim": "FP8 training tracks high precision",
                     "paper": PAPER["fp8"],
                     "ours": f"{100 * s['rel_err_smoothed_mean']:.2f}% smoothed mean over {s['steps']} steps"
                             + (f" (noise floor, seed + 1: {100 * floor:.2f}%)" if floor is not None else ""),
                     "holds": s["rel_err_smoothed_mean"] < 0.0025 or (floor is not None
                                                                      and s["rel_err_smoothed_mean"] <= floor)})
    if "balance" in done:
        arms = done["balance"]["summary"]["arms"]
        free = next((v for k, v in arms.items() if k.startswith("aux_free")), None)
        loss = arms.get("aux_loss")
        ours = "; ".join(f"{k}: MaxVio_global {_pm(v['maxvio_global'], 3)}, ppl {_pm(v['val_ppl'], 1)}"
                         for k, v in arms.items())
        holds = None
        if free and loss and free["maxvio_global"]["mean"] is not None and loss["maxvio_global"]["mean"] is not None:
            holds = free["maxvio_global"]["mean"] < loss["maxvio_global"]["mean"]
        rows.append({"experiment": "balance", "claim": "aux-loss-free balances better than an aux loss",
                     "paper": PAPER["balance"], "ours": ours, "holds": holds})
    if "mtp" in done:
        s = done["mtp"]["summary"]
        best = max(s["speculative"].items(), key=lambda kv: kv[1]["speedup"])
        acc = s["first_draft_acceptance"]
        rows.append({"experiment": "mtp", "claim": "MTP drafts are accepted and speed up decoding",
                     "paper": PAPER["mtp"],
                     "ours": f"first-draft acceptance {'n/a' if acc is None else f'{acc:.3f}'}; best k={best[0]}: "
                             f"{best[1]['speedup']:.2f}x at batch 1 "
                             f"({'compiled' if s.get('compile') else 'eager'})",
                     "holds": bool(s.get("goal_met"))})
    return rows


def format_report(result: dict, out: Path) -> str:
    """The markdown report: the claims, then every experiment's table and plots."""
    m = result["machine"]
    lines = ["# DeepSeek-V3's claims, reproduced at small scale", "",
             f"{result['date']}; {m['model']} ({', '.join(m['flags']) or 'no recorded flags'}), {m['cores']} cores; "
             f"total {result['wall_s'] / 60:.1f} min" + (" (smoke run: the numbers mean nothing)" if result["smoke"]
                                                         else ""), "",
             "| experiment | claim | paper | ours | shown here |", "|---|---|---|---|---|"]
    for r in result["claims"]:
        shown = "n/a" if r["holds"] is None else ("yes" if r["holds"] else "no")
        lines.append(f"| {r['experiment']} | {r['claim']} | {r['paper']} | {r['ours']} | {shown} |")
    for name, d in result["experiments"].items():
        e = get(name)
        wall = f"{d['wall_s'] / 60:.1f} min" if d["wall_s"] is not None else "reused"
        wall += ", reused" if d["reused"] and d["wall_s"] is not None else ""
        lines += ["", f"## {name} ({wall}; `dsv3 experiment {name}`, files in `{name}/`)", "",
                  e.format(d["summary"])]
        for f in d["outputs"]:
            if f.endswith(".png") and (out / name / f).exists():
                lines += ["", f"![{name}]({name}/{f})"]
    return "\n".join(lines)
