"""Server-sent events, and the two ways a reply can end before it is complete.

Both API styles stream ``data: {json}`` events; the Responses API also names each event
(``event: response.output_text.delta``). A handler waiting for tokens stops with
:class:`ClientGone` (the connection closed: its sequences are aborted) or :class:`ShuttingDown`
(the server's shutdown deadline passed: streams end with an error event).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from .engine_loop import Delta
from .protocol import APIError

log = logging.getLogger("dsv3.serve")


class ClientGone(Exception):
    """The client closed the connection before the reply was complete."""


class ShuttingDown(Exception):
    """The server's shutdown deadline passed before the reply was complete."""


def sse(obj: Any, event: str | None = None) -> str:
    """One server-sent event (with an ``event:`` line for the Responses API's typed events)."""
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def shutting_down() -> APIError:
    """The 503 of a request cut by the shutdown deadline."""
    return APIError(503, "the server is shutting down; the reply is incomplete", "server_error",
                    code="shutting_down")


def raise_engine_error(delta: Delta) -> None:
    """A failed sequence becomes a 500 whose body says nothing internal (the log has the details)."""
    if delta.error:
        log.error("engine error: %s", delta.error)
        raise APIError(500, "internal server error (the details are in the server log)", "server_error")
