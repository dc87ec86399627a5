"""Continuous batching under one token budget per step, with chunked prefill and preemption.

Pure bookkeeping: no torch. There are no prefill/decode phases: each step gives every running
request what it still needs (one token for a decode, a chunk of the prompt for a prefill) while
the token budget lasts, then admits waiting requests. When blocks run out, the most recently
admitted running request is preempted: its blocks are freed (its full blocks stay in the prefix
cache until evicted) and it goes back to the head of the waiting queue to be recomputed.

A waiting request whose prefix a lower tier holds may be parked in ``loading`` while that
prefix is read (asynchronously, see ``OffloadManager``); the batch keeps stepping, and once
the load finished (or failed) the request is admitted first, with its restored blocks as
prefix hits (or recomputing them).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Sequence
from enum import Enum
from typing import NamedTuple

from engine.block_pool import KVBlock
from engine.kv_cache_manager import KVCacheManager
from engine.request import Request, RequestStatus


class RestoreWait(Enum):
    """What ``restore`` returns when a lower tier holds the request's prefix but the pool has
    no room for it (and the request's first chunk) now."""

    NO_ROOM = "no_room"


RestoreResult = list[KVBlock] | RestoreWait | None


class ScheduledRequest(NamedTuple):
    request: Request
    num_new_tokens: int  # tokens computed for this request in this step


class SchedulerOutput(NamedTuple):
    scheduled: list[ScheduledRequest]  # batch order
    preempted: list[Request]

    @property
    def num_tokens(self) -> int:
        return sum(item.num_new_tokens for item in self.scheduled)


class Scheduler:
    """Decides which tokens of which requests run in the next model step.

    Contract: after ``schedule`` every scheduled request holds blocks for all its
    ``num_computed_tokens + num_new_tokens`` tokens. The caller runs the model, then calls
    ``update_after_step`` (which advances ``num_computed_tokens``) and ``finish`` for requests
    that stopped. A running request's draft tokens (``spec_token_ids``, speculative decoding)
    are scheduled after its own tokens while the budget and the pool allow; drafts that do not
    fit are dropped (never a reason to preempt), and ``num_new_tokens`` counts those kept.
    """

    def __init__(
        self,
        kv_manager: KVCacheManager,
        max_num_batched_tokens: int,
        max_num_seqs: int,
        reclaim: Callable[[int], bool] | None = None,
        on_preempt: Callable[[Request], None] | None = None,
        restore: Callable[[Request, int], RestoreResult] | None = None,
        poll_restores: Callable[[], list[Request]] | None = None,
        cancel_restore: Callable[[Request], None] | None = None,
    ) -> None:
        """``reclaim(num_blocks)`` is asked to free pinned blocks before any running request is
        preempted (returns True if it freed something); ``on_preempt(request)`` runs before a
        preempted request's blocks are freed (e.g. to swap them to host memory);
        ``restore(request, budget)`` runs right before a waiting request is admitted (with
        this step's remaining token budget), to bring blocks of its prefix back from a lower
        tier: it returns them cached and held (one reference each), and the scheduler releases
        them once admission took its own references; or None when it started a load: the
        request is parked in ``loading`` until ``poll_restores()`` (called at the start of
        every ``schedule``) returns it, then admitted before the waiting requests
        (``restore`` then hands over the loaded blocks, or [] after a failed load); or
        ``RestoreWait.NO_ROOM`` when the tier holds the prefix but the pool has no room for it
        now: while other requests run (and will free blocks) the request then waits at the
        head of the queue instead of recomputing what the tier holds; with nothing running it
        is admitted and recomputes.
        ``cancel_restore(request)`` runs for every finished request (it drops a load the
        request may still have)."""
        if max_num_batched_tokens <= 0 or max_num_seqs <= 0:
            raise ValueError("max_num_batched_tokens and max_num_seqs must be positive")
        self.kv_manager = kv_manager
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.reclaim = reclaim
        self.on_preempt = on_preempt
        self.restore = restore
        self.poll_restores = poll_restores
        self.cancel_restore = cancel_restore
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.loading: list[Request] = []  # parked for a prefix load, in order
        self._loads_done: set[str] = set()  # of which those whose load finished
        self.num_preemptions = 0

    def add_request(self, request: Request) -> None:
        request.status = RequestStatus.WAITING
        self.waiting.append(request)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running or self.loading)

    def schedule(self) -> SchedulerOutput:
        if self.loading and self.poll_restores is not None:
            self._loads_done.update(request.request_id for request in self.poll_restores())
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []
        preempted: list[Request] = []
        idx = 0
        while idx < len(self.running) and budget > 0:
            request = self.running[idx]
            num_left = request.num_tokens - request.num_computed_tokens
            num_new = min(num_left + len(request.spec_token_ids), budget)
            del request.spec_token_ids[max(0, num_new - num_left) :]  # drafts past the budget
            allocated = self._allocate_or_preempt(request, num_new, preempted)
            if allocated is None:
                break  # the request itself was preempted: nothing after it is running
            scheduled.append(ScheduledRequest(request, allocated))
            budget -= allocated
            idx += 1
        if not preempted:
            self._admit_waiting(budget, scheduled)
        return SchedulerOutput(scheduled, preempted)

    def _allocate_or_preempt(
        self, request: Request, num_new: int, preempted: list[Request]
    ) -> int | None:
        """Allocate for ``request``, dropping its draft tokens, then preempting from the back
        of ``running``, until it fits. Returns the tokens allocated (``num_new`` less any
        dropped drafts), or None when ``request`` itself had to be preempted.
        """
        while not self.kv_manager.allocate_slots(request, num_new):
            if request.spec_token_ids:  # drafts are a bet: never preempt anyone for them
                num_new -= len(request.spec_token_ids)
                request.spec_token_ids.clear()
                continue
            if self.reclaim is not None and self.reclaim(self._blocks_needed(request, num_new)):
                continue
            victim = self.running.pop()
            self._preempt(victim)
            preempted.append(victim)
            if victim is request:
                return None
        return num_new

    def _blocks_needed(self, request: Request, num_new: int) -> int:
        num_tokens = request.num_computed_tokens + num_new
        held = self.kv_manager.num_blocks_held(request.request_id)
        return self.kv_manager.num_blocks_for(num_tokens) - held

    def _admit_loaded(self, budget: int, scheduled: list[ScheduledRequest]) -> int:
        """Admit parked requests whose load finished, in the order they were parked, before
        any waiting request (their blocks, first chunk included, are already reserved);
        returns the budget left. One that cannot be admitted (its load failed and the pool
        has no room) goes back to the head of the waiting queue."""
        finished = [r for r in self.loading if r.request_id in self._loads_done]
        for request in finished:
            if budget <= 0:
                break
            self.loading.remove(request)
            self._loads_done.discard(request.request_id)
            num_new = self._admit(request, budget, scheduled)
            if num_new is None:
                request.status = RequestStatus.WAITING
                self.waiting.appendleft(request)
                continue
            budget -= num_new
        return budget

    def _admit_waiting(self, budget: int, scheduled: list[ScheduledRequest]) -> None:
        if self._loads_done:
            budget = self._admit_loaded(budget, scheduled)
        while (
            self.waiting
            and budget > 0
            and len(self.running) + len(self.loading) < self.max_num_seqs
        ):
            request = self.waiting[0]
            num_new = self._admit(request, budget, scheduled)
            if num_new is None:
                return
            self.waiting.popleft()
            if num_new:
                budget -= num_new
            else:  # its prefix is being loaded: it waits alone
                self.loading.append(request)

    def _admit(
        self, request: Request, budget: int, scheduled: list[ScheduledRequest]
    ) -> int | None:
        """Admit one request (the caller takes it out of its queue): the tokens scheduled
        for it now; 0 if it was parked for a prefix load instead, None if the pool has no
        room."""
        restored = self.restore(request, budget) if self.restore is not None else []
        if restored is None:
            return 0
        if restored is RestoreWait.NO_ROOM:
            if self.running or self.loading:
                return None  # they free blocks as they finish: restore then, not recompute
            restored = []
        admitted = self._try_allocate(request, budget)
        self.kv_manager.release(restored)  # admission holds its own references now
        if admitted is None:
            return None
        num_cached, num_new = admitted
        request.num_computed_tokens = num_cached
        if request.num_cached_tokens < 0:
            request.num_cached_tokens = num_cached
        request.status = RequestStatus.RUNNING
        self.running.append(request)
        scheduled.append(ScheduledRequest(request, num_new))
        return num_new

    def _try_allocate(self, request: Request, budget: int) -> tuple[int, int] | None:
        """Allocate a waiting request's blocks after its cached prefix; (cached tokens, new
        tokens this step), or None when the pool cannot make room."""
        computed_blocks, num_cached = self.kv_manager.get_computed_blocks(request)
        num_new = min(request.num_tokens - num_cached, budget)
        while not self.kv_manager.allocate_slots(request, num_new, computed_blocks):
            needed = self.kv_manager.num_blocks_for(num_cached + num_new)
            if self.reclaim is None or not self.reclaim(needed - len(computed_blocks)):
                return None
        return num_cached, num_new

    def _preempt(self, request: Request) -> None:
        if self.on_preempt is not None:
            self.on_preempt(request)
        self.kv_manager.free(request.request_id)
        request.num_computed_tokens = 0
        request.spec_token_ids.clear()
        request.num_preemptions += 1
        request.status = RequestStatus.PREEMPTED
        self.waiting.appendleft(request)
        self.num_preemptions += 1

    def update_after_step(self, output: SchedulerOutput) -> list[Request]:
        """Advance computed counts (draft tokens not included: the engine counts those it
        verified); return the requests whose next token must be sampled."""
        to_sample = []
        for request, num_new in output.scheduled:
            request.num_computed_tokens += num_new - len(request.spec_token_ids)
            self.kv_manager.cache_full_blocks(request)
            if request.num_computed_tokens == request.num_tokens:
                to_sample.append(request)
        return to_sample

    def finish(self, request: Request, status: RequestStatus) -> None:
        """Remove a request (running or waiting) and free its blocks."""
        assert status.is_finished
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        elif request in self.loading:
            self.loading.remove(request)
            self._loads_done.discard(request.request_id)
        if self.cancel_restore is not None:
            self.cancel_restore(request)
        request.status = status
        self.kv_manager.free(request.request_id)

    def check_integrity(self, held: Iterable[Sequence[KVBlock]] = ()) -> None:
        """Block-manager invariants (``held``: block lists referenced outside the tables, as
        in ``KVCacheManager.check_integrity``) plus: running requests own enough blocks for
        their computed tokens, waiting ones own none."""
        self.kv_manager.check_integrity(held)
        assert len(self.running) <= self.max_num_seqs, "too many running requests"
        for request in self.running:
            assert request.status is RequestStatus.RUNNING, f"{request.request_id} not RUNNING"
            num_blocks = self.kv_manager.num_blocks_held(request.request_id)
            needed = self.kv_manager.num_blocks_for(request.num_computed_tokens)
            assert num_blocks >= needed, f"{request.request_id} holds too few blocks"
        for request in (*self.waiting, *self.loading):
            assert self.kv_manager.num_blocks_held(request.request_id) == 0, (
                f"waiting request {request.request_id} still holds blocks"
            )
