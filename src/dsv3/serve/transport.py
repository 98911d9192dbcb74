"""uvicorn with the two things ``dsv3 serve`` needs and uvicorn lacks: a deadline for a request's
headers, and a shutdown that ends running streams properly.

* :class:`HeaderTimeoutProtocol` (uvicorn's h11 protocol) closes a connection whose request line
  and headers are not complete ``header_timeout`` seconds after the first byte (or after the
  connection opened): a client that sends headers a byte at a time, or connects and says nothing,
  no longer holds a connection for ever. (Bodies have their own deadline, ``--body-timeout``, in
  the app; idle keep-alive connections uvicorn closes itself after ``timeout_keep_alive``.)
* :class:`DrainingServer`, on SIGTERM / SIGINT, tells the app (:meth:`dsv3.serve.app.Server.drain`)
  before uvicorn stops listening: new requests get 503, running ones have ``shutdown_timeout``
  seconds to finish, then each stream ends with an error event and ``[DONE]``. uvicorn's own
  graceful-shutdown timeout is set a little longer, as a backstop.
"""

from __future__ import annotations

import asyncio

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

# Seconds past the app's shutdown deadline that uvicorn waits before it cancels what is left.
BACKSTOP_S = 3


class HeaderTimeoutProtocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request's head (``config.header_timeout``)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout = getattr(self.config, "header_timeout", 10.0)
        self._head_timer: asyncio.TimerHandle | None = None

    def _arm(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.header_timeout, self._head_late)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_late(self) -> None:
        self._head_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()       # headers never completed: nothing to answer

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        # A new request's head starts with this data: its clock starts now.
        if self.conn.their_state is h11.IDLE:
            self._arm()
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._disarm()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)


class DrainingServer(uvicorn.Server):
    """uvicorn's server that starts the app's drain on the first exit signal."""

    def __init__(self, config: uvicorn.Config, drain, shutdown_timeout: float):
        super().__init__(config)
        self._drain, self._shutdown_timeout = drain, shutdown_timeout

    def handle_exit(self, sig, frame) -> None:
        if not self.should_exit:
            self._drain(self._shutdown_timeout)
        super().handle_exit(sig, frame)


def serve(app, host: str, port: int, log_level: str, header_timeout: float, shutdown_timeout: float) -> None:
    """Run ``app`` (from :func:`dsv3.serve.app.create_app`) until a signal, then drain it."""
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, http=HeaderTimeoutProtocol,
                            timeout_graceful_shutdown=int(shutdown_timeout) + BACKSTOP_S)
    config.header_timeout = header_timeout
    DrainingServer(config, app.state.server.drain, shutdown_timeout).run()
