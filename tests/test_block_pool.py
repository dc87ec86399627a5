"""Block pool and KV cache manager bookkeeping on ~10 blocks: exact ids and eviction order."""

from __future__ import annotations

import pytest

from engine.block_hash import ROOT_HASH, hash_block_tokens, hash_full_blocks
from engine.block_pool import BlockHash, BlockPool
from engine.kv_cache_manager import KVCacheManager
from engine.request import Request
from engine.sampling_params import SamplingParams


def ids(blocks):
    return [block.block_id for block in blocks]


def test_allocate_takes_lowest_ids_first_and_free_appends_in_order():
    pool = BlockPool(10)
    first = pool.allocate(3)
    assert ids(first) == [0, 1, 2]
    assert ids(pool.allocate(2)) == [3, 4]
    pool.free(list(reversed(first)))  # tail first: 2, 1, 0 join the queue in that order
    assert ids(pool.free_queue) == [5, 6, 7, 8, 9, 2, 1, 0]
    assert ids(pool.allocate(6)) == [5, 6, 7, 8, 9, 2]
    assert pool.allocate(3) is None  # only 2 free: nothing taken
    assert pool.num_free_blocks == 2
    pool.check_integrity()


def test_ref_counts_and_double_free():
    pool = BlockPool(4)
    (block,) = pool.allocate(1)
    pool.touch([block])
    assert block.ref_cnt == 2
    pool.free([block])
    assert block.ref_cnt == 1 and pool.num_free_blocks == 3
    pool.free([block])
    assert block.ref_cnt == 0 and pool.num_free_blocks == 4
    with pytest.raises(ValueError, match="double free"):
        pool.free([block])
    pool.check_integrity()


def test_cached_block_survives_free_until_evicted_least_recently_freed_first():
    pool = BlockPool(4)
    blocks = pool.allocate(4)
    hashes = [BlockHash(bytes([i])) for i in range(4)]
    for block, block_hash in zip(blocks, hashes, strict=True):
        pool.cache_block(block, block_hash, [block.block_id] * 2)
    pool.free([blocks[3], blocks[1], blocks[0], blocks[2]])
    assert pool.lookup(hashes[1], [1, 1]) is blocks[1]
    # A hit on a free block pulls it out of the queue (touch); the rest evict in free order.
    pool.touch([blocks[1]])
    assert ids(pool.free_queue) == [3, 0, 2]
    assert ids(pool.allocate(2)) == [3, 0]
    assert pool.lookup(hashes[3], [3, 3]) is None and pool.lookup(hashes[0], [0, 0]) is None
    assert pool.lookup(hashes[2], [2, 2]) is blocks[2]
    assert pool.num_evictions == 2
    pool.check_integrity()


def test_collision_guard_rejects_hash_hit_with_other_tokens():
    pool = BlockPool(2)
    (block,) = pool.allocate(1)
    pool.cache_block(block, BlockHash(b"h"), [1, 2, 3])
    assert pool.lookup(BlockHash(b"h"), [1, 2, 3]) is block
    assert pool.lookup(BlockHash(b"h"), [1, 2, 4]) is None


def test_chained_hash_depends_on_parent_tokens_and_extra():
    a = hash_block_tokens(ROOT_HASH, [1, 2], b"model-a")
    assert a == hash_block_tokens(ROOT_HASH, [1, 2], b"model-a")
    assert a != hash_block_tokens(ROOT_HASH, [1, 2], b"model-b")
    assert a != hash_block_tokens(ROOT_HASH, [2, 1], b"model-a")
    assert hash_block_tokens(a, [3, 4], b"") != hash_block_tokens(ROOT_HASH, [3, 4], b"")
    assert hash_full_blocks([1, 2, 3, 4, 5], 2, b"x") == hash_full_blocks([1, 2, 3, 4], 2, b"x")
    assert len(hash_full_blocks([1, 2, 3, 4, 5], 2, b"x")) == 2


def _request(request_id: str, tokens: list[int], salt: str = "") -> Request:
    return Request(request_id, tokens, SamplingParams(), cache_salt=salt)


def test_manager_prefix_hit_shares_blocks_and_recomputes_last_token():
    manager = KVCacheManager(num_blocks=10, block_size=4)
    first = _request("a", list(range(10)))
    assert manager.allocate_slots(first, 10)
    assert manager.get_block_ids("a") == [0, 1, 2]
    first.num_computed_tokens = 10
    manager.cache_full_blocks(first)
    # Same 9-token prefix: only 2 full blocks may be reused (token 8 is the last prompt token).
    second = _request("b", list(range(9)))
    blocks, num_cached = manager.get_computed_blocks(second)
    assert ids(blocks) == [0, 1] and num_cached == 8
    assert manager.allocate_slots(second, 1, blocks)
    assert manager.get_block_ids("b") == [0, 1, 3]
    assert [b.ref_cnt for b in manager.pool.blocks[:4]] == [2, 2, 1, 1]
    manager.check_integrity()
    manager.free("a")
    manager.free("b")
    # Tail first: a releases 2 (1 and 0 are still used by b); b then releases 3, 1, 0.
    assert ids(manager.pool.free_queue) == [4, 5, 6, 7, 8, 9, 2, 3, 1, 0]
    manager.check_integrity()


def test_manager_salt_isolates_tenants():
    manager = KVCacheManager(num_blocks=10, block_size=4)
    owner = _request("a", list(range(9)), salt="tenant-1")
    assert manager.allocate_slots(owner, 9)
    owner.num_computed_tokens = 9
    manager.cache_full_blocks(owner)
    assert manager.get_computed_blocks(_request("b", list(range(9)), salt="tenant-2"))[1] == 0
    assert manager.get_computed_blocks(_request("c", list(range(9)), salt="tenant-1"))[1] == 8


def test_allocate_slots_is_all_or_nothing():
    manager = KVCacheManager(num_blocks=3, block_size=4)
    request = _request("a", list(range(20)))
    assert not manager.allocate_slots(request, 20)
    assert manager.num_free_blocks == 3 and "a" not in manager.block_tables
    assert manager.allocate_slots(request, 12)
    manager.check_integrity()


def test_cached_free_count_follows_every_transition():
    """The O(1) counter behind ``LLMEngine.pool_stats`` (the inspector's pool panel)."""
    manager = KVCacheManager(num_blocks=10, block_size=4)
    pool = manager.pool
    blocks = pool.allocate(3)
    assert blocks is not None
    for idx, block in enumerate(blocks[:2]):
        pool.cache_block(block, BlockHash(bytes([idx])), [idx] * 4)
    assert pool.num_cached_free_blocks == 0  # hashed but referenced
    pool.free(list(reversed(blocks)))
    assert pool.num_cached_free_blocks == 2  # two hashed blocks now free; the third is empty
    manager.hold(blocks[:2])
    manager.hold(blocks[:1])  # a shared prefix block
    assert pool.num_cached_free_blocks == 0
    manager.release(blocks[:2])
    assert pool.num_cached_free_blocks == 1
    manager.release(blocks[:1])
    assert pool.num_cached_free_blocks == 2
    manager.check_integrity()
    taken = pool.allocate(10)  # evicts both cached blocks
    assert taken is not None and pool.num_cached_free_blocks == 0 and pool.num_evictions == 2
    pool.free(taken)
    pool.check_integrity()
