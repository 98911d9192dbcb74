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
import importlib
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
    from .quant.memory import fp8_weight_bytes, format_weight_bytes
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
    p.add_argument("--batch-size", type=positive_int, default=d.batch_size,
                   help="sequences per micro-batch (under torchrun: the global batch, split over ranks)")
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
    p.add_argument("--fp8", action="store_true",
                   help="FP8 mixed precision (DeepSeek-V3 recipe): E4M3 GEMMs in forward and backward with 1x128 "
                        "activation tiles and 128x128 weight blocks, fp32 master weights, bf16 AdamW moments")
    p.add_argument("--fp8-block", type=positive_int, default=d.fp8_block,
                   help="FP8 tile/block size (1xB activation tiles, BxB weight blocks)")
    p.add_argument("--no-progress", action="store_true", help="no live progress bar")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the attention, norms, MLPs and routers (train/compile.py): faster steps "
                        "after a one-off compile (about a minute on CPU; needs a C++ compiler)")
    p.add_argument("--no-fused-ce", dest="fused_ce", action="store_false",
                   help="compute the training loss from full [batch, seq, vocab] logits instead of the fused, "
                        "chunked head + cross-entropy (same loss; slower, more memory; fused: %(default)s)")
    p.add_argument("--ep", type=positive_int, default=d.ep,
                   help="expert-parallel size under torchrun: routed experts split over groups of EP ranks")


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
    if s.get("sample") is not None:
        lines += ["  sample:", "    " + s["sample"].replace("\n", "\n    ")]
    return "\n".join(lines)


# ---------------------------------------------------------------------- experiment
def add_experiment_parser(subparsers):
    p = add_command(subparsers, "experiment", cmd_experiment, help="reproduce a paper ablation at small scale")
    sub = p.add_subparsers(dest="experiment", required=True, metavar="NAME")
    b = sub.add_parser("balance", formatter_class=HelpFormatter,
                       help="aux loss vs aux-loss-free vs no balancing: val ppl and MaxVio",
                       description="Train the same model three ways (classic aux loss alpha=1e-3, aux-loss-free "
                                   "gamma=1e-3, neither) and compare val perplexity, MaxVio_global, MaxVio_batch.")
    add_train_args(b, resume_flag=False)
    b.set_defaults(func=cmd_experiment)
    return sub


def cmd_experiment(args: argparse.Namespace) -> int:
    from .train.experiment_balance import format_table, run_balance_experiment
    cfg = train_config_from_args(args)
    out = args.out or f"runs/experiment-balance-{cfg.preset}"
    results = run_balance_experiment(cfg, out)
    print(format_table(results))
    print(f"written: {out}/balance_results.md, {out}/balance_results.json, {out}/balance.png")
    return 0


# ---------------------------------------------------------------------- generate / chat
def add_engine_args(p: argparse.ArgumentParser) -> None:
    """``--model DIR`` and the engine flags shared by ``generate`` and ``chat``."""
    p.add_argument("--model", metavar="DIR", required=True,
                   help="model directory: config.json, safetensors weights and (unless --tokenizer) tokenizer.json")
    p.add_argument("--tokenizer", metavar="DIR", default=None,
                   help="directory (or file) of the tokenizer.json (default: the model directory)")
    p.add_argument("--speculative", choices=["mtp"], default=None,
                   help="speculative decoding: the model's MTP module drafts tokens, the main model verifies them "
                        "(the output distribution is unchanged)")
    p.add_argument("--num-speculative-tokens", type=positive_int, default=1, metavar="K",
                   help="draft tokens per step with --speculative")
    p.add_argument("--device", default=None, help="torch device (default: cpu)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "auto"], default="float32",
                   help="weights and activations; auto: bfloat16 only on a CPU with bf16 units (AMX / "
                        "AVX512-BF16) where it measures faster than float32, else float32")
    add_engine_speed_args(p)


