"""The ``dsv3`` command line (also ``python -m dsv3``).

One module per command group, each with ``register(subparsers)`` that declares its commands (their
flags, and ``cmd_*(args) -> int`` functions that run them); :data:`COMMAND_GROUPS` lists them in
``dsv3 --help`` order. Flags mirroring a config dataclass are generated from it (``fields.py``);
what several groups share is in ``common.py``. The groups import their heavy modules inside the
``cmd_*`` functions. To add a command, add it to the group it belongs to (or a new module here,
named in :data:`COMMAND_GROUPS`).

Exit status: 0 on success. Bad usage is reported by argparse (``usage: ...`` then the error on
stderr, status 2); a user error found while running -- a bad ``config.json``, a missing directory, a
checkpoint that doesn't load -- prints ``dsv3: error: <message>`` on stderr and exits 2, with no
traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from .. import __version__
from .common import PROG, HelpFormatter, user_errors

# dsv3.cli.<name> for each command group, in the order `dsv3 --help` lists them.
COMMAND_GROUPS: list[str] = ["info", "train", "generate", "experiment", "bench", "serve", "post", "eval", "quant",
                             "export"]


def build_parser() -> argparse.ArgumentParser:
    """The parser of every ``dsv3`` command."""
    parser = argparse.ArgumentParser(prog=PROG, formatter_class=HelpFormatter,
                                     description="DeepSeek-V3 end to end in readable PyTorch.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_GROUPS:
        importlib.import_module(f"{__name__}.{name}").register(subparsers)
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
        if isinstance(e, user_errors()):
            parser.exit(2, f"{PROG}: error: {e}\n")
        raise

