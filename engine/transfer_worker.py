"""A background thread for KV store transfers, so the step loop does not wait on them.

Saving a block to a lower tier is a host copy (host tier) or a network write (Redis) of a
tensor already staged on the CPU; reading a prefix back is the reverse. Both release the GIL,
so the forward pass runs while they go on. Jobs run in submission order, so a read sees every
write submitted before it (see ``engine.offload_manager``).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

import torch

logger = logging.getLogger(__name__)


class TransferWorker:
    """Runs submitted jobs one at a time, in submission order, on one daemon thread.

    Contract: a job that raises is logged and dropped (store writes are best effort); after
    ``wait_idle`` returns, every job submitted before the call has finished. ``close`` finishes
    the queued jobs and ends the thread; a job submitted after it runs on the caller's thread.
    """

    def __init__(self, name: str = "tarry-kv-transfer") -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...]] | None] = (
            queue.SimpleQueue()
        )
        self._closed = False
        self._idle = threading.Condition()
        self._num_pending = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        # Started by the first submit: an engine that never transfers keeps no thread.

    @property
    def num_pending(self) -> int:
        """Jobs submitted and not finished yet."""
        return self._num_pending

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        with self._idle:
            closed = self._closed
            if not closed:
                if not self._thread.is_alive():
                    self._thread.start()
                self._num_pending += 1
                self._jobs.put((fn, args))
        if closed:
            _run_job(fn, args)

    def close(self, timeout_s: float = 30.0) -> None:
        """Finish the queued jobs, then end the thread (waits up to ``timeout_s``). Idempotent."""
        with self._idle:
            if self._closed:
                return
            self._closed = True
            if not self._thread.is_alive():
                return  # never started
            self._jobs.put(None)
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            logger.warning("the KV transfer thread is still busy after %.0f s", timeout_s)

    def wait_idle(self) -> None:
        with self._idle:
            self._idle.wait_for(lambda: self._num_pending == 0)

    def _run(self) -> None:
        # One compute thread for this thread's copies. With torch's default (all cores), each
        # copy here starts an OpenMP team of its own whose threads spin beside the forward
        # pass's team: on 2 cores a background copy every 50 ms made a forward pass 42 %
        # slower; with one thread, not measurably (docs/BENCHMARKS.md, "transfer thread").
        torch.set_num_threads(1)
        while (job := self._jobs.get()) is not None:
            _run_job(*job)
            del job  # hold no finished job's arguments (staged tensors) while waiting
            with self._idle:
                self._num_pending -= 1
                if self._num_pending == 0:
                    self._idle.notify_all()


def _run_job(fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    try:
        fn(*args)
    except Exception:
        logger.exception("a KV store transfer failed; the blocks will be recomputed")