def add_engine_speed_args(p: argparse.ArgumentParser) -> None:
    """Engine switches shared by ``generate``, ``chat`` and ``serve`` (see docs/engine-performance.md, docs/fp8.md)."""
    p.add_argument("--keep-fp8", action="store_true",
                   help="keep an FP8 checkpoint's weights in FP8 (half the memory of bf16) instead of dequantizing")
    p.add_argument("--quantize", choices=["int8", "int4"], default=None,
                   help="CPU: weight-only quantize the linear layers and routed experts after loading (int8 per "
                        "output channel, int4 in groups of 32), for faster decoding in less memory")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="on CUDA, replay decode steps from captured CUDA graphs (one per batch-size bucket)")
    p.add_argument("--compile", action="store_true",
                   help="run decode steps through torch.compile (on a CPU about 2x eager decoding; on CUDA "
                        "also captured in CUDA graphs); the first step of each batch-size bucket compiles, "
                        "5 s to a few minutes")


def engine_speed_kwargs(args: argparse.Namespace) -> dict:
    """The ``dsv3.LLM`` keyword arguments of the flags added by :func:`add_engine_speed_args`."""
    return {"keep_fp8": args.keep_fp8, "cuda_graphs": args.cuda_graphs, "compile": args.compile,
            "quantize": args.quantize}


def _engine_inputs(args: argparse.Namespace):
    """The model's config and the tokenizer named by the flags, with user errors as CLIError."""
    from .tokenizer import Tokenizer, TokenizerError

    if args.threads is not None:
        import torch
        torch.set_num_threads(args.threads)
    if not os.path.isdir(args.model):
        raise CLIError(f"--model {args.model}: no such model directory")
    config = ModelConfig.from_json_file(args.model)
    try:
        tokenizer = Tokenizer.load(args.tokenizer or args.model)
    except TokenizerError as e:
        hint = "" if args.tokenizer else " (name one with --tokenizer DIR)"
        raise CLIError(f"{e}{hint}") from None
    if tokenizer.vocab_size > config.vocab_size:
        raise CLIError(f"the tokenizer has {tokenizer.vocab_size} ids but the model's vocab_size is "
                       f"{config.vocab_size}: not this model's tokenizer")
    return config, tokenizer


def _sampling_params(**fields):
    """``SamplingParams(**fields)``, an out-of-range value being a user error."""
    from .engine import SamplingParams
    try:
        return SamplingParams(**fields)
    except ValueError as e:
        raise CLIError(str(e)) from None


def _load_llm(args: argparse.Namespace, tokenizer, max_num_seqs: int, max_model_len: int):
    """``dsv3.LLM`` on ``--model`` with a cache for ``max_num_seqs`` sequences of ``max_model_len`` tokens."""
    from .bench.decode import engine_supports_speculative
    from .engine import LLM

    kwargs = {}
    if args.speculative:
        if not engine_supports_speculative():
            raise CLIError("--speculative: this version of the engine has no speculative decoding")
        kwargs = {"speculative": args.speculative, "num_speculative_tokens": args.num_speculative_tokens}
    try:
        return LLM(args.model, tokenizer=tokenizer, device=args.device, dtype=args.dtype, max_num_seqs=max_num_seqs,
                   max_model_len=max_model_len, seed=getattr(args, "seed", None) or 0, **kwargs,
                   **engine_speed_kwargs(args))
    except ValueError as e:
        raise CLIError(str(e)) from None


def _print_spec_stats(llm) -> None:
    """One line of MTP acceptance statistics on stderr (nothing without speculation)."""
    stats = getattr(llm, "spec_stats", None)
    if not getattr(llm, "num_spec", 0) or not stats:
        return
    drafted, accepted = stats.get("drafted", 0), stats.get("accepted", 0)
    rate = stats.get("acceptance_rate", accepted / drafted if drafted else None)
    length = stats.get("mean_accepted_length")
    text = f"MTP drafts: {accepted}/{drafted} accepted"
    if rate is not None:
        text += f" ({100 * rate:.1f}%)"
    if length is not None:
        text += f", {length:.2f} tokens per verification step"
    print(f"[{text}]", file=sys.stderr)


