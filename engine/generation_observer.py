"""What ``AsyncEngine`` tells an observer (e.g. the server's metrics) about each generation.

Every caller of ``AsyncEngine.generate`` / ``generate_n`` passes through one output path, so
an observer attached there sees every surface's traffic (HTTP, WebSocket, sessions) and no
surface can forget to report. The engine knows nothing of Prometheus: the server implements
``GenerationObserver``.

One *generation* is one ``generate`` call (one sequence) or one ``generate_n`` call (one
prompt and its ``n`` sequences). Callbacks run on the caller's event loop, in the task that
iterates the stream; they must be quick and must not raise.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import StrEnum

from engine.outputs import RequestOutput


class GenerationStatus(StrEnum):
    """How a generation ended, as an HTTP-style code (the ``status`` label of metrics)."""

    FINISHED = "200"  # every sequence finished (stop, length)
    REJECTED = "400"  # the engine refused the request (InvalidRequestError)
    ABORTED = "499"  # the caller stopped reading (disconnect, cancel) before the end
    FAILED = "500"  # a step failed (a bug), the sequences were failed
    ENGINE_DEAD = "503"  # the engine stopped (shutdown) under the request


@dataclass(slots=True)
class GenerationTrace:
    """What the caller of one generation saw, on the monotonic clock.

    ``last_outputs`` holds each sequence's latest output (request id -> output): its usage
    fields (prompt, cached, restored tokens) are those of the whole sequence so far.
    """

    num_sequences: int
    started_at: float = field(default_factory=time.monotonic)
    first_output_at: float | None = None
    last_output_at: dict[str, float] = field(default_factory=dict)
    last_outputs: dict[str, RequestOutput] = field(default_factory=dict)


class GenerationObserver:
    """No-op base: override what you need."""

    def on_output(self, trace: GenerationTrace, out: RequestOutput, now: float) -> None:
        """``out`` just reached the caller. ``trace`` is updated AFTER this call, so
        ``trace.first_output_at is None`` means ``out`` is the generation's first output and
        ``trace.last_output_at.get(out.request_id)`` is the time of its sequence's previous
        one."""

    def on_end(self, trace: GenerationTrace, status: GenerationStatus, now: float) -> None:
        """The generation ended (once per generation, whatever the outcome)."""
