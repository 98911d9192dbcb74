"""Hand a dsv3 checkpoint to other runtimes: ``dsv3 export --to gguf`` writes a GGUF file that an
unmodified llama.cpp loads as its ``deepseek2`` architecture (see :mod:`dsv3.export.gguf`).

The package is cheap to import (the CLI imports it at start-up); the writer and its dependencies
(torch, the ``gguf`` library) load on first use of :func:`export_gguf` / :class:`ExportError`.
"""

from __future__ import annotations

__all__ = ["ExportError", "export_gguf"]


def __getattr__(name: str):
    if name in __all__:
        from . import gguf as _writer
        return getattr(_writer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
