"""CLI of the FP8 feature: ``dsv3 convert`` and ``dsv3 experiment fp8`` (registered via ``FEATURE_CLIS``).

Cheap to import: the heavy modules are imported inside the command functions.
"""

from __future__ import annotations

import argparse

from ..cli import CLIError, HelpFormatter, add_command, add_train_args, positive_int, train_config_from_args

SCALE_FMTS = ("none", "ue8m0")


def add_parsers(subparsers, bench, experiment) -> None:
    p = add_command(subparsers, "convert", cmd_convert,
                    help="convert a checkpoint to the official FP8 layout (--to fp8) or back to bf16 (--to bf16)",
                    description="Rewrite a checkpoint directory shard by shard. --to fp8: attention and MLP/expert "
                                "weights become float8_e4m3fn with a weight_scale_inv per block (embedding, head, "
                                "router, norms stay bf16; config.json gets quantization_config). --to bf16: FP8 "
                                "weights are dequantized. Tokenizer files are copied.")
    p.add_argument("src", metavar="SRC", help="source checkpoint directory (HF layout)")
    p.add_argument("dst", metavar="DST", help="destination directory (created; must differ from SRC)")
    p.add_argument("--to", required=True, choices=("fp8", "bf16"), help="target format")
    p.add_argument("--block", type=positive_int, nargs=2, default=[128, 128], metavar=("ROWS", "COLS"),
                   help="FP8 weight block size (--to fp8)")
    p.add_argument("--scale-fmt", choices=SCALE_FMTS, default="none",
                   help="FP8 scales: amax/448 (none) or rounded up to powers of two (ue8m0, as DeepSeek-V3.1)")
    p.add_argument("--json", metavar="FILE", help="also write the summary as JSON to FILE")

    e = experiment.add_parser("fp8", formatter_class=HelpFormatter,
                              help="BF16 vs FP8 mixed-precision training on the same data and seed",
                              description="Train the same model twice, in the trainer's high precision "
                                          "(fp32 on CPU, bf16 autocast on GPU) and with FP8 GEMMs (DeepSeek-V3 "
                                          "recipe), and report the relative loss error over the run (paper: "
                                          "< 0.25%) with a plot.")
    add_train_args(e, resume_flag=False)
    for action in e._actions:  # shorter than a default training run, so both arms fit in minutes on 2 cores
        if action.dest == "max_steps":
            action.help = "optimizer steps per run"
    e.set_defaults(func=cmd_experiment_fp8, max_steps=60, seq_len=128, eval_every=0, save_every=0,
                   warmup_steps=10)


def cmd_convert(args: argparse.Namespace) -> int:
    from ..checkpoint import CheckpointError
    from .convert import convert_checkpoint
    scale_fmt = None if args.scale_fmt == "none" else args.scale_fmt
    try:
        summary = convert_checkpoint(args.src, args.dst, args.to, tuple(args.block), scale_fmt)
    except (CheckpointError, ValueError) as e:
        raise CLIError(str(e)) from e
    ratio = summary["bytes_out"] / max(summary["bytes_in"], 1)
    print(f"converted {summary['src']} -> {summary['dst']} (--to {args.to}): {summary['quantized']} quantized, "
          f"{summary['dequantized']} dequantized; {summary['bytes_in'] / 1e6:,.1f} MB -> "
          f"{summary['bytes_out'] / 1e6:,.1f} MB ({ratio:.2f}x)")
    if args.json:
        from ..cli import _write_json
        _write_json(args.json, summary)
    return 0


def cmd_experiment_fp8(args: argparse.Namespace) -> int:
    from ..train.experiment_fp8 import format_report, run_fp8_experiment
    from ..train.trainer import TrainError
    cfg = train_config_from_args(args)
    out = args.out or f"runs/experiment-fp8-{cfg.preset}"
    try:
        result = run_fp8_experiment(cfg, out)
    except TrainError as e:
        raise CLIError(str(e)) from e
    print(format_report(result))
    print(f"written: {out}/fp8_results.json, {out}/fp8_results.md, {out}/fp8.png")
    return 0
