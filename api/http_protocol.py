"""uvicorn's h11 protocol with a header-read timeout, so idle or half-open connections close.

uvicorn arms its keep-alive timer only after a response, and disarms it on any byte: a client
that connects and sends nothing, or trickles a request's headers, holds its connection (and a
slot) forever. ``header_timeout_protocol(t)`` returns an ``H11Protocol`` subclass that closes a
connection whose request headers are not complete ``t`` seconds after it opened or after its
previous response ended. A connection upgraded to a WebSocket leaves this protocol; the session
protocol's own timeouts (``Limits.first_event_timeout_s``, ``idle_timeout_s``) take over.

The settings reach uvicorn as ``uvicorn.run(..., **uvicorn_limits(limits))``.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol


class HeaderTimeoutH11Protocol(H11Protocol):
    header_timeout_s: float = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer: asyncio.TimerHandle | None = None
        self._arm_header_timer()

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle or self.transport.get_protocol() is not self:
            self._disarm_header_timer()  # a request's headers arrived (or it became a WebSocket)

    def on_response_complete(self) -> None:
        if not self.transport.is_closing():
            self._arm_header_timer()  # the next request's headers are due in time too
        super().on_response_complete()  # may start a pipelined request (which disarms it)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        self._disarm_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timeout)

    def _disarm_header_timer(self) -> None:
        timer = getattr(self, "_header_timer", None)
        if timer is not None:
            timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing() and self.transport.get_protocol() is self:
            self.transport.close()


def header_timeout_protocol(header_timeout_s: float) -> type[HeaderTimeoutH11Protocol]:
    """The protocol class to pass as uvicorn's ``http``."""
    return type(
        "TarryH11Protocol", (HeaderTimeoutH11Protocol,), {"header_timeout_s": header_timeout_s}
    )


def uvicorn_limits(limits: Any) -> dict[str, Any]:
    """uvicorn settings from ``api.state.Limits``: the frame limit as the WebSocket message
    limit, the keep-alive and header timeouts."""
    return {
        "http": header_timeout_protocol(limits.header_timeout_s),
        "ws_max_size": limits.max_frame_bytes,
        "timeout_keep_alive": limits.keep_alive_timeout_s,
    }
