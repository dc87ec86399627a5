"""Tiers serve every request: a cached block the device pool evicts is written back to the KV
store, and a later plain request (no session) restores its prefix from there — in this engine
or in another instance sharing Redis — token-identical to a fresh recompute."""

from __future__ import annotations

import gc
import operator
import threading
import weakref

import pytest
import redis

from engine.llm_engine import LLMEngine
from engine.model_loader import load_model
from engine.transfer_worker import TransferWorker
from sessions.tiers import HostKVStore, RedisKVStore
from tests.helpers import greedy, hf_greedy, make_engine, mixed_prompts

BLOCK = 16
NUM_BLOCKS = 14  # room for one ~180-token request at a time: the next one evicts the last


@pytest.fixture(scope="module")
def model_dir(tiny_model_dirs):
    return tiny_model_dirs["llama"]


@pytest.fixture(scope="module")
def tiny(model_dir):
    return load_model(str(model_dir), dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def prompts():
    return mixed_prompts(21, 3, 170, 180)  # the first, and two that evict it


@pytest.fixture(scope="module")
def expected(model_dir, prompts):
    return hf_greedy(model_dir, [prompts[0]], 6)[0]


def run_one(engine: LLMEngine, prompt: list[int], request_id: str) -> tuple[list[int], int, int]:
    """(output tokens, cached prompt tokens, restored prompt tokens) of one plain request."""
    engine.add_request(request_id, prompt, greedy(6))
    tokens: list[int] = []
    cached = restored = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens += out.new_token_ids
            cached, restored = out.num_cached_tokens, out.num_restored_tokens
    return tokens, cached, restored


def test_evicted_blocks_come_back_from_the_host_tier(tiny, prompts, expected):
    first, evictor, _ = prompts
    engine = make_engine(tiny, num_kv_blocks=NUM_BLOCKS)
    engine.attach_kv_store(HostKVStore(capacity_bytes=64 << 20))
    assert run_one(engine, first, "a")[0] == expected
    assert engine.num_saved_tokens == 0  # nothing left the device yet
    run_one(engine, evictor, "b")  # needs the blocks `first` left cached: they are evicted
    assert engine.num_saved_tokens >= (len(first) // BLOCK - 2) * BLOCK
    tokens, cached, restored = run_one(engine, first, "a2")
    assert tokens == expected
    reusable = (len(first) - 1) // BLOCK * BLOCK
    assert restored > 0 and cached == reusable
    engine.check_integrity()


def test_write_back_happens_once_per_content_hash(tiny, prompts):
    first, evictor, _ = prompts
    engine = make_engine(tiny, num_kv_blocks=NUM_BLOCKS)
    engine.attach_kv_store(HostKVStore(capacity_bytes=64 << 20))
    for round_idx in range(2):  # each round evicts the other request's blocks
        run_one(engine, first, f"a{round_idx}")
        run_one(engine, evictor, f"b{round_idx}")
    # every full block of both (prompt + 6 output tokens) is now in the store, written once
    unique_tokens = sum((len(prompt) + 6) // BLOCK * BLOCK for prompt in (first, evictor))
    assert engine.num_saved_tokens <= unique_tokens
    saved = engine.num_saved_tokens
    run_one(engine, first, "a2")
    run_one(engine, evictor, "b2")
    assert engine.num_saved_tokens == saved  # evicted again, but the store already has them


def test_another_instance_restores_evicted_blocks_from_redis(tiny, prompts, expected, redis_server):
    first, evictor, second_evictor = prompts
    redis.Redis.from_url(redis_server).flushall()

    def instance() -> LLMEngine:
        engine = make_engine(tiny, num_kv_blocks=NUM_BLOCKS)
        store = RedisKVStore(
            redis.Redis.from_url(redis_server),
            engine.fingerprint,
            dtype=tiny.dtype,
            block_shape=engine.kv_block_shape,
        )
        engine.attach_kv_store(store)
        return engine

    first_instance = instance()
    run_one(first_instance, first, "a")
    run_one(first_instance, evictor, "b")
    run_one(first_instance, second_evictor, "c")  # now no block of `first` is on the device
    assert first_instance.num_saved_tokens >= (len(first) // BLOCK) * BLOCK
    second_instance = instance()
    tokens, cached, restored = run_one(second_instance, first, "a")
    assert tokens == expected
    assert restored == cached == (len(first) - 1) // BLOCK * BLOCK


class RecordingHostStore(HostKVStore):
    """A real host tier that records which thread each save ran on."""

    def __init__(self) -> None:
        super().__init__(capacity_bytes=64 << 20)
        self.save_threads: list[str] = []

    def save(self, block_hashes, token_ids, staged) -> None:
        self.save_threads.append(threading.current_thread().name)
        super().save(block_hashes, token_ids, staged)


def test_writes_run_on_the_transfer_worker_and_reads_see_them(tiny, prompts, expected):
    first, evictor, _ = prompts
    engine = make_engine(tiny, num_kv_blocks=NUM_BLOCKS)
    store = RecordingHostStore()
    engine.attach_kv_store(store)
    run_one(engine, first, "a")
    run_one(engine, evictor, "b")
    assert store.save_threads and set(store.save_threads) == {"tarry-kv-transfer"}
    tokens, _, restored = run_one(engine, first, "a2")  # its restore waits for the writes
    assert tokens == expected and restored > 0


def test_transfer_worker_order_errors_and_wait_idle():
    worker = TransferWorker(name="test-transfer")
    done: list[int] = []
    gate = threading.Event()
    worker.submit(gate.wait)
    worker.submit(done.append, 1)
    worker.submit(operator.truediv, 1, 0)  # raises: logged and dropped, the worker goes on
    worker.submit(done.append, 2)
    assert worker.num_pending == 4 and done == []
    gate.set()
    worker.wait_idle()
    assert done == [1, 2] and worker.num_pending == 0


def test_transfer_worker_close_finishes_jobs_and_ends_its_thread():
    worker = TransferWorker(name="test-close")
    assert not worker._thread.is_alive()  # no thread until there is work
    done: list[int] = []
    gate = threading.Event()
    worker.submit(gate.wait)
    worker.submit(done.append, 1)
    threading.Timer(0.05, gate.set).start()
    worker.close()
    assert done == [1] and not worker._thread.is_alive()
    worker.submit(done.append, 2)  # after close: runs at once, on this thread
    assert done == [1, 2]
    worker.close()  # idempotent


def test_engine_shutdown_ends_the_transfer_thread_and_frees_the_kv_cache(tiny, prompts):
    """A stopped engine leaves no thread holding its KV cache (each test server's cache was
    kept alive by its transfer thread, and the suite's process grew by a GiB a test)."""
    first, evictor, _ = prompts
    engine = make_engine(tiny, num_kv_blocks=NUM_BLOCKS)
    engine.attach_kv_store(HostKVStore(capacity_bytes=64 << 20))
    run_one(engine, first, "a")
    run_one(engine, evictor, "b")  # evicts: a save ran on the transfer thread
    thread = engine.offload.transfers._thread
    assert thread.is_alive()
    kv_cache = weakref.ref(engine.offload.kv_cache)
    engine.close()
    assert not thread.is_alive()
    del engine
    gc.collect()
    assert kv_cache() is None


def test_prefixes_are_restored_only_for_requests_being_admitted(tiny, prompts):
    """Waiting requests do not restore (and lose again) their prefixes every step: each
    request restores at most its own prompt, once, when the scheduler admits it."""
    first, evictor, second_evictor = prompts
    engine = make_engine(tiny, num_kv_blocks=NUM_BLOCKS, max_num_batched_tokens=32)
    engine.attach_kv_store(HostKVStore(capacity_bytes=64 << 20))
    for idx, prompt in enumerate((first, evictor, second_evictor)):
        run_one(engine, prompt, f"warm{idx}")  # every prompt's blocks are now in the store
    for idx, prompt in enumerate((first, evictor, second_evictor)):
        engine.add_request(f"again{idx}", prompt, greedy(2))
    restored: dict[str, int] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            restored[out.request_id] = out.num_restored_tokens
    # a preempted request is restored again when it is readmitted, and only then
    num_admissions = 1 + engine.scheduler.num_preemptions
    for idx, prompt in enumerate((first, evictor, second_evictor)):
        assert 0 < restored[f"again{idx}"] <= len(prompt) * num_admissions
    engine.check_integrity()


def run_to_completion(
    engine: LLMEngine, outputs: dict[str, list[int]], watched: str
) -> tuple[int, int]:
    """Step until every request finished, adding each one's tokens to ``outputs``; the
    (cached, restored) prompt tokens of request ``watched``."""
    cached = restored = -1
    while engine.has_unfinished_requests():
        for out in engine.step():
            outputs[out.request_id] += out.new_token_ids
            if out.request_id == watched:
                cached, restored = out.num_cached_tokens, out.num_restored_tokens
    return cached, restored


def test_a_request_waits_for_room_to_restore_rather_than_recompute(tiny, prompts, expected):
    """When the store holds a prefix but running requests hold the pool, the request waits
    for them to finish and then restores its prefix: no token the store held is recomputed
    (before, it was admitted at once whenever its next chunk fitted, and recomputed all)."""
    first, evictor, second_evictor = prompts
    store = HostKVStore(capacity_bytes=64 << 20)
    writer = make_engine(tiny, num_kv_blocks=NUM_BLOCKS)
    writer.attach_kv_store(store)
    for idx, prompt in enumerate(prompts):
        run_one(writer, prompt, f"warm{idx}")  # all of `first` is evicted to the store
    writer.offload.readable_store()
    writer.close()
    # An instance sharing the store, whose pool holds "busy" plus a 32-token chunk of "a"
    # while "busy" runs, but not "a"'s restored prefix with it.
    engine = make_engine(tiny, num_kv_blocks=NUM_BLOCKS + 2, max_num_batched_tokens=32)
    engine.attach_kv_store(store)
    engine.add_request("busy", evictor, greedy(8))
    outputs: dict[str, list[int]] = {"busy": [], "a": []}
    while not outputs["busy"]:  # its prefill is done
        for out in engine.step():
            outputs["busy"] += out.new_token_ids
    engine.add_request("a", first, greedy(6))
    cached, restored = run_to_completion(engine, outputs, "a")
    assert outputs["a"] == expected
    reusable = (len(first) - 1) // BLOCK * BLOCK
    assert restored == cached == reusable
    assert engine.scheduler.num_preemptions == 0
    engine.check_integrity()


def test_blocks_evicted_earlier_in_the_same_step_are_restored(tiny, prompts, expected):
    """One step admits two requests: the first's allocation evicts the tail of the second's
    cached prefix. Those blocks reach the store before the second's restore looks for them
    (they were lost before: looked up before being written, and recomputed)."""
    first, _, other = prompts
    evictor = mixed_prompts(22, 1, 275, 285)[0]  # 18 blocks: the 16 unused ones and 2 more
    engine = make_engine(tiny, num_kv_blocks=40)
    engine.attach_kv_store(HostKVStore(capacity_bytes=64 << 20))
    run_one(engine, first, "warm")  # free queue: 28 unused blocks, then `first`'s 12
    run_one(engine, other, "other")  # ... 16 unused, `first`'s 12 (tail first), `other`'s 12
    engine.add_request("evictor", evictor, greedy(2))
    engine.add_request("a", first, greedy(6))  # admitted in the same step, after "evictor"
    outputs: dict[str, list[int]] = {"evictor": [], "a": []}
    cached, restored = run_to_completion(engine, outputs, "a")
    assert outputs["a"] == expected
    assert cached == (len(first) - 1) // BLOCK * BLOCK and restored == BLOCK
    engine.check_integrity()


# -- asynchronous loads: the batch keeps stepping while a prefix is read ----------------------


class GatedRedisStore(RedisKVStore):
    """A real Redis tier whose loads wait for ``gate`` first (a slow network, held open by
    the test), recording the thread each load ran on; ``vanish`` flushes Redis right before
    a load (the blocks disappear between lookup and load)."""

    def __init__(self, url: str, *args, **kwargs) -> None:
        super().__init__(redis.Redis.from_url(url), *args, **kwargs)
        self.url = url
        self.gate = threading.Event()
        self.gate.set()
        self.vanish = False
        self.load_threads: list[str] = []

    def load(self, block_hashes, token_ids):
        self.load_threads.append(threading.current_thread().name)
        self.gate.wait(timeout=60)
        if self.vanish:
            redis.Redis.from_url(self.url).flushall()
        return super().load(block_hashes, token_ids)


def redis_instance(tiny, url: str, num_kv_blocks: int) -> tuple[LLMEngine, GatedRedisStore]:
    engine = make_engine(tiny, num_kv_blocks=num_kv_blocks)
    store = GatedRedisStore(
        url, engine.fingerprint, dtype=tiny.dtype, block_shape=engine.kv_block_shape
    )
    engine.attach_kv_store(store)
    return engine, store


def written_to_redis(tiny, url: str, prompts) -> None:
    """Run ``prompts[0]``, then two prompts that evict all of it to Redis."""
    redis.Redis.from_url(url).flushall()
    engine, _ = redis_instance(tiny, url, NUM_BLOCKS)
    for idx, prompt in enumerate(prompts):
        run_one(engine, prompt, f"w{idx}")
    engine.offload.readable_store()  # every write landed


def test_batch_keeps_stepping_while_a_redis_restore_is_in_flight(
    tiny, prompts, expected, redis_server
):
    first, evictor, _ = prompts
    written_to_redis(tiny, redis_server, prompts)
    engine, store = redis_instance(tiny, redis_server, 40)  # another instance, room for two
    engine.add_request("busy", evictor[:40], greedy(30))
    busy_tokens = 0
    for _ in range(3):  # prefill, then decoding
        busy_tokens += sum(len(out.new_token_ids) for out in engine.step())
    store.gate.clear()  # the Redis read of `first`'s prefix hangs until released
    engine.add_request("a", first, greedy(6))
    decoded_while_loading = 0
    for _ in range(5):
        outputs = engine.step()
        assert [out.request_id for out in outputs] == ["busy"]  # `a` waits alone
        decoded_while_loading += len(outputs[0].new_token_ids)
        assert [r.request_id for r in engine.scheduler.loading] == ["a"]
        assert engine.offload.num_loading == 1
    assert decoded_while_loading == 5
    store.gate.set()
    tokens: list[int] = []
    cached = restored = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id == "a":
                tokens += out.new_token_ids
                cached, restored = out.num_cached_tokens, out.num_restored_tokens
    assert tokens == expected  # token-identical to a recompute (HF greedy)
    assert restored == cached == (len(first) - 1) // BLOCK * BLOCK
    assert store.load_threads == ["tarry-kv-transfer"]
    engine.check_integrity()


def test_a_restore_that_fails_falls_back_to_recompute(tiny, prompts, expected, redis_server):
    first, _, _ = prompts
    written_to_redis(tiny, redis_server, prompts)
    engine, store = redis_instance(tiny, redis_server, 40)
    store.vanish = True  # the blocks are gone when the read runs
    tokens, cached, restored = run_one(engine, first, "a")
    assert tokens == expected
    assert restored == 0 and cached == 0
    assert engine.offload.num_failed_restores == 1 and store.load_threads
    engine.check_integrity()


def test_a_restore_that_times_out_falls_back_to_recompute(tiny, prompts, expected, redis_server):
    first, _, _ = prompts
    written_to_redis(tiny, redis_server, prompts)
    engine, store = redis_instance(tiny, redis_server, 40)
    engine.offload.restore_timeout_s = 0.3
    store.gate.clear()  # never answers in time
    try:
        tokens, cached, restored = run_one(engine, first, "a")
    finally:
        store.gate.set()
    assert tokens == expected
    assert restored == 0 and cached == 0 and engine.offload.num_failed_restores == 1
    engine.offload.readable_store()  # the late read finished; it changed nothing
    engine.check_integrity()
    assert engine.kv_manager.num_free_blocks == engine.num_kv_blocks


def test_aborting_a_request_while_its_prefix_loads_frees_its_blocks(tiny, prompts, redis_server):
    first, _, _ = prompts
    written_to_redis(tiny, redis_server, prompts)
    engine, store = redis_instance(tiny, redis_server, 40)
    store.gate.clear()
    engine.add_request("a", first, greedy(6))
    assert engine.step() == [] and engine.offload.num_loading == 1
    assert engine.kv_manager.num_free_blocks < engine.num_kv_blocks  # its blocks are taken
    assert engine.abort_request("a")
    store.gate.set()
    engine.offload.readable_store()
    assert not engine.has_unfinished_requests() and not engine.offload.loads
    assert engine.kv_manager.num_free_blocks == engine.num_kv_blocks
    engine.check_integrity()
