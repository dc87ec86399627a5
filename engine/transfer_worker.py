"""A background thread for KV store writes, so the step loop does not wait on them.

Saving a block to a lower tier is a host copy (host tier) or a network write (Redis) of a
tensor already staged on the CPU; both release the GIL, so the next forward pass runs while
the write goes on. Reads stay on the caller's thread, after ``wait_idle``: a store is only
read once every write submitted before is in it, so no read misses a block because its write
was still queued (the token history stays the truth either way; this keeps hits exact).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)


class TransferWorker:
    """Runs submitted jobs one at a time, in submission order, on one daemon thread.

    Contract: a job that raises is logged and dropped (store writes are best effort); after
    ``wait_idle`` returns, every job submitted before the call has finished.
    """

    def __init__(self, name: str = "tarry-kv-transfer") -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...]]] = (
            queue.SimpleQueue()
        )
        self._idle = threading.Condition()
        self._num_pending = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def num_pending(self) -> int:
        """Jobs submitted and not finished yet."""
        return self._num_pending

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        with self._idle:
            self._num_pending += 1
        self._jobs.put((fn, args))

    def wait_idle(self) -> None:
        with self._idle:
            self._idle.wait_for(lambda: self._num_pending == 0)

    def _run(self) -> None:
        while True:
            fn, args = self._jobs.get()
            try:
                fn(*args)
            except Exception:
                logger.exception("a KV store write failed; the blocks will be recomputed")
            with self._idle:
                self._num_pending -= 1
                if self._num_pending == 0:
                    self._idle.notify_all()