def add_generate_parser(subparsers) -> None:
    p = add_command(subparsers, "generate", cmd_generate, help="generate completions of prompts with the engine",
                    description="Batch generation with dsv3.LLM (paged latent cache, continuous batching). Each "
                                "prompt is encoded with BOS in front, as LLM.encode does. Prints each completion "
                                "(with a header line when there are several), or --json lines.")
    add_engine_args(p)
    p.add_argument("--prompt", action="append", default=[], metavar="TEXT", help="a prompt; repeatable")
    p.add_argument("--prompt-file", metavar="FILE",
                   help="more prompts, one per line (blank lines skipped; - reads standard input)")
    p.add_argument("--max-tokens", type=int, default=64, help="new tokens per prompt, at most")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 is greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 is off)")
    p.add_argument("--top-k", type=int, default=0, help="keep the K most likely tokens (0 is off)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the engine's random stream, for reproducible samples (default: 0)")
    p.add_argument("--stop", action="extend", nargs="+", default=[], metavar="STR",
                   help="stop strings: the completion is cut before the first one")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object per completion: prompt, text, token ids, finish reason")


def _read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if args.prompt_file is not None:
        if args.prompt_file == "-":
            lines = sys.stdin.read().splitlines()
        else:
            with open(args.prompt_file, encoding="utf-8") as f:
                lines = f.read().splitlines()
        prompts += [line for line in lines if line.strip()]
    if not prompts:
        raise CLIError("no prompt: give --prompt TEXT or --prompt-file FILE")
    return prompts


def cmd_generate(args: argparse.Namespace) -> int:
    prompts = _read_prompts(args)
    params = _sampling_params(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                              max_tokens=args.max_tokens, stop=tuple(args.stop))
    config, tokenizer = _engine_inputs(args)
    ids = [[tokenizer.bos_id] + tokenizer.encode(p) for p in prompts]     # as LLM.encode does
    longest = max(len(x) for x in ids)
    if longest + params.max_tokens > config.max_position_embeddings:
        raise CLIError(f"the longest prompt ({longest} tokens) + --max-tokens {params.max_tokens} exceeds the "
                       f"model's context of {config.max_position_embeddings} tokens")
    spec = args.num_speculative_tokens if args.speculative else 0
    llm = _load_llm(args, tokenizer, max_num_seqs=min(len(prompts), 32),
                    max_model_len=longest + params.max_tokens + spec + 1)
    t0 = time.perf_counter()
    try:
        outputs = llm.generate(ids, params)
    except ValueError as e:
        raise CLIError(str(e)) from None
    elapsed = time.perf_counter() - t0
    for i, (prompt, out) in enumerate(zip(prompts, outputs)):
        if args.json:
            print(json.dumps({"index": i, "prompt": prompt, "text": out.text, "token_ids": out.token_ids,
                              "prompt_token_ids": out.prompt_token_ids, "finish_reason": out.finish_reason,
                              "num_tokens": len(out.token_ids)}, ensure_ascii=False))
        else:
            if len(prompts) > 1:
                head = prompt if len(prompt) <= 60 else prompt[:57] + "..."
                print(f"--- [{i + 1}/{len(prompts)}] {head!r} ({out.finish_reason}, {len(out.token_ids)} tokens)")
            print(out.text)
    sys.stdout.flush()                 # the completions first, then the statistics on stderr
    n_tokens = sum(len(o.token_ids) for o in outputs)
    print(f"[{len(outputs)} completion{'s' * (len(outputs) != 1)}, {n_tokens} tokens in {elapsed:.2f} s, "
          f"{n_tokens / max(elapsed, 1e-9):.1f} tokens/s]", file=sys.stderr)
    _print_spec_stats(llm)
    return 0


def add_chat_parser(subparsers) -> None:
    p = add_command(subparsers, "chat", cmd_chat, help="chat with a model in the terminal (or through a pipe)",
                    description="Reads one user message per line from standard input (a terminal or a pipe; "
                                "/exit or end of input stops, /reset forgets the conversation), renders the "
                                "conversation with the DeepSeek-V3 chat template and streams the reply as it "
                                "is generated. With --think the model reasons first: the reasoning is shown "
                                "dimmed (or after 'thinking: ' when not on a terminal) and only the final answer "
                                "is kept in the conversation.")
    add_engine_args(p)
    p.add_argument("--think", action="store_true", help="thinking mode: the reply opens with <think> reasoning")
    p.add_argument("--system", metavar="TEXT", default=None, help="a system message")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature; 0 is greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 is off)")
    p.add_argument("--max-tokens", type=int, default=256, help="new tokens per reply, at most")
    p.add_argument("--seed", type=int, default=None, help="seed of the engine's random stream (default: 0)")


