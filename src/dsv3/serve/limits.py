"""The server's per-request limits and timeouts, each declared once: :class:`Limits`.

Each field is a ``dsv3 serve`` flag of the same name (``max_messages`` -> ``--max-messages``), its
help text in the field's metadata, its default the value below. A
request over a limit gets a 4xx naming the limit and its flag (:func:`dsv3.serve.protocol.limit_error`);
none of them is reached by an ordinary request. The defaults bound what one request can cost before
the engine sees it: every size check runs before the work it protects (parsing the lists, rendering,
tokenizing, compiling a grammar), and that work runs on a small pool of threads, never on the
event loop, so no request can hold up another's stream or ``/health``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from ..knobs import knob, positive_float, positive_int


def _count(default: int, help: str):
    return knob(default, help, type=positive_int)


def _seconds(default: float, help: str):
    return knob(default, help, type=positive_float)


@dataclass(frozen=True)
class Limits:
    """The limits; each field's ``metadata["help"]`` is its flag's help text (``dsv3.knobs.knob``)."""

    max_body_bytes: int = _count(4 * 1024 * 1024, "largest request body accepted (413 beyond)")
    max_messages: int = _count(1000, "chat messages (or Responses input items) per request")
    max_tools: int = _count(128, "tools per request (OpenAI's limit)")
    max_prompts: int = _count(64, "prompts per completions request")
    max_schema_bytes: int = _count(64 * 1024, "size of one JSON schema (a tool's parameters, a response_format "
                                              "schema) as compact JSON; all tools together may have 4x this")
    grammar_timeout: float = _seconds(10.0, "seconds one grammar (forced tools, JSON output) may take to compile; "
                                            "the compiler runs in a child process that is killed then")
    grammar_cache_mb: int = _count(256, "memory the cached compiled grammars may hold (least recently used go "
                                        "first)")
    prepare_threads: int = _count(4, "threads that validate, render, tokenize and compile requests (never the "
                                     "event loop)")
    max_preparing: int = _count(64, "requests being prepared or waiting for a thread, at most (429 beyond)")
    header_timeout: float = _seconds(10.0, "seconds a client has to send a request's headers (the connection is "
                                           "closed then)")
    body_timeout: float = _seconds(30.0, "seconds a client has to send a request's body (408 then)")
    shutdown_timeout: float = _seconds(30.0, "on SIGTERM, seconds running requests may take to finish; then each "
                                             "stream ends with an error event and [DONE]")

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not value > 0:
                raise ValueError(f"{f.name} must be > 0, got {value}")
