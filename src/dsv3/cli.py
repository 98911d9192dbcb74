"""The ``dsv3`` command line (also ``python -m dsv3``).

Each subcommand is two things side by side in this file: ``add_<name>_parser(subparsers)``, which
declares its flags, and ``cmd_<name>(args) -> int``, which runs it. To add one, write the pair and
append the ``add_..._parser`` function to ``SUBCOMMANDS``.

Exit status: 0 on success. Bad usage is reported by argparse (``usage: ...`` then the error on
stderr, status 2); a user error found while running -- a bad ``config.json``, a missing directory, a
checkpoint that doesn't load -- prints ``dsv3: error: <message>`` on stderr and exits 2, with no
traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Callable

from . import __version__
from .config import PRESETS, ConfigError, ModelConfig, preset

PROG = "dsv3"


class CLIError(Exception):
    """A user error detected by a subcommand; shown as ``dsv3: error: <message>``, exit status 2."""


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean the user asked for something wrong (no traceback for these)."""
    errors: list[type[BaseException]] = [CLIError, ConfigError, OSError]
    try:  # checkpoint I/O is optional at import time (it pulls in safetensors)
        from . import CheckpointError
        errors.append(CheckpointError)
    except (ImportError, AttributeError):
        pass
    return tuple(errors)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every flag's default, except ``None`` defaults whose help text says what happens instead."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid positive integer: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def add_command(subparsers, name: str, func: Callable[[argparse.Namespace], int], help: str,
                description: str | None = None) -> argparse.ArgumentParser:
    """Declare subcommand ``name`` run by ``func(args)``; returns its parser for the flags."""
    p = subparsers.add_parser(name, help=help, description=description or help, formatter_class=HelpFormatter)
    p.set_defaults(func=func)
    return p


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


# ---------------------------------------------------------------------- info
DTYPES = ("bf16", "fp16", "fp32", "fp8")
FORWARD_MAX_PARAMS = 2_000_000_000   # --forward builds the model on one device: keep it small
INFO_SEQ_LEN = 4096                  # FLOPs context when --seq-len is not given
FORWARD_SEQ_LEN = 64                 # --forward batch length when --seq-len is not given


def add_info_parser(subparsers) -> None:
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
    from .accounting import format_summary, summary

    config, name = load_config(args)
    flops_seq = args.seq_len or INFO_SEQ_LEN
    s = summary(config, seq_len=flops_seq, dtype=args.dtype, name=name)
    status = 0
    if args.forward:
        s["forward"] = _run_forward(config, s["params"], args)
        status = 0 if s["forward"]["params_match"] else 1
    if args.json:
        print(json.dumps(s, indent=2))
    else:
        print(format_summary(s))
        if args.forward:
            print(_format_forward(s["forward"]))
    if status:
        print(f"{PROG}: error: measured parameter count differs from the formula", file=sys.stderr)
    return status


def _run_forward(config: ModelConfig, params: dict, args: argparse.Namespace) -> dict:
    """Build ``config`` with random weights, run one batch, and measure what the formula predicts."""
    import torch

    from .model import Transformer

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


