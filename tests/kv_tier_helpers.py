"""Helpers shared by the KV tier tests (single Redis and Redis Cluster): blocks of one
sequence, exact comparison, and checks of the Redis store's budget index."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import redis
import torch
from redis.cluster import RedisCluster

from engine.block_hash import hash_full_blocks
from engine.block_pool import BlockHash
from sessions.tiers import RedisKVStore
from sessions.tiers.frame import encode_frame

T = TypeVar("T")
AnyRedis = redis.Redis | RedisCluster  # a test's own client, for inspecting and tampering
NUM_LAYERS, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM = 2, 4, 2, 8
BLOCK_BYTES_FP32 = NUM_LAYERS * 2 * BLOCK_SIZE * NUM_KV_HEADS * HEAD_DIM * 4


@dataclass
class Blocks:
    """``n`` full blocks of one sequence: hashes, token ids and the staged KV."""

    hashes: list[BlockHash]
    token_ids: list[list[int]]
    staged: torch.Tensor  # [layers, 2, n, block_size, kv_heads, head_dim]

    def part(self, start: int, end: int) -> Blocks:
        return Blocks(
            self.hashes[start:end], self.token_ids[start:end], self.staged[:, :, start:end]
        )


def make_blocks(num_blocks: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> Blocks:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 50000, (num_blocks * BLOCK_SIZE,), generator=generator).tolist()
    hashes = hash_full_blocks(tokens, BLOCK_SIZE, extra=f"test-{seed}".encode())
    shape = (NUM_LAYERS, 2, num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    staged = torch.randn(shape, generator=generator).to(dtype)
    token_ids = [tokens[i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE] for i in range(num_blocks)]
    return Blocks(hashes, token_ids, staged)


def exactly_equal(a: torch.Tensor | None, b: torch.Tensor) -> bool:
    return a is not None and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def get_bytes(raw: AnyRedis, key: str) -> bytes:
    value = raw.get(key)
    assert isinstance(value, bytes), f"{key} holds no value"
    return value


def flip_body_byte(value: bytes) -> bytes:
    flipped = bytearray(value)
    flipped[-7] ^= 0x40
    return bytes(flipped)


def timed(call: Callable[[], T]) -> tuple[float, T]:
    start = time.perf_counter()
    result = call()
    return time.perf_counter() - start, result


def num_calls(servers: Sequence[redis.Redis], command: str) -> int:
    """How many times ``command`` ran so far, summed over ``servers`` (INFO commandstats)."""
    total = 0
    for server in servers:
        stats = server.info("commandstats").get(f"cmdstat_{command.lower()}")
        total += int(stats["calls"]) if stats else 0
    return total


def single_blocks_in_shards(store: RedisKVStore, shards: Sequence[int]) -> list[Blocks]:
    """One single-block sequence per entry of ``shards``, in that shard of ``store``; all
    different."""
    found: list[Blocks] = []
    seed = 1000
    for shard in shards:
        while store.shard_of((blocks := make_blocks(1, seed=seed)).hashes[0]) != shard:
            seed += 1
        found.append(blocks)
        seed += 1
    return found


def check_budget_index(store: RedisKVStore, raw: AnyRedis) -> list[int]:
    """Assert each shard's index is consistent (counter = sum of sizes = sum of its live
    blocks' sizes, one LRU entry per size) and within the shard's budget; the counters."""
    assert store.shard_budget_bytes is not None
    counters = []
    for shard in range(store.keys.num_shards):
        lru_key, sizes_key, bytes_key = store.index_keys(shard)
        sizes = {_text(member): int(size) for member, size in raw.hgetall(sizes_key).items()}
        counter = int(raw.get(bytes_key) or 0)
        live = sum(raw.strlen(store.keys.block_prefixes[shard] + member) for member in sizes)
        assert counter == sum(sizes.values()) == live, (shard, counter, sizes)
        assert raw.zcard(lru_key) == len(sizes)
        assert counter <= store.shard_budget_bytes
        counters.append(counter)
    return counters


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def check_budget_lru_is_per_shard(make_store: Callable[[int], RedisKVStore], raw: AnyRedis) -> None:
    """``make_store(budget_bytes)`` builds a two-shard store. With 2.5 frames per shard, a
    third block in shard 0 evicts shard 0's least recently used block, though shard 1 holds
    a block used longer ago: LRU is per shard."""
    a1, a2, a3, b1, b2 = single_blocks_in_shards(make_store(0), [0, 0, 0, 1, 1])
    frame_bytes = max(
        len(encode_frame(x.staged[:, :, 0], x.token_ids[0], "fp-test", "LKBTHD"))
        for x in (a1, a2, a3, b1, b2)
    )
    store = make_store(2 * int(2.5 * frame_bytes))
    assert store.keys.num_shards == 2 and store.fingerprint == "fp-test"
    for blocks in (b1, a1, a2, b2):  # b1 is the least recently used of all
        store.save(blocks.hashes, blocks.token_ids, blocks.staged)
        time.sleep(0.002)  # distinct LRU scores across calls
    assert store.load(a1.hashes, a1.token_ids) is not None  # a1 becomes shard 0's youngest
    store.save(a3.hashes, a3.token_ids, a3.staged)
    assert [store.lookup(x.hashes) for x in (a1, a2, a3, b1, b2)] == [1, 0, 1, 1, 1]
    assert store.stats.evictions == 1
    counters = check_budget_index(store, raw)

    def stored_bytes(*held: Blocks) -> int:
        return sum(raw.strlen(store.block_key(x.hashes[0])) for x in held)

    assert counters == [stored_bytes(a1, a3), stored_bytes(b1, b2)]
    assert sum(counters) == store.stats.bytes_used <= 2 * int(2.5 * frame_bytes)
