"""``dsv3 train``: pre-training; its flags are :class:`dsv3.train.trainer.TrainConfig`'s fields
(:func:`add_train_args`, shared with the training experiments)."""

from __future__ import annotations

import argparse
import json

from .common import CLIError, add_command, reported, require_dir, resume_dir
from .fields import add_dataclass_args, from_args

# TrainConfig fields set through another flag than their own.
EXPLICIT = {"model_overrides": "--model-set"}


def add_train_args(p: argparse.ArgumentParser, resume_flag: bool = True, defaults: dict | None = None,
                   exclude: tuple[str, ...] = ()) -> None:
    """The flags of ``dsv3 train`` (also used by experiments): one per TrainConfig field, plus
    ``--resume DIR`` and ``--model-set FIELD=VALUE``; ``defaults`` replaces some fields' defaults (an
    experiment's shorter runs); ``exclude`` names fields an experiment sets itself (no flag for them).
    Read back with :func:`train_config_from_args`."""
    from ..train.trainer import TrainConfig

    # --max-steps not given stays None, so a resumed run keeps its own step budget.
    add_dataclass_args(p, TrainConfig, exclude={*EXPLICIT, *exclude},
                       defaults_override={"max_steps": None, **(defaults or {})})
    if resume_flag:
        p.add_argument("--resume", metavar="DIR",
                       help="continue the run in DIR from its last complete checkpoint (its settings are kept; "
                            "--max-steps may extend it)")
    p.add_argument("--model-set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a ModelConfig field of the preset (JSON value), e.g. hidden_size=128; repeatable")


def train_config_from_args(args: argparse.Namespace):
    """The TrainConfig of the flags added by :func:`add_train_args`."""
    from ..train.trainer import TrainConfig

    overrides = {}
    for item in args.model_set:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise CLIError(f"--model-set {item!r}: expected FIELD=VALUE")
        try:
            overrides[key] = json.loads(raw)
        except json.JSONDecodeError:
            overrides[key] = raw  # a bare string such as topk_method=greedy
    if args.mtp_depth is not None and args.mtp_depth < 0:
        raise CLIError(f"--mtp-depth must be >= 0, got {args.mtp_depth}")
    return from_args(TrainConfig, args, model_overrides=overrides)


def register(subparsers) -> None:
    p = add_command(subparsers, "train", cmd_train, help="pre-train a model (default: tiny on the stdlib corpus)",
                    description="Pre-train DeepSeek-V3 from scratch: BPE tokenizer, packed data with FIM, AdamW, "
                                "aux-loss-free balancing, MTP. Writes OUT/metrics.jsonl, checkpoints, plots.")
    add_train_args(p)


def cmd_train(args: argparse.Namespace) -> int:
    from ..train.trainer import TrainError, train
    source = None
    if args.extend_context is not None:  # a new stage: --resume names the run it continues, --out the stage's dir
        if args.resume is None:
            raise CLIError("--extend-context L needs --resume RUN: the trained run to continue at L tokens")
        require_dir(args.resume, "--resume", "run directory")
        source, args.resume = args.resume, None
    resume = resume_dir(args)  # --resume DIR becomes --out DIR
    cfg = train_config_from_args(args)
    with reported(TrainError):
        summary = train(cfg, resume=resume, max_steps=args.max_steps, extend_from=source)
    if summary.get("rank", 0) == 0:  # under torchrun only rank 0 prints
        print(format_train_summary(summary))
    return 0


def format_train_summary(s: dict) -> str:
    def num(v, fmt):
        return "n/a" if v is None else format(v, fmt)
    lines = [
        f"run: {s['out']}  ({s['steps']} steps, {s['wall_s']:.0f} s)",
        f"  params        {s['params'] / 1e6:.2f}M total, {s['active_params'] / 1e6:.2f}M active/token, "
        f"{s['mtp_params'] / 1e6:.2f}M MTP",
        f"  throughput    {num(s['tokens_per_s'], ',.0f')} tokens/s",
        f"  val loss      {num(s['val_loss'], '.3f')} nats (ppl {num(s['val_ppl'], '.2f')}); "
        f"unigram baseline {num(s['unigram_baseline_loss'], '.3f')}",
        f"  MaxVio_global {num(s['maxvio_global'], '.3f')}",
        f"  MTP top-1 acc {num(s['mtp_top1_acc'], '.3f')}  (draft acceptance proxy)",
        f"  final model   {s['final']}",
        f"  plots         {', '.join(s['plots']) or 'none'}",
    ]
    ext = s.get("context_extension")
    if ext:
        before = ext.get("val_loss_at_start")
        lines.append(f"  context       stage {ext['stage']}: {ext['from_seq_len']} -> {ext['seq_len']} tokens (YaRN factor "
                     f"{ext['factor']:g}); val loss at {ext['seq_len']} {num(before, '.3f')} before -> "
                     f"{num(s['val_loss'], '.3f')} after")
    if s.get("sample") is not None:
        lines += ["  sample:", "    " + s["sample"].replace("\n", "\n    ")]
    return "\n".join(lines)