# ---------------------------------------------------------------------- train
def nonneg_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number: {text!r}") from None
    if not value >= 0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def fraction(text: str) -> float:
    value = nonneg_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def add_train_args(p: argparse.ArgumentParser, resume_flag: bool = True) -> None:
    """The flags of ``dsv3 train`` (also used by experiments); defaults come from TrainConfig."""
    from .train.trainer import TrainConfig
    d = TrainConfig()
    p.add_argument("--preset", choices=sorted(PRESETS), default=d.preset, help="model shape")
    p.add_argument("--data", nargs="+", metavar="PATH",
                   help="text files, directories or JSONL (`text` field); default: the standard library's .py sources")
    p.add_argument("--out", metavar="DIR", help="output directory (default: runs/<preset>)")
    if resume_flag:
        p.add_argument("--resume", metavar="DIR",
                       help="continue the run in DIR from its last complete checkpoint (its settings are kept; "
                            "--max-steps may extend it)")
    p.add_argument("--max-steps", type=positive_int, default=None, help=f"optimizer steps (default: {d.max_steps})")
    p.add_argument("--batch-size", type=positive_int, default=d.batch_size, help="sequences per micro-batch")
    p.add_argument("--seq-len", type=positive_int, default=d.seq_len, help="tokens per sequence")
    p.add_argument("--grad-accum", type=positive_int, default=d.grad_accum, help="micro-batches per step")
    p.add_argument("--lr", type=nonneg_float, default=d.lr, help="peak learning rate")
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help="linear warmup steps")
    p.add_argument("--decay-start", type=fraction, default=d.decay_start,
                   help="fraction of the run after which the cosine decay starts")
    p.add_argument("--min-lr-ratio", type=fraction, default=d.min_lr_ratio, help="final LR as a fraction of --lr")
    p.add_argument("--weight-decay", type=nonneg_float, default=d.weight_decay, help="AdamW decay on matrices")
    p.add_argument("--grad-clip", type=nonneg_float, default=d.grad_clip, help="gradient norm clip")
    p.add_argument("--seed", type=int, default=d.seed, help="seed for init, data order and FIM")
    p.add_argument("--save-every", type=int, default=d.save_every, help="checkpoint every N steps (0: only final)")
    p.add_argument("--eval-every", type=int, default=d.eval_every, help="validate every N steps (0: only at the end)")
    p.add_argument("--eval-batches", type=positive_int, default=d.eval_batches, help="validation batches")
    p.add_argument("--keep-checkpoints", type=positive_int, default=d.keep_checkpoints,
                   help="how many checkpoint-STEP dirs to keep")
    p.add_argument("--bias-update-rate", type=nonneg_float, default=d.bias_update_rate,
                   help="gamma of aux-loss-free balancing (0 switches it off)")
    p.add_argument("--seq-aux-alpha", type=nonneg_float, default=d.seq_aux_alpha,
                   help="alpha of the complementary sequence-wise balance loss (0: off)")
    p.add_argument("--aux-loss-alpha", type=nonneg_float, default=d.aux_loss_alpha,
                   help="alpha of the classic batch-wise auxiliary balance loss (0: off)")
    p.add_argument("--mtp-depth", type=int, default=None, help="MTP depth D (default: the preset's)")
    p.add_argument("--mtp-weight", type=nonneg_float, default=d.mtp_weight, help="MTP loss weight lambda")
    p.add_argument("--fim-rate", type=fraction, default=d.fim_rate, help="fraction of documents in FIM (PSM) form")
    p.add_argument("--vocab-size", type=positive_int, default=d.vocab_size, help="BPE vocabulary size")
    p.add_argument("--val-fraction", type=fraction, default=d.val_fraction, help="documents held out for validation")
    p.add_argument("--tokenizer-train-mb", type=nonneg_float, default=d.tokenizer_train_mb,
                   help="MB of training text the BPE tokenizer is learned from")
    p.add_argument("--model-set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a ModelConfig field of the preset (JSON value), e.g. hidden_size=128; repeatable")
    p.add_argument("--max-nonfinite", type=positive_int, default=d.max_nonfinite,
                   help="stop after this many non-finite losses in a row")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--no-progress", action="store_true", help="no live progress bar")


def train_config_from_args(args: argparse.Namespace):
    from .train.trainer import TrainConfig
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    values["progress"] = not args.no_progress
    overrides = {}
    for item in args.model_set:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise CLIError(f"--model-set {item!r}: expected FIELD=VALUE")
        try:
            overrides[key] = json.loads(raw)
        except json.JSONDecodeError:
            overrides[key] = raw  # a bare string such as topk_method=greedy
    values["model_overrides"] = overrides
    if args.mtp_depth is not None and args.mtp_depth < 0:
        raise CLIError(f"--mtp-depth must be >= 0, got {args.mtp_depth}")
    return TrainConfig(**values)


def add_train_parser(subparsers) -> None:
    p = add_command(subparsers, "train", cmd_train, help="pre-train a model (default: tiny on the stdlib corpus)",
                    description="Pre-train DeepSeek-V3 from scratch: BPE tokenizer, packed data with FIM, AdamW, "
                                "aux-loss-free balancing, MTP. Writes OUT/metrics.jsonl, checkpoints, plots.")
    add_train_args(p)


def cmd_train(args: argparse.Namespace) -> int:
    from .train.trainer import TrainError, train
    cfg = train_config_from_args(args)
    resume = args.resume is not None
    if resume:
        if not os.path.isdir(args.resume):
            raise CLIError(f"--resume {args.resume}: no such run directory")
        cfg.out = args.resume
    try:
        summary = train(cfg, resume=resume, max_steps=args.max_steps)
    except TrainError as e:
        raise CLIError(str(e)) from e
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
    if s.get("sample") is not None:
        lines += ["  sample:", "    " + s["sample"].replace("\n", "\n    ")]
    return "\n".join(lines)


