"""KV tiers below the device pool: host memory, Redis (a real redis-server) and the stack."""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from typing import Any

import msgpack
import pytest
import redis
import torch
from redis.crc import key_slot

from sessions.tiers import HostKVStore, RedisKVStore, TieredKVStore
from sessions.tiers.frame import FrameError, decode_frame, encode_frame
from tests.kv_tier_helpers import (
    BLOCK_BYTES_FP32,
    BLOCK_SIZE,
    HEAD_DIM,
    NUM_KV_HEADS,
    NUM_LAYERS,
    check_budget_lru_is_per_shard,
    exactly_equal,
    flip_body_byte,
    get_bytes,
    make_blocks,
    num_calls,
    timed,
)
from tests.redis_fixture import LatencyProxy, RedisServer  # fixtures come from conftest

LOGGER = "sessions.tiers"


@pytest.fixture
def namespace() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def raw(redis_server: str) -> redis.Redis:
    return redis.Redis.from_url(redis_server)


def redis_store(url: str, namespace: str, **kwargs: Any) -> RedisKVStore:
    return RedisKVStore(url, fingerprint="fp-test", namespace=namespace, **kwargs)


# -- host -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_host_round_trip_is_exact(dtype: torch.dtype) -> None:
    store, blocks = HostKVStore(1 << 20), make_blocks(5, dtype)
    store.save(blocks.hashes, blocks.token_ids, blocks.staged)
    assert store.lookup(blocks.hashes) == 5
    assert exactly_equal(store.load(blocks.hashes, blocks.token_ids), blocks.staged)
    middle = blocks.part(1, 4)
    assert exactly_equal(store.load(middle.hashes, middle.token_ids), middle.staged)
    stats = store.stats
    assert (stats.hits, stats.misses, stats.bytes_used) == (8, 0, 5 * blocks.staged[:, :, 0].nbytes)


def test_host_token_mismatch_discards(caplog: pytest.LogCaptureFixture) -> None:
    store, blocks = HostKVStore(1 << 20), make_blocks(2)
    store.save(blocks.hashes, blocks.token_ids, blocks.staged)
    wrong = [blocks.token_ids[0], [t + 1 for t in blocks.token_ids[1]]]
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert store.load(blocks.hashes, wrong) is None
    assert "stored tokens differ" in caplog.text
    assert store.contains(blocks.hashes) == [True, False]
    assert store.stats.invalid == 1


def test_host_evicts_least_recently_used_by_bytes() -> None:
    store = HostKVStore(3 * BLOCK_BYTES_FP32)
    a, b, c, d = (make_blocks(1, seed=s) for s in range(4))
    for blocks in (a, b, c):
        store.save(blocks.hashes, blocks.token_ids, blocks.staged)
    assert store.load(a.hashes, a.token_ids) is not None  # a is now the most recent
    store.save(d.hashes, d.token_ids, d.staged)
    assert [store.lookup(x.hashes) for x in (a, b, c, d)] == [1, 0, 1, 1]
    assert (store.stats.evictions, store.stats.bytes_used) == (1, 3 * BLOCK_BYTES_FP32)


def test_host_keeps_the_prefix_when_one_save_overflows() -> None:
    store, blocks = HostKVStore(3 * BLOCK_BYTES_FP32), make_blocks(5)
    store.save(blocks.hashes, blocks.token_ids, blocks.staged)
    assert store.contains(blocks.hashes) == [True, True, True, False, False]
    assert HostKVStore(BLOCK_BYTES_FP32 - 1).lookup(blocks.hashes) == 0  # too big: dropped


def test_host_turnover_reuses_one_slab_and_stays_exact() -> None:
    """Many more blocks than slots pass through: every slot is reused in place (no allocation
    per block, so the process does not grow past the capacity), and what is held reads back
    exactly."""
    store = HostKVStore(4 * BLOCK_BYTES_FP32)
    rounds = [make_blocks(3, seed=seed) for seed in range(20)]
    for blocks in rounds:
        store.save(blocks.hashes, blocks.token_ids, blocks.staged)
    slab = store._slab
    assert slab is not None and slab.kv.shape[2] == 4 and not slab.free_slots
    last = rounds[-1]
    assert exactly_equal(store.load(last.hashes, last.token_ids), last.staged)
    assert store.lookup(rounds[-3].hashes) == 0
    assert store.stats.bytes_used == 4 * BLOCK_BYTES_FP32
    assert store.stats.evictions == 20 * 3 - 4
    assert store._slab is slab  # the same tensor all along


