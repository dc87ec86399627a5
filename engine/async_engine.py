"""Runs ``LLMEngine`` steps in a background thread and streams outputs to asyncio callers.

The step loop owns the engine; callers only enqueue commands (add / abort) under a lock that
is never held during a forward pass' Python-free waits longer than one step. Each request's
outputs are delivered into its own ``asyncio.Queue`` on the caller's event loop.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[RequestOutput | BaseException]


class EngineDeadError(RuntimeError):
    """The step loop stopped (shutdown or crash); no new requests are accepted."""


class AsyncEngine:
    """Asyncio front of an ``LLMEngine``. Use ``start()`` once, then ``generate``.

    Contract: ``generate`` raises ``InvalidRequestError`` before yielding anything if the
    request is invalid; it yields deltas until one has ``finished``; if the caller stops
    iterating early (or is cancelled) the request is aborted and its blocks freed.
    """

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._streams: dict[str, _Stream] = {}
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._ids = itertools.count()

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="tarry-engine", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    async def generate(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        cache_salt: str = "",
    ) -> AsyncIterator[RequestOutput]:
        if not self.is_running:
            raise EngineDeadError("the engine is not running")
        request_id = request_id or f"req-{next(self._ids)}"
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        with self._lock:
            self.engine.add_request(request_id, prompt, params, cache_salt)
            self._streams[request_id] = stream
        self._wake.set()
        finished = False
        try:
            while not finished:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self.abort(request_id)

    def run_exclusive(self, fn: Callable[..., T], *args: Any) -> T:
        """Call ``fn(*args)`` while no step runs (for engine bookkeeping such as pins).

        Blocks the caller for at most the rest of the current step; keep ``fn`` short.
        """
        with self._lock:
            return fn(*args)

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._streams.pop(request_id, None)
            self.engine.abort_request(request_id)

    def _run(self) -> None:
        while not self._stopping:
            with self._lock:
                has_work = self.engine.has_unfinished_requests()
            if not has_work:
                self._wake.wait(timeout=1.0)
                self._wake.clear()
                continue
            try:
                with self._lock:
                    outputs = self.engine.step()
                    deliveries = [(self._streams.get(o.request_id), o) for o in outputs]
                    for out in outputs:
                        if out.finished:
                            self._streams.pop(out.request_id, None)
            except Exception as exc:  # a bug in a step: fail the live requests, keep serving
                logger.exception("engine step failed")
                self._fail_all(exc)
                continue
            for stream, out in deliveries:
                if stream is not None:
                    stream.loop.call_soon_threadsafe(stream.queue.put_nowait, out)
        self._fail_all(EngineDeadError("the engine was shut down"))

    def _fail_all(self, exc: BaseException) -> None:
        with self._lock:
            streams = dict(self._streams)
            self._streams.clear()
            for request_id in streams:
                self.engine.abort_request(request_id)
        for stream in streams.values():
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, exc)
