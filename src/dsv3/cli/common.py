"""What every command group of the ``dsv3`` CLI shares: the error type, the help format, command
registration, and the flags several groups declare alike (``--device``, ``--json FILE``, the engine's
speed switches). Imports nothing of the command groups, so each of them can import it."""

from __future__ import annotations

import argparse
import json
import os
from contextlib import contextmanager
from typing import Callable, Iterator

PROG = "dsv3"


class CLIError(Exception):
    """A user error detected by a subcommand; shown as ``dsv3: error: <message>``, exit status 2."""


@contextmanager
def reported(*errors: type[BaseException]) -> Iterator[None]:
    """Within the block, ``errors`` are the user's (a bad value, a broken file): re-raised as CLIError."""
    try:
        yield
    except errors as e:
        raise CLIError(str(e)) from e


def require_dir(path: str, flag: str, what: str = "model directory") -> None:
    """CLIError ``FLAG PATH: no such WHAT`` unless ``path`` is a directory."""
    if not os.path.isdir(path):
        raise CLIError(f"{flag} {path}: no such {what}")


def resume_dir(args: argparse.Namespace) -> bool:
    """Whether ``--resume DIR`` was given; if so DIR must be a run directory, and becomes ``args.out``."""
    if args.resume is None:
        return False
    require_dir(args.resume, "--resume", "run directory")
    args.out = args.resume
    return True


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean the user asked for something wrong (no traceback for these)."""
    from ..config import ConfigError

    errors: list[type[BaseException]] = [CLIError, ConfigError, OSError]
    try:  # checkpoint I/O is optional at import time (it pulls in safetensors)
        from .. import CheckpointError
        errors.append(CheckpointError)
    except (ImportError, AttributeError):
        pass
    return tuple(errors)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every flag's default, except ``None`` defaults whose help text says what happens instead.

    A switch shows the setting it controls when not given, not argparse's raw ``False``/``True``:
    ``--compile ... (default: off)``; a ``--no-X`` switch names the setting it turns off, so the
    default can't be read as the flag's: ``--no-progress  no live progress bar (default: progress on)``.
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None:
            return action.help
        if (action.nargs == 0 and isinstance(action.const, bool) and isinstance(action.default, bool)
                and "%(default)" not in (action.help or "")):
            state = "on" if action.default else "off"
            if action.const is False:  # store_false: the flag switches the setting off
                state = f"{action.dest.replace('_', ' ')} {state}"
            return f"{action.help} (default: {state})"
        return super()._get_help_string(action)


def add_command(subparsers, name: str, func: Callable[[argparse.Namespace], int], help: str,
                description: str | None = None) -> argparse.ArgumentParser:
    """Declare subcommand ``name`` run by ``func(args)``; returns its parser for the flags."""
    p = subparsers.add_parser(name, help=help, description=description or help, formatter_class=HelpFormatter)
    p.set_defaults(func=func)
    return p


def add_group(subparsers, name: str, help: str, description: str | None = None):
    """Declare command group ``name`` (``dsv3 NAME SUB ...``); returns the subparsers for its members."""
    p = subparsers.add_parser(name, help=help, description=description or help, formatter_class=HelpFormatter)
    return p.add_subparsers(dest=name, required=True, metavar="NAME")


def add_member(group, name: str, func: Callable[[argparse.Namespace], int], help: str,
               description: str | None = None) -> argparse.ArgumentParser:
    """Declare ``dsv3 GROUP name`` (``group`` from :func:`add_group`) run by ``func(args)``."""
    p = group.add_parser(name, help=help, description=description or help, formatter_class=HelpFormatter)
    p.set_defaults(func=func)
    return p


# ---------------------------------------------------------------------- flags several groups share
DEVICE_DEFAULTS = {"cpu": "cpu", "auto": "cuda if available, else cpu"}


def add_device_arg(p, fallback: str = "auto") -> None:
    """``--device``: a torch device; when not given, ``fallback``: "cpu", or "auto" (cuda if available)."""
    p.add_argument("--device", default=None, help=f"torch device (default: {DEVICE_DEFAULTS[fallback]})")


def add_json_arg(p, what: str = "the full result") -> None:
    """``--json FILE``: also write ``what`` as JSON (see :func:`write_json`)."""
    p.add_argument("--json", metavar="FILE", help=f"also write {what} as JSON to FILE")


def write_json(path: str, result: dict) -> None:
    """Write ``result`` to ``path`` as indented JSON and say so on stdout."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    print(f"written: {path}")


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


def engine_inputs(args: argparse.Namespace):
    """The config of ``--model DIR`` and the tokenizer of ``--tokenizer`` (default: the model's), after
    ``--threads``; user errors (no such directory, no tokenizer, not this model's) as CLIError."""
    from ..config import ModelConfig
    from ..tokenizer import Tokenizer, TokenizerError

    if args.threads is not None:
        import torch
        torch.set_num_threads(args.threads)
    require_dir(args.model, "--model")
    adapter_config = os.path.join(args.model, "adapter_config.json")
    if os.path.isfile(adapter_config) and not os.path.isfile(os.path.join(args.model, "config.json")):
        with open(adapter_config) as f:
            base = json.load(f).get("base_model_name_or_path") or "BASE"
        raise CLIError(f"--model {args.model} is a LoRA adapter, not a model: --model {base} --adapter {args.model}")
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
