"""Scheduler bookkeeping with a fake model step (no torch): budgets, chunking, preemption."""

from __future__ import annotations

from engine.kv_cache_manager import KVCacheManager
from engine.request import Request, RequestStatus
from engine.sampling_params import SamplingParams
from engine.scheduler import RestoreWait, Scheduler


def make_scheduler(num_blocks=10, block_size=4, budget=8, max_seqs=4) -> Scheduler:
    return Scheduler(KVCacheManager(num_blocks, block_size), budget, max_seqs)


def fake_step(scheduler: Scheduler, next_token: int = 7) -> list[tuple[str, int]]:
    """Schedule, pretend the model ran, append one token to each request that sampled."""
    output = scheduler.schedule()
    plan = [(item.request.request_id, item.num_new_tokens) for item in output.scheduled]
    for request in scheduler.update_after_step(output):
        request.append_output_token(next_token)
    scheduler.check_integrity()
    return plan


def test_chunked_prefill_mixes_with_decodes_under_the_budget():
    scheduler = make_scheduler(budget=8)
    scheduler.add_request(Request("a", list(range(3)), SamplingParams()))
    assert fake_step(scheduler) == [("a", 3)]
    scheduler.add_request(Request("b", list(range(20)), SamplingParams()))
    # a decodes one token; b gets the rest of the budget as a prefill chunk.
    assert fake_step(scheduler) == [("a", 1), ("b", 7)]
    assert fake_step(scheduler) == [("a", 1), ("b", 7)]
    assert fake_step(scheduler) == [("a", 1), ("b", 6)]
    assert fake_step(scheduler) == [("a", 1), ("b", 1)]


def test_preemption_frees_the_newest_request_and_recomputes_it_later():
    scheduler = make_scheduler(num_blocks=4, block_size=4, budget=16)
    first = Request("a", list(range(7)), SamplingParams())
    second = Request("b", list(range(100, 107)), SamplingParams())
    scheduler.add_request(first)
    scheduler.add_request(second)
    assert fake_step(scheduler) == [("a", 7), ("b", 7)]  # 2 blocks each: pool full
    assert fake_step(scheduler) == [("a", 1), ("b", 1)]  # 8 tokens each, still 2 blocks
    # a needs a third block: b (admitted last) is preempted and goes back to the queue head.
    assert fake_step(scheduler) == [("a", 1)]
    assert second.status is RequestStatus.PREEMPTED and second.num_computed_tokens == 0
    assert list(scheduler.waiting) == [second]
    assert scheduler.num_preemptions == 1
    scheduler.finish(first, RequestStatus.FINISHED_STOPPED)
    # b is readmitted: its first full block is still cached, so only the rest is recomputed.
    assert fake_step(scheduler) == [("b", 5)]
    assert second.num_output_tokens == 3


def test_max_num_seqs_limits_admission():
    scheduler = make_scheduler(budget=64, max_seqs=2)
    for name in "abc":
        scheduler.add_request(Request(name, [1, 2], SamplingParams()))
    assert [rid for rid, _ in fake_step(scheduler)] == ["a", "b"]
    assert [r.request_id for r in scheduler.waiting] == ["c"]


def test_finish_waiting_request():
    scheduler = make_scheduler()
    request = Request("a", [1, 2, 3], SamplingParams())
    scheduler.add_request(request)
    assert list(scheduler.waiting) == [request]
    scheduler.finish(request, RequestStatus.FINISHED_ABORTED)
    assert not scheduler.waiting and not scheduler.has_unfinished_requests()
    assert request.status is RequestStatus.FINISHED_ABORTED
    scheduler.check_integrity()


class FakeLoader:
    """Stands in for ``OffloadManager``'s restore callbacks: every request with a name in
    ``slow`` is parked on its first admission; ``finish_load`` makes its load done."""

    def __init__(self, slow: set[str]) -> None:
        self.slow = slow
        self.started: list[str] = []
        self.done: list[Request] = []
        self.cancelled: list[str] = []

    def restore(self, request: Request, budget: int):
        if request.request_id in self.slow and request.request_id not in self.started:
            self.started.append(request.request_id)
            return None
        return []

    def poll(self) -> list[Request]:
        done, self.done = self.done, []
        return done

    def cancel(self, request: Request) -> None:
        self.cancelled.append(request.request_id)


def test_a_request_waiting_for_its_prefix_load_waits_alone():
    loader = FakeLoader(slow={"b"})
    scheduler = Scheduler(
        KVCacheManager(20, 4),
        16,
        3,
        restore=loader.restore,
        poll_restores=loader.poll,
        cancel_restore=loader.cancel,
    )
    for idx, name in enumerate("abc"):
        scheduler.add_request(Request(name, list(range(idx * 10, idx * 10 + 6)), SamplingParams()))
    # b is parked; a and c (behind it) run, and keep running while b's load is in flight
    assert fake_step(scheduler) == [("a", 6), ("c", 6)]
    assert [r.request_id for r in scheduler.loading] == ["b"] and not scheduler.waiting
    assert fake_step(scheduler) == [("a", 1), ("c", 1)]
    scheduler.add_request(Request("d", [1, 2], SamplingParams()))
    assert fake_step(scheduler) == [("a", 1), ("c", 1)]  # b still holds the third seat
    loader.done.append(scheduler.loading[0])
    # b's load finished: it is admitted before d, which waited less
    assert fake_step(scheduler) == [("a", 1), ("c", 1), ("b", 6)]
    assert not scheduler.loading and [r.request_id for r in scheduler.waiting] == ["d"]
    scheduler.finish(scheduler.running[0], RequestStatus.FINISHED_STOPPED)
    assert loader.cancelled == ["a"]
    assert fake_step(scheduler) == [("c", 1), ("b", 1), ("d", 2)]


def test_finishing_a_request_while_its_prefix_loads():
    loader = FakeLoader(slow={"a"})
    scheduler = Scheduler(
        KVCacheManager(10, 4), 16, 4, restore=loader.restore, cancel_restore=loader.cancel
    )
    request = Request("a", list(range(6)), SamplingParams())
    scheduler.add_request(request)
    assert fake_step(scheduler) == [] and scheduler.has_unfinished_requests()
    scheduler.finish(request, RequestStatus.FINISHED_ABORTED)
    assert loader.cancelled == ["a"] and not scheduler.has_unfinished_requests()
    scheduler.check_integrity()


def test_a_request_whose_stored_prefix_has_no_room_waits_while_others_run():
    """``RestoreWait.NO_ROOM``: the request waits at the head of the queue while running
    requests will free blocks, and is admitted (recomputing) when nothing else runs."""
    answers = {"b": [RestoreWait.NO_ROOM, RestoreWait.NO_ROOM]}

    def restore(request: Request, budget: int):
        return answers[request.request_id].pop(0) if answers.get(request.request_id) else []

    scheduler = Scheduler(KVCacheManager(20, 4), 16, 4, restore=restore)
    scheduler.add_request(Request("a", list(range(4)), SamplingParams(max_tokens=2)))
    assert fake_step(scheduler) == [("a", 4)]
    scheduler.add_request(Request("b", list(range(10, 16)), SamplingParams()))
    assert fake_step(scheduler) == [("a", 1)]  # b waits: a runs and will free its blocks
    assert [r.request_id for r in scheduler.waiting] == ["b"]
    scheduler.finish(scheduler.running[0], RequestStatus.FINISHED_LENGTH)
    # still no room for the stored prefix, but nothing runs to free blocks: b recomputes
    assert fake_step(scheduler) == [("b", 6)]
    assert not answers["b"] and not scheduler.waiting