# ---------------------------------------------------------------------- experiment
def add_experiment_parser(subparsers) -> None:
    p = add_command(subparsers, "experiment", cmd_experiment, help="reproduce a paper ablation at small scale")
    sub = p.add_subparsers(dest="experiment", required=True, metavar="NAME")
    b = sub.add_parser("balance", formatter_class=HelpFormatter,
                       help="aux loss vs aux-loss-free vs no balancing: val ppl and MaxVio",
                       description="Train the same model three ways (classic aux loss alpha=1e-3, aux-loss-free "
                                   "gamma=1e-3, neither) and compare val perplexity, MaxVio_global, MaxVio_batch.")
    add_train_args(b, resume_flag=False)
    b.set_defaults(func=cmd_experiment)


def cmd_experiment(args: argparse.Namespace) -> int:
    from .train.experiment_balance import format_table, run_balance_experiment
    cfg = train_config_from_args(args)
    out = args.out or f"runs/experiment-balance-{cfg.preset}"
    results = run_balance_experiment(cfg, out)
    print(format_table(results))
    print(f"written: {out}/balance_results.md, {out}/balance_results.json, {out}/balance.png")
    return 0


# ---------------------------------------------------------------------- bench
def add_bench_parser(subparsers) -> None:
    p = add_command(subparsers, "bench", cmd_bench, help="benchmarks against peer implementations, in one run",
                    description="Each benchmark measures ours and its peers in the same process on the same "
                                "config, data and thread count, and reports the ratio.")
    sub = p.add_subparsers(dest="bench", required=True, metavar="NAME")
    t = sub.add_parser("train", formatter_class=HelpFormatter,
                       help="tokens/s of a full training step: ours vs transformers' DeepseekV3ForCausalLM",
                       description="Time full training steps (forward, cross-entropy, backward, AdamW step) of "
                                   "our model and of transformers' DeepseekV3ForCausalLM holding the same weights, "
                                   "on the same batch and threads (fp32 on CPU, bf16 autocast on CUDA), steps "
                                   "interleaved; report median/mean step time, tokens/s, the ratio, and the "
                                   "first-step losses (which must agree: same model).")
    t.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="model shape (MTP is switched off)")
    t.add_argument("--batch-size", type=positive_int, default=8, help="sequences per step")
    t.add_argument("--seq-len", type=positive_int, default=256, help="tokens per sequence")
    t.add_argument("--steps", type=positive_int, default=5, help="timed steps per implementation")
    t.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    t.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's choice)")
    t.add_argument("--seed", type=int, default=0, help="seed for the weights and the batch")
    t.add_argument("--mtp", action="store_true", help="also time ours with the preset's MTP modules (extra line)")
    t.add_argument("--torchtitan", action="store_true",
                   help="also try torchtitan's DeepSeek-V3 (if installed) and record whether it runs")
    t.add_argument("--transformers", nargs="+", default=["sdpa"], metavar="ATTN[/EXPERTS]",
                   help="transformers variants: attention implementation, optionally /experts implementation "
                        "(e.g. sdpa eager sdpa/eager); the first is the reference of the ratio")
    t.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    t.add_argument("--json", metavar="FILE", help="also write the full result as JSON to FILE")
    t.set_defaults(func=cmd_bench, bench_run=_cmd_bench_train)


def cmd_bench(args: argparse.Namespace) -> int:
    return args.bench_run(args)


def _cmd_bench_train(args: argparse.Namespace) -> int:
    from .bench.train import bench_train, format_bench_train
    if args.warmup < 0:
        raise CLIError(f"--warmup must be >= 0, got {args.warmup}")
    try:
        result = bench_train(preset=args.preset, batch_size=args.batch_size, seq_len=args.seq_len, steps=args.steps,
                             warmup=args.warmup, threads=args.threads, seed=args.seed, mtp=args.mtp,
                             torchtitan=args.torchtitan, transformers_variants=args.transformers, device=args.device)
    except ValueError as e:
        raise CLIError(str(e)) from e
    print(format_bench_train(result))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
        print(f"written: {args.json}")
    if result.get("first_loss_match") is False:
        print(f"{PROG}: error: first-step losses differ by {result['first_loss_abs_diff']:.3g}: "
              f"not the same model", file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------------- entry point
# One function per subcommand, each adding its parser (and its cmd_* through add_command).
SUBCOMMANDS: list[Callable] = [add_info_parser, add_train_parser, add_experiment_parser, add_bench_parser]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, formatter_class=HelpFormatter,
                                     description="DeepSeek-V3 end to end in readable PyTorch.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI on ``argv`` (default ``sys.argv[1:]``) and return the exit status.

    Usage errors and user errors raise ``SystemExit(2)`` after printing to stderr, as argparse does.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # Output piped into e.g. `head`: stop quietly (and keep Python from complaining at exit).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as e:
        if isinstance(e, _user_errors()):
            parser.exit(2, f"{PROG}: error: {e}\n")
        raise


if __name__ == "__main__":
    sys.exit(main())
