"""``dsv3 export --to gguf DIR OUT.gguf``: a checkpoint for another runtime (``dsv3.export``).

Cheap to import: torch and the ``gguf`` library load inside the command.
"""

from __future__ import annotations

import argparse
import json

from .common import add_command, add_json_arg, reported

FORMATS = ("gguf",)
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")  # dsv3.export.gguf.OUT_TYPES, repeated to keep this import cheap


def register(subparsers) -> None:
    p = add_command(subparsers, "export", cmd_export,
                    help="write a checkpoint for another runtime (--to gguf: llama.cpp / Ollama)",
                    description="--to gguf: one GGUF file for llama.cpp's deepseek2 architecture (MLA with "
                                "kv_b_proj split into attn_k_b/attn_v_b, stacked experts, the V3 router with its "
                                "selection bias and group limit, YaRN, the MTP block as nextn layers), with the "
                                "tokenizer (gpt2 BPE, GPT-2 pre-tokenizer, special tokens as CONTROL) and the chat "
                                "template. Norms, 1-D tensors and the router stay F32; with q8_0, tensors whose "
                                "rows aren't a multiple of 32 fall back to F16 (listed). Configs llama.cpp can't "
                                "represent are refused with the reason.")
    p.add_argument("src", metavar="DIR", help="checkpoint directory (HF layout, with tokenizer.json)")
    p.add_argument("out", metavar="OUT", help="output file, e.g. model.gguf")
    p.add_argument("--to", required=True, choices=FORMATS, help="target format")
    p.add_argument("--type", dest="out_type", choices=GGUF_TYPES, default="f16",
                   help="storage type of the weight matrices")
    p.add_argument("--pre", metavar="NAME", default=None,
                   help="llama.cpp pre-tokenizer name to write (default: detected from tokenizer.json; only the "
                        "GPT-2 byte-level split of dsv3's tokenizer is detected, as 'gpt-2')")
    p.add_argument("--name", default=None, help="general.name in the file (default: the directory name)")
    add_json_arg(p, "the summary")


def cmd_export(args: argparse.Namespace) -> int:
    from ..checkpoint import CheckpointError
    from ..tokenizer import TokenizerError
    from ..export.gguf import ExportError, export_gguf
    with reported(ExportError, CheckpointError, TokenizerError):
        summary = export_gguf(args.src, args.out, args.out_type, pre=args.pre, name=args.name)
    for note in summary["fallbacks"] + summary["notes"]:
        print(f"note: {note}")
    print(f"exported {summary['src']} -> {summary['path']} (gguf {summary['type']}, pre-tokenizer "
          f"{summary['pre']}): {summary['tensors']} tensors, {summary['bytes'] / 1e6:,.1f} MB")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
            f.write("\n")
    return 0