def cmd_chat(args: argparse.Namespace) -> int:
    from .tokenizer import SPECIAL_TOKENS, THINK_BEGIN, THINK_END, USER_TOKEN, split_thinking

    config, tokenizer = _engine_inputs(args)
    context = config.max_position_embeddings
    stop_ids = {tokenizer.eos_id}
    if config.eos_token_id is not None:
        stop_ids.add(config.eos_token_id)
    try:
        stop_ids.add(tokenizer.token_id(USER_TOKEN))      # a model starting the next user turn is done
    except KeyError:
        pass
    params = _sampling_params(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens,
                              stop_token_ids=tuple(sorted(stop_ids)))
    if params.max_tokens >= context:
        raise CLIError(f"--max-tokens {params.max_tokens} leaves no room for the conversation in the model's "
                       f"context of {context} tokens")
    think_end = tokenizer.token_id(THINK_END) if args.think else None
    llm = _load_llm(args, tokenizer, max_num_seqs=1, max_model_len=context)

    out = sys.stdout
    tty = out.isatty()
    dim_on, dim_off = ("\x1b[2m", "\x1b[0m") if tty else ("thinking: ", "")
    interactive = sys.stdin.isatty()
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = []

    def fit(messages: list[dict]) -> list[int] | None:
        """The prompt ids, dropping the oldest turns until prompt + reply fit the context."""
        while True:
            ids = tokenizer.render_chat(system + messages, add_generation_prompt=True, thinking=args.think)
            if len(ids) + params.max_tokens <= context:
                return ids
            if len(messages) <= 1:
                return None
            del messages[0]

    while True:
        if interactive:
            try:
                line = input("> ")
            except EOFError:
                print(file=out)
                break
        else:
            line = sys.stdin.readline()
            if not line:
                break
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            history.clear()
            continue
        history.append({"role": "user", "content": line})
        ids = fit(history)
        if ids is None:
            history.pop()
            print(f"{PROG}: message too long for the model's context of {context} tokens", file=sys.stderr)
            continue
        reply: list[int] = []
        pieces = tokenizer.decode_stream(skip_special_tokens=True)
        reasoning = args.think
        if reasoning:
            out.write(dim_on)
        for result in llm.stream(ids, params):
            for tok in result.token_ids[len(reply):]:
                if tok in stop_ids:
                    continue
                if reasoning and tok == think_end:
                    reasoning = False
                    out.write(dim_off + "\n")
                    continue
                out.write(pieces.step(tok))
            reply = list(result.token_ids)
            out.flush()
        out.write((dim_off if reasoning else "") + "\n")
        out.flush()
        text = tokenizer.decode([t for t in reply if t not in stop_ids])
        _, content = split_thinking(THINK_BEGIN + text if args.think else text)
        for special in SPECIAL_TOKENS:
            content = content.replace(special, "")
        history.append({"role": "assistant", "content": content.strip()})
    _print_spec_stats(llm)
    return 0


