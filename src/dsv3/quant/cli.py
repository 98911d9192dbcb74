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

    q = experiment.add_parser("quant", formatter_class=HelpFormatter,
                              help="quality of fp32 / bf16 / weight-only int8 / int4 decoding on one checkpoint",
                              description="Load the checkpoint at each precision and measure, against fp32: "
                                          "perplexity on held-out text (as dsv3 eval), teacher-forced top-1 "
                                          "agreement and KL divergence, and greedy agreement of the engine "
                                          "(identical sequences, common prefix). See docs/engine-performance.md.")
    q.add_argument("--model", metavar="DIR", required=True, help="checkpoint directory with its tokenizer")
    q.add_argument("--precisions", nargs="+", default=None, metavar="NAME",
                   help="fp32, bf16, int8, int8+head, int4, int4+head (default: all; fp32 is always measured)")
    q.add_argument("--data", nargs="+", metavar="PATH", default=None,
                   help="held-out text: files, directories or JSONL ('text'); default: the stdlib val split")
    q.add_argument("--seq-len", type=positive_int, default=256, help="tokens per perplexity window")
    q.add_argument("--max-windows", type=positive_int, default=32, help="windows scored (a seeded random subset)")
    q.add_argument("--prompts", type=positive_int, default=16, help="greedy generations (prompts from the windows)")
    q.add_argument("--prompt-len", type=positive_int, default=32, help="tokens per greedy prompt")
    q.add_argument("--gen-len", type=positive_int, default=32, help="greedy tokens per prompt")
    q.add_argument("--group-size", type=positive_int, default=32, help="int4 input channels per scale")
    q.add_argument("--seed", type=int, default=0, help="seed of the windows")
    q.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's choice)")
    q.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    q.set_defaults(func=cmd_experiment_quant)


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


def cmd_experiment_quant(args: argparse.Namespace) -> int:
    import os

    from .quality import DEFAULT_PRECISIONS, format_report, quality_report
    if not os.path.isdir(args.model):
        raise CLIError(f"--model {args.model}: no such model directory")
    if args.threads is not None:
        import torch
        torch.set_num_threads(args.threads)
    try:
        report = quality_report(args.model, tuple(args.precisions or DEFAULT_PRECISIONS), args.data, args.seq_len,
                                args.max_windows, args.prompts, args.prompt_len, args.gen_len, args.group_size,
                                args.seed, log=lambda line: None)
    except ValueError as e:
        raise CLIError(str(e)) from e
    print(format_report(report))
    if args.json:
        import json
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
        print(f"written: {args.json}")
    return 0
