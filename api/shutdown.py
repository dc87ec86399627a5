"""A uvicorn server that drains within a bound on SIGTERM.

    SIGTERM ──> stop accepting (listening sockets closed)
           ──> wait until the engine has no running or waiting request, at most ``grace_s``
           ──> past the deadline: ``ServerState.stopping`` is set; HTTP requests still running
               are aborted and answered 503 ``server_shutting_down``
           ──> uvicorn's shutdown: WebSockets closed with 1012 (their running responses are
               cancelled like on a dropped connection: session turns end PAUSED), exit

The caller then closes sandboxes, stops the engine and releases session leases. A second
SIGTERM, or SIGINT, shuts down at once (uvicorn's own behaviour, with a short
``timeout_graceful_shutdown`` so that cancelled requests get to clean up).
"""

from __future__ import annotations

import logging
import signal
import time
from types import FrameType

import uvicorn

from api.state import ServerState

logger = logging.getLogger("tarry.shutdown")

CLEANUP_TIMEOUT_S = 2  # uvicorn's wait for cancelled requests to finish their clean-up


class DrainingServer(uvicorn.Server):
    """``uvicorn.Server`` whose first SIGTERM drains running responses for up to ``grace_s``.

    The drain is polled from uvicorn's main loop tick (every 0.1 s): no work runs in the
    signal handler. Exits through uvicorn's normal shutdown, so the process exit code is 0.
    """

    def __init__(self, config: uvicorn.Config, state: ServerState, grace_s: float) -> None:
        config.timeout_graceful_shutdown = CLEANUP_TIMEOUT_S
        super().__init__(config)
        self.state = state
        self.grace_s = grace_s
        self.drain_deadline: float | None = None
        self._accepting = True

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig == signal.SIGTERM and self.drain_deadline is None and not self.should_exit:
            self.drain_deadline = time.monotonic() + self.grace_s
            return
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if self.drain_deadline is not None and not self.should_exit:
            self._drain_step()
        return await super().on_tick(counter)

    def _drain_step(self) -> None:
        assert self.drain_deadline is not None
        stats = self.state.async_engine.stats
        busy = stats.num_running + stats.num_waiting
        if self._accepting:
            self._accepting = False
            for server in self.servers:
                server.close()
            logger.warning(
                "SIGTERM: not accepting connections; draining %d request(s) for up to %.1f s",
                busy,
                self.grace_s,
            )
        if busy and time.monotonic() < self.drain_deadline:
            return
        if busy:
            logger.warning("grace period over: stopping %d request(s)", busy)
        self.state.stopping.set()
        self.should_exit = True