# ---------------------------------------------------------------------- bench
def add_bench_parser(subparsers):
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
    t.add_argument("--plain-ce", action="store_true",
                   help="also time ours with full logits + F.cross_entropy instead of the fused head (extra line)")
    t.add_argument("--compile", action="store_true",
                   help="also time ours with torch.compile on attention, norms, MLPs and routers (extra line; "
                        "compiles during --warmup)")
    t.add_argument("--torchtitan", action="store_true",
                   help="also try torchtitan's DeepSeek-V3 (if installed) and record whether it runs")
    t.add_argument("--transformers", nargs="+", default=["sdpa"], metavar="ATTN[/EXPERTS]",
                   help="transformers variants: attention implementation, optionally /experts implementation "
                        "(e.g. sdpa eager sdpa/eager); the first is the reference of the ratio")
    t.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    t.add_argument("--json", metavar="FILE", help="also write the full result as JSON to FILE")
    t.set_defaults(func=cmd_bench, bench_run=_cmd_bench_train)
    d = sub.add_parser("decode", formatter_class=HelpFormatter,
                       help="decode tokens/s: our engine vs llama.cpp / vLLM / transformers, and the roofline",
                       description="Greedy generation of the same random prompts (seeded, all --prompt-len "
                                   "tokens) for exactly --gen-len new tokens (EOS ignored), by our engine (dsv3.LLM) "
                                   "and each --peer on the same checkpoint at the same precision (--dtype float32: "
                                   "llama.cpp f32, vLLM float32; bfloat16: bf16 / bfloat16; --quantize int8: "
                                   "llama.cpp q8_0, vLLM skipped) and threads, rounds interleaved, for each --batch "
                                   "size; report prefill time, ms per decode step, decode and end-to-end tokens/s, "
                                   "the ratio ours/peer, greedy agreement (identical sequences, first divergence), "
                                   "bytes per decode step, a bandwidth probe and the fraction of the memory "
                                   "roofline reached. Default peer: transformers (whose fp32 greedy tokens must "
                                   "equal ours). --speculative mtp adds our engine with MTP speculative decoding: "
                                   "speedup, acceptance rate, mean accepted length.")
    d.add_argument("--model", metavar="DIR", default=None,
                   help="checkpoint directory (config.json + safetensors); required unless --random-preset")
    d.add_argument("--random-preset", metavar="NAME", default=None,
                   help="instead of --model: a random-weight preset model (e.g. v2-lite); times our engine eagerly "
                        "and with CUDA graphs and reports the memory-bandwidth roofline fraction (no transformers)")
    d.add_argument("--dtype", default=None,
                   help="our precision and the peers' equal one: float32, bfloat16 or auto (what dsv3 would "
                        "pick on this CPU; default float32; with --random-preset the weights dtype, default "
                        "bfloat16)")
    d.add_argument("--quantize", default=None, choices=["int8", "int4"],
                   help="our weights quantized weight-only (int8 is compared with llama.cpp q8_0)")
    d.add_argument("--peer", action="append", default=None, metavar="NAME",
                   choices=["transformers", "llama.cpp", "vllm", "none"],
                   help="peer to compare with, repeatable: transformers (default), llama.cpp (the checkpoint "
                        "converted to GGUF), vllm (vLLM's CPU build in .venv-vllm); none: ours alone")
    d.add_argument("--gguf-dir", metavar="DIR", default=None,
                   help="keep the GGUF files converted for llama.cpp here and reuse them (default: a temporary "
                        "directory)")
    d.add_argument("--no-roofline", action="store_true",
                   help="skip the bandwidth probe and the roofline fractions")
    d.add_argument("--compile", action="store_true",
                   help="also time our engine with torch.compile'd decode steps (LLM(compile=True)); "
                        "compilation happens in the warmup round and is reported")
    d.add_argument("--batch", default="1", metavar="B[,B...]",
                   help="sequences generated together; several sizes separated by commas (e.g. 1,8,32) are run "
                        "one after another (--random-preset: one size)")
    d.add_argument("--prompt-len", type=positive_int, default=32, help="tokens per prompt")
    d.add_argument("--gen-len", type=positive_int, default=64, help="new tokens per sequence")
    d.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's choice)")
    d.add_argument("--repeats", type=positive_int, default=3, help="timed rounds (the median is reported)")
    d.add_argument("--warmup", type=int, default=1, help="untimed rounds before them (of a few tokens)")
    d.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    d.add_argument("--speculative", choices=["mtp"], default=None,
                   help="also time our engine with MTP speculative decoding")
    d.add_argument("--num-speculative-tokens", type=positive_int, default=1, metavar="K",
                   help="draft tokens per step with --speculative")
    d.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    d.add_argument("--json", metavar="FILE", help="also write the full result as JSON to FILE")
    d.set_defaults(func=cmd_bench, bench_run=_cmd_bench_decode)
    return sub


def cmd_bench(args: argparse.Namespace) -> int:
    return args.bench_run(args)


def _cmd_bench_train(args: argparse.Namespace) -> int:
    from .bench.train import bench_train, format_bench_train
    if args.warmup < 0:
        raise CLIError(f"--warmup must be >= 0, got {args.warmup}")
    try:
        result = bench_train(preset=args.preset, batch_size=args.batch_size, seq_len=args.seq_len, steps=args.steps,
                             warmup=args.warmup, threads=args.threads, seed=args.seed, mtp=args.mtp,
                             torchtitan=args.torchtitan, transformers_variants=args.transformers, device=args.device,
                             plain_ce=args.plain_ce, compile=args.compile)
    except ValueError as e:
        raise CLIError(str(e)) from e
    print(format_bench_train(result))
    if args.json:
        _write_json(args.json, result)
    if result.get("first_loss_match") is False:
        print(f"{PROG}: error: first-step losses differ by {result['first_loss_abs_diff']:.3g}: "
              f"not the same model", file=sys.stderr)
        return 1
    return 0