def test_host_layout_change_drops_what_is_held(caplog: pytest.LogCaptureFixture) -> None:
    store = HostKVStore(1 << 20)
    fp32, bf16 = make_blocks(2), make_blocks(2, torch.bfloat16, seed=1)
    store.save(fp32.hashes, fp32.token_ids, fp32.staged)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        store.save(bf16.hashes, bf16.token_ids, bf16.staged)
    assert "replace 2 held blocks" in caplog.text
    assert store.lookup(fp32.hashes) == 0
    assert exactly_equal(store.load(bf16.hashes, bf16.token_ids), bf16.staged)
    assert store.stats.bytes_used == 2 * bf16.staged[:, :, 0].nbytes


# -- Redis: values ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_redis_round_trip_is_exact(
    redis_server: str,
    namespace: str,
    dtype: torch.dtype,
) -> None:
    store, blocks = redis_store(redis_server, namespace), make_blocks(6, dtype)
    assert store.lookup(blocks.hashes) == 0
    assert store.load(blocks.hashes, blocks.token_ids) is None
    store.save(blocks.hashes, blocks.token_ids, blocks.staged)
    assert store.lookup(blocks.hashes) == 6
    assert exactly_equal(store.load(blocks.hashes, blocks.token_ids), blocks.staged)
    tail = blocks.part(2, 6)
    assert exactly_equal(store.load(tail.hashes, tail.token_ids), tail.staged)
    assert store.healthy and store.last_error is None
    assert (store.stats.hits, store.stats.misses) == (10, 6)


def test_redis_value_is_a_self_describing_frame(
    redis_server: str,
    raw: redis.Redis,
    namespace: str,
) -> None:
    store, blocks = redis_store(redis_server, namespace), make_blocks(1, torch.bfloat16)
    store.save(blocks.hashes, blocks.token_ids, blocks.staged)
    header, body = msgpack.unpackb(raw.get(store.block_key(blocks.hashes[0])))
    assert header["fingerprint"] == "fp-test" and header["layout"] == "LKBTHD"
    assert header["dtype"] == "bfloat16" and header["tokens"] == blocks.token_ids[0]
    assert header["shape"] == [NUM_LAYERS, 2, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM]
    assert body == blocks.staged[:, :, 0].contiguous().view(torch.uint8).numpy().tobytes()


def test_redis_other_fingerprint_never_looks(
    redis_server: str,
    namespace: str,
) -> None:
    blocks = make_blocks(2)
    redis_store(redis_server, namespace).save(blocks.hashes, blocks.token_ids, blocks.staged)
    other = RedisKVStore(redis_server, fingerprint="fp-other", namespace=namespace)
    assert other.lookup(blocks.hashes) == 0


def _corrupt_fingerprint(value: bytes) -> bytes:
    header, body = decode_frame(value)
    block = torch.frombuffer(bytearray(body), dtype=header.dtype).view(header.block_shape)
    return bytes(encode_frame(block, header.token_ids, "fp-imposter", header.layout))


def _corrupt_layout(value: bytes) -> bytes:
    header, body = decode_frame(value)
    block = torch.frombuffer(bytearray(body), dtype=header.dtype).view(header.block_shape)
    return bytes(encode_frame(block, header.token_ids, header.fingerprint, "LKTBHD"))


def _corrupt_dtype(value: bytes) -> bytes:
    # Same bytes reinterpreted: the length still fits, so only the dtype check can catch it.
    frame = msgpack.unpackb(value)
    frame[0]["dtype"] = "float16"
    frame[0]["shape"][-1] *= 2
    return msgpack.packb(frame)


