"""Merge several async streams into one, items tagged with their stream's index."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, TypeVar

from api.disconnect import aclose_quietly

T = TypeVar("T")
_DONE = object()


async def merge_streams(streams: list[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """``(stream index, item)`` in arrival order until every stream is exhausted.

    Contract: an exception of any stream is raised here (the other streams are then closed);
    when the caller stops early (or is cancelled) every stream is closed before this
    generator's clean-up returns, so their own clean-up (e.g. an engine abort) has run.
    """
    if len(streams) == 1:
        try:
            async for item in streams[0]:
                yield 0, item
        finally:
            await aclose_quietly(streams[0])
        return
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

    async def pump(stream_idx: int, stream: AsyncIterator[T]) -> None:
        try:
            async for item in stream:
                await queue.put((stream_idx, item))
            await queue.put((stream_idx, _DONE))
        except Exception as exc:
            await queue.put((stream_idx, exc))
        finally:
            await aclose_quietly(stream)

    tasks = [asyncio.create_task(pump(idx, stream)) for idx, stream in enumerate(streams)]
    try:
        num_open = len(tasks)
        while num_open:
            stream_idx, item = await queue.get()
            if item is _DONE:
                num_open -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield stream_idx, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
