"""A bounded thread pool for server-side tool calls, shared fairly between API keys.

``KeyFairPool(num_workers, per_key).run(key, fn, *args)`` runs the blocking ``fn`` on one of
``num_workers`` threads of its own (never asyncio's default executor, which turn ends and
other bookkeeping use). One key holds at most ``per_key`` workers at a time; its further calls
wait in a queue of that key. When a worker frees, the next call started is the oldest call of
the next key in round-robin order that is under its share, so a key that floods the pool
delays only itself::

    running  A A A A . . . .      (num_workers=8, per_key=4)
    waiting  A: a5 a6 a7 ...      B's call starts at once on a free worker;
             B: b1                A's queue waits for A's own calls to finish.

Contract: ``run`` and the bookkeeping it does are used from one event loop thread only. A
call whose awaiting task is cancelled keeps its worker until ``fn`` really returns (a
thread cannot be stopped), so the bound on threads always holds. ``close`` stops accepting
calls and waits for running ones when ``wait`` is set.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")
DEFAULT_TOOL_WORKERS = 8  # --tool-workers
DEFAULT_TOOL_WORKERS_PER_KEY = 4  # --tool-workers-per-key


class ToolPoolClosedError(RuntimeError):
    """The pool was closed (server shutdown)."""


class KeyFairPool:
    """Bounded workers with a per-key share (see the module docstring)."""

    def __init__(self, num_workers: int, per_key: int, name: str = "tarry-tool") -> None:
        if num_workers < 1 or per_key < 1:
            raise ValueError("num_workers and per_key must be at least 1")
        self.num_workers = num_workers
        self.per_key = min(per_key, num_workers)
        self._executor = ThreadPoolExecutor(num_workers, name)
        self._num_running = 0  # workers held, including calls started but not yet submitted
        self._running_by_key: dict[str, int] = {}
        self._waiting_by_key: dict[str, deque[asyncio.Future[None]]] = {}
        self._key_order: deque[str] = deque()  # keys with waiting calls, round-robin order
        self._closed = False

    def num_running(self, key: str | None = None) -> int:
        if key is None:
            return self._num_running
        return self._running_by_key.get(key, 0)

    def num_waiting(self, key: str | None = None) -> int:
        if key is None:
            return sum(len(queue) for queue in self._waiting_by_key.values())
        return len(self._waiting_by_key.get(key, ()))

    async def run(self, key: str, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on a worker once ``key`` may have one; its result or exception.

        Raises ``ToolPoolClosedError`` when the pool is (or gets) closed before it starts.
        """
        if self._closed:
            raise ToolPoolClosedError("the tool pool is closed")
        loop = asyncio.get_running_loop()
        if self._may_start(key) and not self._waiting_by_key:
            self._hold(key)
        else:
            await self._wait_for_turn(key, loop)
        try:
            future: Future[T] = self._executor.submit(fn, *args)
        except RuntimeError as error:  # executor shut down meanwhile
            self._release(key)
            raise ToolPoolClosedError("the tool pool is closed") from error
        future.add_done_callback(lambda _: self._release_from_thread(loop, key))
        return await asyncio.wrap_future(future)

    def close(self, wait: bool = False) -> None:
        """Refuse new calls, fail waiting ones, and stop the threads (after running calls)."""
        self._closed = True
        for queue in self._waiting_by_key.values():
            for ticket in queue:
                if not ticket.done():
                    ticket.set_exception(ToolPoolClosedError("the tool pool is closed"))
        self._waiting_by_key.clear()
        self._key_order.clear()
        self._executor.shutdown(wait=wait, cancel_futures=True)

    def check_integrity(self) -> None:
        assert 0 <= self._num_running <= self.num_workers
        assert self._num_running == sum(self._running_by_key.values())
        assert all(0 < n <= self.per_key for n in self._running_by_key.values())
        assert set(self._key_order) == set(self._waiting_by_key)
        assert all(self._waiting_by_key.values())

    # -- bookkeeping (event loop thread) -----------------------------------------------------

    def _may_start(self, key: str) -> bool:
        return self._num_running < self.num_workers and self.num_running(key) < self.per_key

    def _hold(self, key: str) -> None:
        self._num_running += 1
        self._running_by_key[key] = self._running_by_key.get(key, 0) + 1

    def _release_from_thread(self, loop: asyncio.AbstractEventLoop, key: str) -> None:
        # A closed loop (server stopped) raises RuntimeError: nothing waits any more.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._release, key)

    def _release(self, key: str) -> None:
        self._num_running -= 1
        remaining = self._running_by_key[key] - 1
        if remaining:
            self._running_by_key[key] = remaining
        else:
            del self._running_by_key[key]
        self._start_waiting()

    async def _wait_for_turn(self, key: str, loop: asyncio.AbstractEventLoop) -> None:
        ticket: asyncio.Future[None] = loop.create_future()
        if key not in self._waiting_by_key:
            self._waiting_by_key[key] = deque()
            self._key_order.append(key)
        self._waiting_by_key[key].append(ticket)
        self._start_waiting()  # a worker may be free for this key right now
        try:
            await ticket
        except asyncio.CancelledError:
            if ticket.done() and not ticket.cancelled():
                self._release(key)  # granted, but the caller went away before using it
            else:
                self._forget_ticket(key, ticket)
            raise

    def _forget_ticket(self, key: str, ticket: asyncio.Future[None]) -> None:
        queue = self._waiting_by_key.get(key)
        if queue is None:
            return
        try:
            queue.remove(ticket)
        except ValueError:
            return
        if not queue:
            del self._waiting_by_key[key]
            self._key_order.remove(key)

    def _start_waiting(self) -> None:
        """Grant free workers to waiting calls, one key at a time in round-robin order."""
        num_keys_tried = 0
        while self._key_order and self._num_running < self.num_workers:
            if num_keys_tried >= len(self._key_order):
                return  # every waiting key is at its share
            key = self._key_order[0]
            self._key_order.rotate(-1)
            if self.num_running(key) >= self.per_key:
                num_keys_tried += 1
                continue
            num_keys_tried = 0
            queue = self._waiting_by_key[key]
            ticket = queue.popleft()
            if not queue:
                del self._waiting_by_key[key]
                self._key_order.remove(key)
            if ticket.done():  # its caller was cancelled; it forgets the ticket itself
                continue
            self._hold(key)
            ticket.set_result(None)