CORRUPTIONS = {
    "flipped body byte": flip_body_byte,
    "foreign fingerprint": _corrupt_fingerprint,
    "foreign layout": _corrupt_layout,
    "foreign dtype": _corrupt_dtype,
    "truncated": lambda value: value[:-100],
    "trailing bytes": lambda value: value + b"\x00",
    "garbage": lambda value: b"\x93\xa3not a frame at all" + bytes(range(256)),
    "empty": lambda value: b"",
    "msgpack but not a frame": lambda value: msgpack.packb({"hello": "world"}),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_redis_invalid_value_is_deleted_and_logged(
    redis_server: str,
    raw: redis.Redis,
    namespace: str,
    corruption: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    store, blocks = redis_store(redis_server, namespace, budget_bytes=1 << 30), make_blocks(3)
    store.save(blocks.hashes, blocks.token_ids, blocks.staged)
    bad_key = store.block_key(blocks.hashes[1])
    raw.set(bad_key, CORRUPTIONS[corruption](get_bytes(raw, bad_key)), keepttl=True)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert store.load(blocks.hashes, blocks.token_ids) is None
    assert bad_key in caplog.text
    assert raw.exists(bad_key) == 0
    assert store.contains(blocks.hashes) == [True, False, True]
    assert store.stats.invalid == 1 and store.healthy
    lru_key, sizes_key, bytes_key = store.index_keys(store.shard_of(blocks.hashes[1]))
    assert raw.zscore(lru_key, blocks.hashes[1].hex()) is None
    assert int(get_bytes(raw, bytes_key)) == sum(int(v) for v in raw.hvals(sizes_key))


def test_redis_expected_dtype_and_shape_are_enforced(
    redis_server: str,
    raw: redis.Redis,
    namespace: str,
) -> None:
    blocks = make_blocks(1)
    block_shape = (NUM_LAYERS, 2, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    store = redis_store(redis_server, namespace, dtype=torch.float32, block_shape=block_shape)
    store.save(blocks.hashes, blocks.token_ids, blocks.staged)
    key = store.block_key(blocks.hashes[0])
    raw.set(
        key, _corrupt_dtype(get_bytes(raw, key))
    )  # a lone block: no other block to disagree with
    assert store.load(blocks.hashes, blocks.token_ids) is None
    assert raw.exists(key) == 0
    with pytest.raises(ValueError, match="bfloat16"):
        store.save(blocks.hashes, blocks.token_ids, blocks.staged.to(torch.bfloat16))


def test_frame_decoding_only_ever_raises_frame_error() -> None:
    """Damaged values must surface as FrameError (a miss), never as another exception."""
    blocks = make_blocks(1, torch.bfloat16)
    frame = bytes(encode_frame(blocks.staged[:, :, 0], blocks.token_ids[0], "fp", "LKBTHD"))
    generator = torch.Generator().manual_seed(0)
    header_bytes = len(frame) - blocks.staged[:, :, 0].nbytes
    for trial in range(400):
        damaged = bytearray(frame[: int(torch.randint(1, len(frame), (1,), generator=generator))])
        if trial % 2:  # flip bytes in the header instead of truncating
            damaged = bytearray(frame)
            for pos in torch.randint(0, header_bytes, (3,), generator=generator).tolist():
                damaged[pos] ^= int(torch.randint(1, 256, (1,), generator=generator))
        with contextlib.suppress(FrameError):
            decode_frame(bytes(damaged))


def test_redis_token_mismatch_is_a_miss(
    redis_server: str,
    raw: redis.Redis,
    namespace: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    store, blocks = redis_store(redis_server, namespace), make_blocks(2)
    store.save(blocks.hashes, blocks.token_ids, blocks.staged)
    wrong = [[t + 1 for t in blocks.token_ids[0]], blocks.token_ids[1]]
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert store.load(blocks.hashes, wrong) is None
    assert "tokens differ" in caplog.text
    assert raw.exists(store.block_key(blocks.hashes[0])) == 0


# -- Redis: TTL, budget, round trips -----------------------------------------------------------


def test_redis_ttl_is_set_and_refreshed_on_load(
    redis_server: str,
    raw: redis.Redis,
    namespace: str,
) -> None:
    store, blocks = redis_store(redis_server, namespace, ttl_s=100), make_blocks(2)
    store.save(blocks.hashes, blocks.token_ids, blocks.staged)
    keys = [store.block_key(h) for h in blocks.hashes]
    assert all(90 < raw.ttl(key) <= 100 for key in keys)
    raw.expire(keys[0], 5)
    assert store.load(blocks.hashes, blocks.token_ids) is not None
    assert raw.ttl(keys[0]) > 90
    forever = redis_store(redis_server, namespace + "-forever", ttl_s=None)
    forever.save(blocks.hashes, blocks.token_ids, blocks.staged)
    assert raw.ttl(forever.block_key(blocks.hashes[0])) == -1


def test_redis_budget_evicts_least_recently_used(
    redis_server: str,
    raw: redis.Redis,
    namespace: str,
) -> None:
    a, b, c, d = (make_blocks(1, seed=s) for s in range(4))
    probe = redis_store(redis_server, namespace + "-probe")
    probe.save(a.hashes, a.token_ids, a.staged)
    frame_bytes = raw.strlen(probe.block_key(a.hashes[0]))
    store = redis_store(redis_server, namespace, budget_bytes=3 * frame_bytes)
    for blocks in (a, b, c):
        store.save(blocks.hashes, blocks.token_ids, blocks.staged)
    assert store.load(a.hashes, a.token_ids) is not None  # a becomes the most recent
    store.save(d.hashes, d.token_ids, d.staged)
    assert [store.lookup(x.hashes) for x in (a, b, c, d)] == [1, 0, 1, 1]
    assert (store.stats.evictions, store.stats.bytes_used) == (1, 3 * frame_bytes)
    assert raw.zcard(store.index_keys(0)[0]) == 3


def test_redis_budget_evicts_tails_before_prefixes(
    redis_server: str,
    raw: redis.Redis,
    namespace: str,
) -> None:
    blocks = make_blocks(5)
    probe = redis_store(redis_server, namespace + "-probe")
    probe.save(blocks.hashes[:1], blocks.token_ids[:1], blocks.staged[:, :, :1])
    frame_bytes = raw.strlen(probe.block_key(blocks.hashes[0]))
    store = redis_store(redis_server, namespace, budget_bytes=3 * frame_bytes)
    store.save(blocks.hashes, blocks.token_ids, blocks.staged)
    assert store.contains(blocks.hashes) == [True, True, True, False, False]
    assert store.stats.evictions == 2


def test_redis_budget_index_forgets_expired_blocks(
    redis_server: str,
    raw: redis.Redis,
    namespace: str,
) -> None:
    store = redis_store(redis_server, namespace, ttl_s=60, budget_bytes=1 << 30)
    a, b = make_blocks(1, seed=0), make_blocks(1, seed=1)
    store.save(a.hashes, a.token_ids, a.staged)
    lru_key, sizes_key, bytes_key = store.index_keys(store.shard_of(a.hashes[0]))
    raw.delete(store.block_key(a.hashes[0]))  # as if it expired a minute ago:
    raw.zadd(lru_key, {a.hashes[0].hex(): 0})
    store.save(b.hashes, b.token_ids, b.staged)
    assert raw.zrange(lru_key, 0, -1) == [b.hashes[0].hex().encode()]
    assert int(get_bytes(raw, bytes_key)) == raw.strlen(store.block_key(b.hashes[0]))
    assert raw.hkeys(sizes_key) == [b.hashes[0].hex().encode()]
    assert all(50 < raw.ttl(key) <= 60 for key in (lru_key, sizes_key, bytes_key))


def test_redis_budget_lru_is_per_shard(redis_server: str, raw: redis.Redis, namespace: str) -> None:
    check_budget_lru_is_per_shard(
        lambda budget: redis_store(redis_server, namespace, budget_bytes=budget, index_shards=2),
        raw,
    )


@pytest.mark.parametrize("budget_bytes", [None, 1 << 30])
def test_redis_held_blocks_are_refreshed_not_resent(
    redis_server: str,
    raw: redis.Redis,
    namespace: str,
    budget_bytes: int | None,
) -> None:
    store = redis_store(redis_server, namespace, ttl_s=100, budget_bytes=budget_bytes)
    blocks = make_blocks(4)
    head = blocks.part(0, 2)
    store.save(head.hashes, head.token_ids, head.staged)
    raw.expire(store.block_key(blocks.hashes[0]), 5)
    num_sets = num_calls([raw], "set")
    store.save(blocks.hashes, blocks.token_ids, blocks.staged)
    assert num_calls([raw], "set") - num_sets == 2  # only the two new blocks
    assert raw.ttl(store.block_key(blocks.hashes[0])) > 90
    assert exactly_equal(store.load(blocks.hashes, blocks.token_ids), blocks.staged)


def test_a_shard_keeps_its_blocks_and_index_in_one_slot() -> None:
    store = RedisKVStore("redis://127.0.0.1:1", "fp-test", namespace="ns", index_shards=4)
    blocks = make_blocks(32)
    assert {store.shard_of(h) for h in blocks.hashes} == {0, 1, 2, 3}
    for block_hash in blocks.hashes:
        shard = store.shard_of(block_hash)
        assert store.block_key(block_hash) == f"ns:kv:{{fp-test.{shard}}}:{block_hash.hex()}"
        keys = (store.block_key(block_hash), *store.index_keys(shard))
        assert len({key_slot(key.encode()) for key in keys}) == 1
    assert store.index_keys(1) == tuple(
        f"ns:kvindex:{{fp-test.1}}:{n}" for n in ("lru", "sizes", "bytes")
    )
    assert RedisKVStore("redis://127.0.0.1:1", "fp").keys.num_shards == 1


def test_bad_store_arguments_raise() -> None:
    url = "redis://127.0.0.1:1"
    for namespace, fingerprint in (("ns{", "fp"), ("ns", "fp}"), ("n{s}", "fp")):
        with pytest.raises(ValueError, match="must not contain"):
            RedisKVStore(url, fingerprint, namespace=namespace)
    with pytest.raises(ValueError, match="index_shards"):
        RedisKVStore(url, "fp", index_shards=0)
    with pytest.raises(ValueError, match="cluster=True"):
        RedisKVStore(redis.Redis.from_url(url), "fp", cluster=True)


def test_redis_calls_are_pipelined(redis_server: str, namespace: str) -> None:
    """Behind 25 ms of latency each way, block-by-block round trips would take 64 * 50 ms
    per call; pipelined, lookup takes one round trip, save two (EXISTS, then the writes) and
    load one or two (the first window is small until the block size is known)."""
    port = int(redis_server.rsplit(":", 1)[1].split("/")[0])
    proxy = LatencyProxy(port, delay_s=0.025)
    try:
        store = redis_store(proxy.url, namespace)
        assert store.ping()  # connect outside the timed calls
        blocks = make_blocks(64)
        save_s, _ = timed(lambda: store.save(blocks.hashes, blocks.token_ids, blocks.staged))
        lookup_s, num_held = timed(lambda: store.lookup(blocks.hashes))
        load_s, loaded = timed(lambda: store.load(blocks.hashes, blocks.token_ids))
        assert num_held == 64 and exactly_equal(loaded, blocks.staged)
        assert save_s < 0.3 and lookup_s < 0.2 and load_s < 0.3, (save_s, lookup_s, load_s)
    finally:
        proxy.close()


# -- Redis: outages ---------------------------------------------------------------------------


def test_redis_outage_degrades_and_recovers(redis_process: RedisServer, namespace: str) -> None:
    store, blocks = redis_store(redis_process.url, namespace, budget_bytes=1 << 20), make_blocks(3)
    store.save(blocks.hashes, blocks.token_ids, blocks.staged)
    redis_process.stop()
    assert store.lookup(blocks.hashes) == 0
    assert store.load(blocks.hashes, blocks.token_ids) is None
    store.save(blocks.hashes, blocks.token_ids, blocks.staged)
    assert not store.healthy and store.last_error is not None
    assert not store.ping()
    redis_process.start()  # same port, empty: the blocks are gone
    assert store.lookup(blocks.hashes) == 0 and store.healthy
    store.save(blocks.hashes, blocks.token_ids, blocks.staged)
    assert exactly_equal(store.load(blocks.hashes, blocks.token_ids), blocks.staged)
    assert store.stats.errors >= 3


def test_redis_hung_server_times_out(redis_process: RedisServer, namespace: str) -> None:
    store = redis_store(redis_process.url, namespace, socket_timeout_s=0.2)
    blocks = make_blocks(2)
    store.save(blocks.hashes, blocks.token_ids, blocks.staged)
    redis_process.pause()
    try:
        start = time.perf_counter()
        assert store.load(blocks.hashes, blocks.token_ids) is None
        assert time.perf_counter() - start < 2.0
        assert not store.healthy and "Timeout" in (store.last_error or "")
    finally:
        redis_process.resume()
    assert exactly_equal(store.load(blocks.hashes, blocks.token_ids), blocks.staged)
    assert store.healthy


def test_redis_client_must_not_decode(redis_server: str) -> None:
    with pytest.raises(ValueError, match="decode_responses"):
        RedisKVStore(redis.Redis.from_url(redis_server, decode_responses=True), "fp")


def test_a_given_client_gets_short_timeouts(redis_process: RedisServer, namespace: str) -> None:
    """A default client would block forever on a hung Redis; the store's copy times out."""
    store = RedisKVStore(redis.Redis.from_url(redis_process.url), "fp-test", namespace=namespace)
    blocks = make_blocks(1)
    store.save(blocks.hashes, blocks.token_ids, blocks.staged)
    redis_process.pause()
    try:
        start = time.perf_counter()
        assert store.load(blocks.hashes, blocks.token_ids) is None
        assert time.perf_counter() - start < 3.0 and not store.healthy
    finally:
        redis_process.resume()
    assert exactly_equal(store.load(blocks.hashes, blocks.token_ids), blocks.staged)


# -- the stack --------------------------------------------------------------------------------


def test_tiered_promotes_blocks_from_redis_to_host(
    redis_server: str,
    namespace: str,
) -> None:
    host, remote = HostKVStore(1 << 20), redis_store(redis_server, namespace)
    tiered, blocks = TieredKVStore([host, remote]), make_blocks(4)
    remote.save(blocks.hashes, blocks.token_ids, blocks.staged)
    assert tiered.lookup(blocks.hashes) == 4 and host.lookup(blocks.hashes) == 0
    assert exactly_equal(tiered.load(blocks.hashes, blocks.token_ids), blocks.staged)
    assert host.lookup(blocks.hashes) == 4 and tiered.num_promoted_blocks == 4
    assert exactly_equal(host.load(blocks.hashes, blocks.token_ids), blocks.staged)


def test_tiered_loads_a_mix_of_tiers(redis_server: str, namespace: str) -> None:
    host, remote = HostKVStore(1 << 20), redis_store(redis_server, namespace)
    tiered, blocks = TieredKVStore([host, remote]), make_blocks(6)
    for tier, (start, end) in ((host, (0, 2)), (remote, (2, 4)), (host, (4, 5)), (remote, (4, 5))):
        part = blocks.part(start, end)
        tier.save(part.hashes, part.token_ids, part.staged)
    assert tiered.contains(blocks.hashes) == [True] * 5 + [False]
    assert tiered.lookup(blocks.hashes) == 5
    assert tiered.load(blocks.hashes, blocks.token_ids) is None  # block 5 is nowhere
    head = blocks.part(0, 5)
    assert exactly_equal(tiered.load(head.hashes, head.token_ids), head.staged)
    assert tiered.num_promoted_blocks == 2  # blocks 2 and 3 came from Redis
    assert host.contains(blocks.hashes) == [True] * 5 + [False]


def test_tiered_falls_back_when_an_upper_tier_loses_a_block(
    redis_server: str,
    namespace: str,
) -> None:
    host, remote = HostKVStore(1 << 20), redis_store(redis_server, namespace)
    tiered, blocks = TieredKVStore([host, remote]), make_blocks(3)
    wrong = blocks.part(0, 1)  # the host holds block 1's hash with block 0's tokens and KV
    host.save(blocks.hashes[1:2], wrong.token_ids, wrong.staged)
    tiered.save(blocks.hashes, blocks.token_ids, blocks.staged)  # write-through
    assert host.lookup(blocks.hashes) == 3 and remote.lookup(blocks.hashes) == 3
    assert exactly_equal(tiered.load(blocks.hashes, blocks.token_ids), blocks.staged)
    assert host.stats.invalid == 1 and tiered.num_promoted_blocks == 3


def test_tiered_with_redis_down_serves_the_host(redis_process: RedisServer, namespace: str) -> None:
    host, remote = HostKVStore(1 << 20), redis_store(redis_process.url, namespace)
    tiered, blocks = TieredKVStore([host, remote]), make_blocks(2)
    redis_process.stop()
    tiered.save(blocks.hashes, blocks.token_ids, blocks.staged)
    assert exactly_equal(tiered.load(blocks.hashes, blocks.token_ids), blocks.staged)
    assert not remote.healthy
