"""uvicorn's HTTP/1.1 protocol with a deadline on a request's headers.

uvicorn waits for a request's headers as long as a client cares to send them (one byte at a
time, or nothing after connecting): each such connection costs the service a socket and
memory for good. Here the headers must be complete within ``header_timeout`` seconds
(``DSMI_HEADER_TIMEOUT_SECONDS``, read once per process) of a connection opening or of the
first byte of its next request; otherwise the connection is closed. ``dsmi serve`` names this
class to uvicorn by its import path (``PROTOCOL``), which its worker processes import too.
"""

from __future__ import annotations

import asyncio
import functools

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = ["HeaderDeadlineH11Protocol", "PROTOCOL"]

PROTOCOL = "service.protocol:HeaderDeadlineH11Protocol"


@functools.cache
def _configured_timeout() -> float:
    from .settings import Settings

    return Settings().header_timeout_seconds


class HeaderDeadlineH11Protocol(H11Protocol):
    header_timeout: float | None = None  # None: the settings' (tests set a number)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if self.header_timeout is None:
            self.header_timeout = _configured_timeout()
        super().connection_made(transport)
        self._header_timer: asyncio.TimerHandle | None = None
        self._arm()  # a connection that sends nothing is late too

    def _arm(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout, self._headers_late)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE:  # these bytes start (or continue) headers
            self._arm()
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # the request's headers are complete
            self._disarm()

    def _headers_late(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.logger.info("closing a connection whose request headers took more than "
                             "%.0f s", self.header_timeout)
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)
