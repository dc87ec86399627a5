"""The ``n`` choices of one chat completion, with the prompt computed once.

Choice 0 is started first; the others start when its first engine output arrives (its
prompt is prefilled by then and every full block of it is in the prefix cache, so each of
them recomputes only the prompt's last, partial block). Each choice is its own response
pipeline (parser, logits processors, seed ``seed + i``), so tool calls and structured outputs
work per choice, and its events come out tagged with the choice's index.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

from api.disconnect import aclose_quietly
from api.response_pipeline import ResponseEvent
from api.stream_merge import merge_streams
from engine.outputs import RequestOutput

T = TypeVar("T")
# Opens choice i: its pipeline events, given the engine outputs' source to watch for prefill.
ChoiceOpener = Callable[[int], AsyncIterator[ResponseEvent]]


async def start_choices(
    open_choice: ChoiceOpener, n: int, prefilled: asyncio.Event
) -> AsyncIterator[tuple[int, ResponseEvent]]:
    """Start the ``n`` choices (module docstring) and pull each one's first event, so that a
    request error is raised here, before a 200 is sent; then every event as ``(choice index,
    event)``. ``prefilled`` is set by choice 0's engine source at its first output (see
    ``signal_first_output``). On an error every started choice is closed (engine aborts)."""
    streams = [open_choice(0)]
    first_of_zero = asyncio.ensure_future(_first(streams[0]))
    try:
        waiter = asyncio.ensure_future(prefilled.wait())
        await asyncio.wait({first_of_zero, waiter}, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        streams += [open_choice(i) for i in range(1, n)]
        heads = await asyncio.gather(
            first_of_zero, *(_first(s) for s in streams[1:]), return_exceptions=True
        )
        errors = [head for head in heads if isinstance(head, BaseException)]
        if errors:
            raise errors[0]
    except BaseException:
        first_of_zero.cancel()
        for stream in streams:
            await aclose_quietly(stream)
        raise
    chained = [_chain(head, stream) for head, stream in zip(heads, streams, strict=True)]
    return merge_streams(chained)  # type: ignore[arg-type]


async def signal_first_output(
    source: AsyncIterator[RequestOutput], prefilled: asyncio.Event
) -> AsyncIterator[RequestOutput]:
    """Pass ``source`` through, setting ``prefilled`` at its first output (or its end)."""
    try:
        async for out in source:
            prefilled.set()
            yield out
    finally:
        prefilled.set()
        await aclose_quietly(source)


async def _first(stream: AsyncIterator[T]) -> T | None:
    try:
        return await stream.__anext__()
    except StopAsyncIteration:
        return None


async def _chain(head: T | None, rest: AsyncIterator[T]) -> AsyncIterator[T]:
    try:
        if head is not None:
            yield head
        async for item in rest:
            yield item
    finally:
        await aclose_quietly(rest)
