"""Replies on the wire: server-sent events, whole JSON replies, and the two ways a reply can end
before it is complete.

Both API styles stream ``data: {json}`` events; the Responses API also names each event
(``event: response.output_text.delta``). A handler waiting for tokens stops with
:class:`ClientGone` (the connection closed: its sequences are aborted) or :class:`ShuttingDown`
(the server's shutdown deadline passed: streams end with an error event). A whole reply is
encoded off the event loop and in pieces (:func:`json_reply`): prompt logprobs of a long prompt
are millions of values, and ``json.dumps`` would hold the GIL for seconds over them.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from fastapi.responses import Response

from .body import json_size_at_most
from .engine_loop import Delta
from .protocol import APIError

# Values up to this size (compact JSON) are encoded in one call of the C encoder.
_ONE_CALL_BYTES = 64 * 1024

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


def dumps_in_pieces(obj: Any) -> str:
    """``json.dumps(obj, ensure_ascii=False)``, with the big containers encoded element by element, so
    that the interpreter can switch threads in between."""
    if json_size_at_most(obj, _ONE_CALL_BYTES) is not None:
        return json.dumps(obj, ensure_ascii=False)
    if isinstance(obj, dict):
        return "{" + ", ".join(f"{json.dumps(str(k), ensure_ascii=False)}: {dumps_in_pieces(v)}"
                               for k, v in obj.items()) + "}"
    if isinstance(obj, list):
        return "[" + ", ".join(dumps_in_pieces(v) for v in obj) + "]"
    return json.dumps(obj, ensure_ascii=False)


async def json_reply(obj: Any) -> Response:
    """A whole JSON reply, encoded on a worker thread (in pieces)."""
    text = await asyncio.to_thread(dumps_in_pieces, obj)
    return Response(text.encode("utf-8"), media_type="application/json")
