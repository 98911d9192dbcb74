"""``dsv3 convert``: a checkpoint to the official FP8 layout or back (``dsv3.quant.convert``).

Cheap to import: the heavy modules are imported inside the command function.
"""

from __future__ import annotations

import argparse

from ..knobs import positive_int
from .common import add_command, add_json_arg, reported, write_json

SCALE_FMTS = ("none", "ue8m0")


def register(subparsers) -> None:
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
    add_json_arg(p, "the summary")


def cmd_convert(args: argparse.Namespace) -> int:
    from ..checkpoint import CheckpointError
    from ..quant.convert import convert_checkpoint
    scale_fmt = None if args.scale_fmt == "none" else args.scale_fmt
    with reported(CheckpointError, ValueError):
        summary = convert_checkpoint(args.src, args.dst, args.to, tuple(args.block), scale_fmt)
    ratio = summary["bytes_out"] / max(summary["bytes_in"], 1)
    print(f"converted {summary['src']} -> {summary['dst']} (--to {args.to}): {summary['quantized']} quantized, "
          f"{summary['dequantized']} dequantized; {summary['bytes_in'] / 1e6:,.1f} MB -> "
          f"{summary['bytes_out'] / 1e6:,.1f} MB ({ratio:.2f}x)")
    if args.json:
        write_json(args.json, summary)
    return 0
