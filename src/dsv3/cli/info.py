"""``dsv3 info``: cost accounting of a model from its config (optionally built and run once)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from ..config import PRESETS, ModelConfig, preset
from ..knobs import positive_int
from .common import PROG, CLIError, add_command


def add_model_args(p: argparse.ArgumentParser) -> None:
    """``--preset NAME | --model DIR`` (exactly one); read back with :func:`load_config`."""
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--preset", choices=sorted(PRESETS), help="a built-in model shape")
    g.add_argument("--model", metavar="DIR",
                   help="a model directory holding config.json (or the config.json itself); weights are not read")


def load_config(args: argparse.Namespace) -> tuple[ModelConfig, str]:
    """The config named by ``--preset`` / ``--model``, and a name to show for it."""
    if args.preset is not None:
        return preset(args.preset), args.preset
    path = args.model
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such model directory")
    return ModelConfig.from_json_file(path), path



DTYPES = ("bf16", "fp16", "fp32", "fp8")
FORWARD_MAX_PARAMS = 2_000_000_000   # --forward builds the model on one device: keep it small
INFO_SEQ_LEN = 4096                  # FLOPs context when --seq-len is not given
FORWARD_SEQ_LEN = 64                 # --forward batch length when --seq-len is not given


def register(subparsers) -> None:
    p = add_command(subparsers, "info", cmd_info,
                    help="parameters, FLOPs, cache size and RoPE settings of a model (optionally run it)",
                    description="Cost accounting of a model from its config (no weights are loaded): "
                                "parameters (total, active, MTP), FLOPs per token, MLA cache bytes per "
                                "token, and the RoPE/YaRN settings. --forward also builds the model with "
                                "random weights and runs one batch.")
    add_model_args(p)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--seq-len", type=positive_int, default=None, metavar="N",
                   help=f"context length: for the FLOPs (default: {INFO_SEQ_LEN}) and the --forward batch "
                        f"(default: {FORWARD_SEQ_LEN})")
    p.add_argument("--dtype", choices=DTYPES, default="bf16", help="element type of the cache, for its bytes")
    p.add_argument("--forward", action="store_true",
                   help=f"build the model (random init; only below {FORWARD_MAX_PARAMS / 1e9:g}B parameters), "
                        f"run a forward pass and check the parameter count against the formula")
    p.add_argument("--seed", type=int, default=0, help="random seed for --forward's weights and batch")
    p.add_argument("--batch", type=positive_int, default=2, help="batch size for --forward")
    p.add_argument("--device", default="cpu", help="torch device for --forward (e.g. cpu, cuda)")


def cmd_info(args: argparse.Namespace) -> int:
    from ..accounting import format_summary, summary

    config, name = load_config(args)
    flops_seq = args.seq_len or INFO_SEQ_LEN
    s = summary(config, seq_len=flops_seq, dtype=args.dtype, name=name)
    from ..quant.memory import fp8_weight_bytes, format_weight_bytes
    s["weights"] = fp8_weight_bytes(config)
    s["deployment_warnings"] = config.deployment_warnings()
    for message in s["deployment_warnings"]:  # stderr, so --json output stays one JSON document
        print(f"{PROG}: warning: {message}", file=sys.stderr)
    status = 0
    if args.forward:
        s["forward"] = _run_forward(config, s["params"], args)
        status = 0 if s["forward"]["params_match"] else 1
    if args.json:
        print(json.dumps(s, indent=2))
    else:
        print(format_summary(s))
        print(format_weight_bytes(s["weights"]))
        if args.forward:
            print(_format_forward(s["forward"]))
    if status:
        print(f"{PROG}: error: measured parameter count differs from the formula", file=sys.stderr)
    return status


def _run_forward(config: ModelConfig, params: dict, args: argparse.Namespace) -> dict:
    """Build ``config`` with random weights, run one batch, and measure what the formula predicts."""
    import torch

    from ..model import Transformer

    built = params["total"] + params["mtp"]
    if built >= FORWARD_MAX_PARAMS:
        raise CLIError(f"--forward builds the whole model in memory; this one has {built / 1e9:.1f}B parameters "
                       f"(limit {FORWARD_MAX_PARAMS / 1e9:g}B). Use a smaller preset, e.g. --preset tiny")
    seq_len = args.seq_len or FORWARD_SEQ_LEN
    try:
        device = torch.device(args.device)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        raise CLIError(f"--device {args.device}: {e}") from None

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    with device:
        model = Transformer(config, max_seq_len=seq_len)
    model.eval()
    sync()
    t1 = time.perf_counter()
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    input_ids = torch.randint(0, config.vocab_size, (args.batch, seq_len), generator=gen).to(device)
    with torch.no_grad():
        out = model(input_ids, return_mtp=True)
    sync()
    t2 = time.perf_counter()

    measured_main = model.num_params(include_mtp=False)
    measured_mtp = model.num_params() - measured_main
    finite = bool(torch.isfinite(out.logits).all()) and all(bool(torch.isfinite(m).all()) for m in out.mtp_logits)
    return {
        "device": str(device),
        "seed": args.seed,
        "input_shape": list(input_ids.shape),
        "logits_shape": list(out.logits.shape),
        "mtp_logits_shapes": [list(m.shape) for m in out.mtp_logits],
        "finite": finite,
        "build_seconds": t1 - t0,
        "forward_seconds": t2 - t1,
        "measured_params": measured_main,
        "measured_mtp_params": measured_mtp,
        "params_match": measured_main == params["total"] and measured_mtp == params["mtp"],
    }


def _format_forward(f: dict) -> str:
    ok = "ok" if f["params_match"] else "MISMATCH"
    mtp = ", ".join(str(tuple(s)) for s in f["mtp_logits_shapes"]) or "none"
    return "\n".join([
        f"forward (random init, seed {f['seed']}, {f['device']}):",
        f"  input        {tuple(f['input_shape'])}",
        f"  logits       {tuple(f['logits_shape'])}{'' if f['finite'] else '  (NOT FINITE)'}",
        f"  MTP logits   {mtp}",
        f"  time         build {f['build_seconds']:.3f} s, forward {f['forward_seconds']:.3f} s",
        f"  parameters   measured {f['measured_params']:,} main + {f['measured_mtp_params']:,} MTP "
        f"vs formula: {ok}",
    ])

