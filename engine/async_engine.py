"""Runs ``LLMEngine`` steps in a background thread and streams outputs to asyncio callers.

The engine thread is the only thread that touches the ``LLMEngine``. Callers never take a
lock and never wait for a step: every command (add a request, abort one, run a bookkeeping
function such as a session pin) is put on a thread-safe queue, and the step loop drains that
queue between steps. Each request's outputs are delivered into its own ``asyncio.Queue`` on
the caller's event loop, one ``call_soon_threadsafe`` per loop and step.

    event loop                       engine thread
    ----------                       -------------
    generate() --add------+
    abort()    --abort----+--> queue --> drain commands --> step() --> outputs
    submit(fn) --fn-------+                                              |
    stream.queue <------------------ call_soon_threadsafe ---------------+
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from engine.errors import InvalidRequestError
from engine.generation_observer import GenerationObserver, GenerationStatus, GenerationTrace
from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[RequestOutput | BaseException]


@dataclass
class _Command:
    """``fn(*args)`` to run on the engine thread; its result or exception goes to ``future``."""

    fn: Callable[..., Any]
    args: tuple[Any, ...]
    future: concurrent.futures.Future[Any]


@dataclass(frozen=True, slots=True)
class EngineStats:
    """A snapshot the engine thread publishes after every step (read from any thread)."""

    num_running: int = 0
    num_waiting: int = 0
    kv_pool_usage: float = 0.0
    num_steps: int = 0  # steps run since start (constant while nothing is generating)
    num_draft_tokens: int = 0  # speculative drafts verified since start
    num_accepted_draft_tokens: int = 0  # of which the model agreed with


class EngineDeadError(RuntimeError):
    """The step loop stopped (shutdown or crash); no new requests are accepted."""


class AsyncEngine:
    """Asyncio front of an ``LLMEngine``. Use ``start()`` once, then ``generate``.

    Contract: ``generate`` raises ``InvalidRequestError`` before yielding anything if the
    request is invalid; it yields deltas until one has ``finished``; if the caller stops
    iterating early (or is cancelled) the request is aborted and its blocks freed before the
    next step. ``generate_n`` does the same for ``n`` sequences of one prompt. Both pass
    through one output path, which reports to ``observer`` (``engine.generation_observer``).
    No method blocks the event loop: ``generate``, ``abort``, ``submit`` and
    ``run_exclusive_async`` only enqueue. ``run_exclusive`` waits for the engine thread and
    is for other threads (workers, tests), never for an event loop.
    """

    def __init__(self, engine: LLMEngine, observer: GenerationObserver | None = None) -> None:
        self.engine = engine
        self.observer = observer  # sees every generation's deltas and end (e.g. metrics)
        self._commands: queue.SimpleQueue[_Command] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, _Stream] = {}  # engine thread only
        self._thread: threading.Thread | None = None
        self._stopping = False
        # Guards ``_closed`` against a command enqueued after the loop's final drain.
        self._close_lock = threading.Lock()
        self._closed = False
        self._ids = itertools.count()
        self.stats = EngineStats(kv_pool_usage=engine.kv_manager.usage())

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="tarry-engine", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        """Stop after the current step; fail the live requests with ``EngineDeadError``; end
        the engine's transfer thread (``LLMEngine.close``)."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        self.engine.close()

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    # -- the caller's side ----------------------------------------------------------------------

    async def generate(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        cache_salt: str = "",
    ) -> AsyncIterator[RequestOutput]:
        request_id = request_id or f"req-{next(self._ids)}"
        stream = self._generate_group(prompt, [params], [request_id], cache_salt)
        try:
            async for _, out in stream:
                yield out
        finally:
            await stream.aclose()

    async def generate_n(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        n: int,
        cache_salt: str = "",
        request_id: str | None = None,
    ) -> AsyncIterator[tuple[int, RequestOutput]]:
        """``n`` sequences from one prompt, as ``(sequence index, delta)`` in arrival order.

        Contract: the prompt is computed once. Sequence 0 is added first; the other ``n - 1``
        are added when its first delta arrives (its prompt is prefilled by then and every
        full block of it is in the prefix cache), so each of them recomputes only the
        prompt's last, partial block (the last prompt token is always recomputed). Sequence
        ``i`` samples with seed ``params.seed + i`` when a seed is given, else unseeded.
        Request ids are ``{request_id}-{i}``. ``params.logits_processors`` (stateful, one
        per sequence) are refused with ``n > 1``. Errors and cancellation behave as in
        ``generate``: an invalid request raises InvalidRequestError before anything is
        yielded; a caller that stops early aborts every unfinished sequence.
        """
        if n < 1:
            raise InvalidRequestError(f"n must be at least 1, got {n}")
        if n > 1 and params.logits_processors:
            raise InvalidRequestError("n > 1 cannot be combined with logits processors")
        base_id = request_id or f"req-{next(self._ids)}"
        children = [params, *(params.for_sequence(i) for i in range(1, n))]
        ids = [f"{base_id}-{i}" for i in range(n)]
        stream = self._generate_group(prompt, children, ids, cache_salt)
        try:
            async for item in stream:
                yield item
        finally:
            await stream.aclose()

    async def _generate_group(
        self,
        prompt: str | list[int],
        params: Sequence[SamplingParams | None],
        request_ids: list[str],
        cache_salt: str,
    ) -> AsyncGenerator[tuple[int, RequestOutput], None]:
        """The one output path of every generation: one shared stream for the group, the
        first request added at once and the others after its first delta; the observer
        sees every delta and the end."""
        if not self.is_running:
            raise EngineDeadError("the engine is not running")
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        index_of = {request_id: idx for idx, request_id in enumerate(request_ids)}
        trace = GenerationTrace(len(request_ids))
        # A rejected request puts its InvalidRequestError first in the stream (see _add).
        self.submit(self._add, request_ids[0], prompt, params[0], cache_salt, stream)
        unfinished = {request_ids[0]}
        pending = list(zip(request_ids[1:], params[1:], strict=True))
        status = GenerationStatus.ABORTED
        try:
            while unfinished:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    unfinished.clear()  # rejected, or the engine failed them all
                    status = _status_of(item)
                    raise item
                for request_id, child_params in pending:  # the prompt's blocks are cached
                    self.submit(self._add, request_id, prompt, child_params, cache_salt, stream)
                    unfinished.add(request_id)
                pending = []
                if item.finished:
                    unfinished.discard(item.request_id)
                self._observe(trace, item)
                yield index_of[item.request_id], item
            status = GenerationStatus.FINISHED
        finally:
            for request_id in unfinished:
                self.abort(request_id)
            if self.observer is not None:
                self.observer.on_end(trace, status, time.monotonic())

    def _observe(self, trace: GenerationTrace, out: RequestOutput) -> None:
        now = time.monotonic()
        if self.observer is not None:
            self.observer.on_output(trace, out, now)
        if trace.first_output_at is None:
            trace.first_output_at = now
        trace.last_output_at[out.request_id] = now
        trace.last_outputs[out.request_id] = out

    def abort(self, request_id: str) -> None:
        """Stop ``request_id`` before the next step and free its blocks (no-op if unknown)."""
        self.submit(self._abort, request_id)

    def submit(self, fn: Callable[..., T], *args: Any) -> concurrent.futures.Future[T]:
        """Queue ``fn(*args)`` to run on the engine thread between steps; never blocks.

        Commands run in submission order, so a caller that needs no result need not wait
        (a pin submitted before a ``generate`` is in place when that request is scheduled).
        After ``shutdown`` (or before ``start``) no step can run, and ``fn`` runs at once in
        the calling thread. An exception of ``fn`` is set on the returned future.
        """
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        command = _Command(fn, args, future)
        with self._close_lock:
            inline = self._closed or self._thread is None
            if not inline:
                self._commands.put(command)
        if inline:
            _execute(command)
        else:
            self._wake.set()
        return future

    async def run_exclusive_async(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the engine thread while no step runs; the loop keeps serving."""
        return await asyncio.wrap_future(self.submit(fn, *args))

    def run_exclusive(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the engine thread while no step runs, waiting for the result.

        Blocks the calling thread for up to one step: use it from worker threads and tests.
        On the engine thread itself ``fn`` runs directly. Raises RuntimeError on a thread
        that runs an event loop (use ``run_exclusive_async`` or ``submit`` there).
        """
        if threading.current_thread() is self._thread:
            return fn(*args)
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return self.submit(fn, *args).result()
        raise RuntimeError("run_exclusive would block the event loop; use run_exclusive_async")

    # -- the engine thread ----------------------------------------------------------------------

    def _add(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams | None,
        cache_salt: str,
        stream: _Stream,
    ) -> None:
        if self._closed:  # enqueued while the loop stopped: no step would ever run it
            _deliver(stream.loop, [(stream.queue, EngineDeadError("the engine was shut down"))])
            return
        try:
            self.engine.add_request(request_id, prompt, params, cache_salt)
        except Exception as exc:  # InvalidRequestError (or a bug): the caller raises it
            _deliver(stream.loop, [(stream.queue, exc)])
            return
        self._streams[request_id] = stream

    def _abort(self, request_id: str) -> None:
        self._streams.pop(request_id, None)
        self.engine.abort_request(request_id)

    def _drain_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            _execute(command)

    def _run(self) -> None:
        while not self._stopping:
            self._wake.clear()
            self._drain_commands()
            self._publish_stats()  # a request added (or aborted) shows before its step
            if not self.engine.has_unfinished_requests():
                self._wake.wait(timeout=1.0)
                continue
            try:
                outputs = self.engine.step()
            except Exception as exc:  # a bug in a step: fail the live requests, keep serving
                logger.exception("engine step failed")
                self._fail_all(exc)
                continue
            self._publish_stats()
            self._deliver_outputs(outputs)
        self._fail_all(EngineDeadError("the engine was shut down"))
        with self._close_lock:
            self._closed = True
        self._drain_commands()  # e.g. a session's unpin sent during shutdown

    def _deliver_outputs(self, outputs: list[RequestOutput]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[Any], Any]]] = {}
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if out.finished:
                self._streams.pop(out.request_id, None)
            if stream is not None:
                by_loop.setdefault(stream.loop, []).append((stream.queue, out))
        for loop, items in by_loop.items():
            _deliver(loop, items)

    def _publish_stats(self) -> None:
        scheduler = self.engine.scheduler
        self.stats = EngineStats(
            num_running=len(scheduler.running),
            num_waiting=len(scheduler.waiting) + len(scheduler.loading),
            kv_pool_usage=self.engine.kv_manager.usage(),
            num_steps=self.engine.num_steps,
            num_draft_tokens=self.engine.num_draft_tokens,
            num_accepted_draft_tokens=self.engine.num_accepted_draft_tokens,
        )

    def _fail_all(self, exc: BaseException) -> None:
        streams = dict(self._streams)
        self._streams.clear()
        for request_id in streams:
            self.engine.abort_request(request_id)
        self._publish_stats()
        for stream in streams.values():
            _deliver(stream.loop, [(stream.queue, exc)])


def _status_of(exc: BaseException) -> GenerationStatus:
    if isinstance(exc, InvalidRequestError):
        return GenerationStatus.REJECTED
    if isinstance(exc, EngineDeadError):
        return GenerationStatus.ENGINE_DEAD
    return GenerationStatus.FAILED


def _execute(command: _Command) -> None:
    if not command.future.set_running_or_notify_cancel():
        return
    try:
        command.future.set_result(command.fn(*command.args))
    except BaseException as exc:  # the waiter re-raises it; a fire-and-forget caller has the log
        logger.warning("engine command %s failed: %r", command.fn.__qualname__, exc)
        command.future.set_exception(exc)


def _deliver(loop: asyncio.AbstractEventLoop, items: list[tuple[asyncio.Queue[Any], Any]]) -> None:
    """Put ``items`` into their queues on ``loop`` (one wake-up); a closed loop is skipped."""

    def put_all() -> None:
        for stream_queue, item in items:
            stream_queue.put_nowait(item)

    with contextlib.suppress(RuntimeError):  # a closed loop: nobody is listening any more
        loop.call_soon_threadsafe(put_all)