def _write_json(path: str, result: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    print(f"written: {path}")


def _cmd_bench_roofline(args: argparse.Namespace) -> int:
    from .bench.decode import bench_decode_roofline, format_bench_roofline, parse_batches
    if args.model is not None or args.speculative or args.peer:
        raise CLIError("--random-preset replaces --model and takes no --speculative or --peer")
    try:
        batches = parse_batches(args.batch)
        if len(batches) != 1:
            raise ValueError(f"--random-preset takes one --batch size, got {args.batch}")
        result = bench_decode_roofline(args.random_preset, dtype=args.dtype or "bfloat16", batch=batches[0],
                                       prompt_len=args.prompt_len, gen_len=args.gen_len, repeats=args.repeats,
                                       seed=args.seed, device=args.device, threads=args.threads,
                                       compile=args.compile, quantize=args.quantize)
    except ValueError as e:
        raise CLIError(str(e)) from e
    print(format_bench_roofline(result))
    if args.json:
        _write_json(args.json, result)
    return 0


def _cmd_bench_decode(args: argparse.Namespace) -> int:
    from .bench.decode import bench_decode, format_bench_decode
    if args.warmup < 0:
        raise CLIError(f"--warmup must be >= 0, got {args.warmup}")
    if args.random_preset is not None:
        return _cmd_bench_roofline(args)
    if args.model is None:
        raise CLIError("bench decode needs --model DIR (or --random-preset NAME)")
    peers = args.peer
    if peers is not None and "none" in peers:
        if len(peers) > 1:
            raise CLIError("--peer none runs ours alone; it cannot be combined with other --peer values")
        peers = []
    try:
        result = bench_decode(args.model, batch=args.batch, prompt_len=args.prompt_len, gen_len=args.gen_len,
                              threads=args.threads, seed=args.seed, speculative=args.speculative,
                              num_speculative_tokens=args.num_speculative_tokens, repeats=args.repeats,
                              warmup=args.warmup, device=args.device, compile=args.compile, peers=peers,
                              dtype=args.dtype or "float32", quantize=args.quantize, gguf_dir=args.gguf_dir,
                              roofline=not args.no_roofline, progress=lambda line: print(line, file=sys.stderr,
                                                                                          flush=True))
    except ValueError as e:
        raise CLIError(str(e)) from e
    print(format_bench_decode(result))
    if args.json:
        _write_json(args.json, result)
    if result.get("tokens_must_match") and result.get("tokens_identical") is False:
        bad = []
        for run in result["runs"]:
            a = run["agreement"].get("transformers")
            if a is not None and not a["identical"]:
                differ = a["sequences"] - a["identical_sequences"]
                bad.append(f"batch {run['batch']}: {differ} of {a['sequences']} sequences")
        print(f"{PROG}: error: fp32 greedy tokens of ours and transformers differ ({'; '.join(bad)})",
              file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------------- entry point
# One function per subcommand, each adding its parser (and its cmd_* through add_command).
SUBCOMMANDS: list[Callable] = [add_info_parser, add_train_parser, add_generate_parser, add_chat_parser]

# Subcommands that live beside their feature. Each module defines
# ``add_parsers(subparsers, bench, experiment)``: top-level commands go into ``subparsers``,
# ``dsv3 bench NAME`` into ``bench`` and ``dsv3 experiment NAME`` into ``experiment``. These modules
# must stay cheap to import (heavy imports go inside their cmd_* functions).
FEATURE_CLIS: list[str] = ["dsv3.serve.cli", "dsv3.post.cli", "dsv3.quant.cli", "dsv3.export.cli"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, formatter_class=HelpFormatter,
                                     description="DeepSeek-V3 end to end in readable PyTorch.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in SUBCOMMANDS:
        add(subparsers)
    experiment = add_experiment_parser(subparsers)
    bench = add_bench_parser(subparsers)
    for name in FEATURE_CLIS:
        importlib.import_module(name).add_parsers(subparsers, bench, experiment)
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
