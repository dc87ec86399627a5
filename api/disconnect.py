"""Stop the work of an HTTP request whose client has gone.

While a request generates, a watcher awaits the ASGI ``http.disconnect`` message (the body
has been read by then, so the next message can only be the disconnect). When it arrives the
work is cancelled; the cancellation reaches ``AsyncEngine.generate``, which aborts the engine
request before the next step and frees its blocks. Detection does not wait for a write: a
non-streaming request is stopped while it is still prefilling or decoding. The same path
stops every request when the server's shutdown grace period is over (``ServerState.stopping``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Coroutine
from typing import Any, TypeVar

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

T = TypeVar("T")


async def wait_for_disconnect(receive: Receive) -> None:
    """Return when the client disconnects (call only after the request body was read)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def run_until_disconnect(
    receive: Receive, work: Coroutine[Any, Any, T], stop: asyncio.Event | None = None
) -> T | None:
    """``await work``, unless the client disconnects (or ``stop`` is set: the server is
    shutting down) first: then cancel it, wait until its clean-up ran, and return None. If
    the caller is cancelled, ``work`` is cancelled and awaited the same way before the
    cancellation propagates."""
    work_task = asyncio.ensure_future(work)
    watchers: list[asyncio.Future[Any]] = [asyncio.ensure_future(wait_for_disconnect(receive))]
    if stop is not None:
        watchers.append(asyncio.ensure_future(stop.wait()))
    try:
        await asyncio.wait({work_task, *watchers}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for watcher in watchers:
            watcher.cancel()
        if not work_task.done():
            work_task.cancel()
        await asyncio.gather(work_task, *watchers, return_exceptions=True)
    if work_task.cancelled():
        return None
    return work_task.result()


async def aclose_quietly(iterator: object) -> None:
    """Close an async generator now (its ``finally`` runs); other iterators are left alone."""
    aclose = getattr(iterator, "aclose", None)
    if aclose is not None:
        await aclose()


class StreamingUntilDisconnect(StreamingResponse):
    """A ``StreamingResponse`` that stops producing as soon as the client disconnects (whatever
    ASGI spec version the server speaks) or ``stop`` is set, and always closes its body
    iterator, so the generators under it run their clean-up (the engine abort) at once, not
    at garbage collection."""

    def __init__(
        self, content: AsyncIterator[str], media_type: str, stop: asyncio.Event | None = None
    ) -> None:
        super().__init__(content, media_type=media_type)
        self.stop = stop

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await run_until_disconnect(receive, self.stream_response(send), self.stop)
        finally:
            with contextlib.suppress(Exception):
                await aclose_quietly(self.body_iterator)
        if self.background is not None:
            await self.background()
