"""Router precision (DeepSeek-V3 §3.3.1 keeps "MoE gating modules" in their original precision).

Training under bf16 autocast recasts every ``F.linear`` to bf16. For the gate that rounds the
sigmoid scores by ~4e-3, more than a bias step of aux-loss-free balancing (gamma ~1e-3), so ties
between experts flip. :class:`dsv3.model.moe.Router` therefore computes its logits and scores in
fp32 under autocast. This experiment shows the difference on the hidden states that reach each MoE
layer of a model: the gate of every layer computes its choices

* in fp32 (the reference),
* under ``torch.autocast(dtype=bfloat16)`` as shipped (must equal fp32: 0 flipped tokens),
* as a bf16 gate (``Router.compute_dtype = bfloat16``: what autocast would do without the fix),

and the summary reports, per arm, the fraction of tokens whose chosen expert set differs from fp32
and the largest gate-weight difference on the tokens whose set agrees. It needs no training: a checkpoint (``model``) or the
preset initialised as the trainer does. Outputs: ``OUT/summary.json`` and ``OUT/router_results.md``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import preset
from ..knobs import knob, positive_int
from ..model import Transformer
from ..model.moe import Router
from .trainer import TrainConfig

ARMS = ("autocast_bf16", "bf16_gate")   # each compared with the fp32 gate


@dataclass
class RouterExperimentConfig:
    """The knobs of ``dsv3 experiment router``."""

    tokens: int = knob(2048, "random tokens pushed through the model (their hidden states reach every gate)",
                       type=positive_int)
    model: str | None = knob(None, "measure this checkpoint instead of the preset at its training init",
                             metavar="DIR")


def _model(base: TrainConfig, exp: RouterExperimentConfig) -> Transformer:
    if exp.model is not None:
        from ..checkpoint import load_pretrained
        return load_pretrained(exp.model, dtype=torch.float32).eval()
    config = preset(base.preset)
    if base.model_overrides:
        config = config.replace(**base.model_overrides)
    torch.manual_seed(base.seed)
    model = Transformer(config)
    model.init_weights()
    return model.eval()


def _gate_inputs(model: Transformer, ids: torch.Tensor) -> list[tuple[Router, torch.Tensor]]:
    """(router, its input [T, D]) for every MoE layer, from one fp32 forward."""
    captured: list[tuple[Router, torch.Tensor]] = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: captured.append((mod, args[0].detach().clone())))
             for m in model.modules() if isinstance(m, Router)]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in hooks:
            h.remove()
    return captured


def _route(router: Router, x: torch.Tensor, arm: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        if arm == "autocast_bf16":
            with torch.autocast(x.device.type, dtype=torch.bfloat16):
                return router(x)
        if arm == "bf16_gate":
            router.compute_dtype = torch.bfloat16
            try:
                return router(x)
            finally:
                router.compute_dtype = torch.float32
        return router(x)


def run_router_experiment(base: TrainConfig, out, exp: RouterExperimentConfig | None = None, log=print) -> dict:
    """Route ``exp.tokens`` tokens' hidden states through every gate three ways; write and return the summary."""
    exp = exp or RouterExperimentConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = _model(base, exp)
    g = torch.Generator().manual_seed(base.seed)
    ids = torch.randint(0, model.config.vocab_size, (1, exp.tokens), generator=g)       # [1, T]
    per_layer = []
    for layer, (router, x) in enumerate(_gate_inputs(model, ids)):
        w_ref, topk_ref = _route(router, x, None)
        ref_sets = topk_ref.sort(dim=-1).values
        row = {"layer": layer}
        for arm in ARMS:
            w, topk = _route(router, x, arm)
            flipped = (topk.sort(dim=-1).values != ref_sets).any(dim=-1)                  # [T]
            # gate weights where both chose the same experts, compared per expert id (a flipped
            # token's difference is a whole weight and is counted by flipped_fraction instead)
            dense_ref = torch.zeros(x.shape[0], router.n_experts).scatter_(1, topk_ref, w_ref.float())
            dense = torch.zeros(x.shape[0], router.n_experts).scatter_(1, topk, w.float())
            same = ~flipped
            diff = (dense[same] - dense_ref[same]).abs().max().item() if same.any() else 0.0
            row[arm] = {"flipped_fraction": flipped.float().mean().item(), "max_abs_weight_diff": diff,
                        "weight_dtype": str(w.dtype).removeprefix("torch.")}
        per_layer.append(row)
    summary = {"tokens": exp.tokens, "model": exp.model or f"{base.preset} at init (seed {base.seed})",
               "layers": per_layer, "arms": {}}
    for arm in ARMS:
        summary["arms"][arm] = {
            "flipped_fraction": sum(r[arm]["flipped_fraction"] for r in per_layer) / max(1, len(per_layer)),
            "max_abs_weight_diff": max((r[arm]["max_abs_weight_diff"] for r in per_layer), default=0.0),
            "weight_dtype": per_layer[0][arm]["weight_dtype"] if per_layer else None}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "router_results.md").write_text(format_table(summary) + "\n")
    log(format_table(summary))
    return summary


def format_table(s: dict) -> str:
    """The markdown table of :func:`run_router_experiment`'s summary."""
    names = {"autocast_bf16": "dsv3 gate under bf16 autocast (shipped)", "bf16_gate": "bf16 gate (autocast's recast)"}
    lines = [f"Router precision: {s['tokens']} tokens through every MoE gate of {s['model']}, against the fp32 gate",
             "", "| gate | tokens with a different expert set | max abs gate-weight difference (same experts) | weight dtype |",
             "|---|---|---|---|"]
    for arm, r in s["arms"].items():
        lines.append(f"| {names[arm]} | {100 * r['flipped_fraction']:.2f}% | {r['max_abs_weight_diff']:.2e} "
                     f"| {r['weight_dtype']} |")
    return "\n".join(lines)
