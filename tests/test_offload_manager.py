"""Pins in the offload manager on ~10 blocks: exact references, the pinned-block count,
reclaim order (least recently pinned first), all without a model."""

from __future__ import annotations

import torch

from engine.kv_cache_manager import KVCacheManager
from engine.offload_manager import OffloadManager
from engine.request import Request
from engine.sampling_params import SamplingParams
from sessions.tiers import HostKVStore

BLOCK = 4


def cached_context(manager: KVCacheManager, request_id: str, token_ids: list[int]) -> None:
    """Run a request's bookkeeping as if its tokens were computed, then finish it."""
    request = Request(request_id, token_ids, SamplingParams())
    assert manager.allocate_slots(request, len(token_ids))
    request.num_computed_tokens = len(token_ids)
    manager.cache_full_blocks(request)
    manager.free(request_id)


def make(num_blocks: int = 10) -> tuple[KVCacheManager, OffloadManager]:
    manager = KVCacheManager(num_blocks, BLOCK)
    kv_cache = torch.zeros(
        1, 2, num_blocks, BLOCK, 1, 2
    )  # [layers, k/v, blocks, block, heads, dim]
    return manager, OffloadManager(manager, kv_cache)


def test_pins_hold_blocks_and_count_shared_ones_once():
    manager, offload = make()
    shared = list(range(8))
    cached_context(manager, "a", [*shared, 100, 101, 102, 103])
    cached_context(manager, "b", [*shared, 200, 201, 202, 203])
    assert offload.pin_tokens("session-a", [*shared, 100, 101, 102, 103]) == 12
    assert offload.pin_tokens("session-b", [*shared, 200, 201, 202, 203]) == 12
    assert offload.num_pinned_blocks == 4  # 2 shared + 1 + 1
    assert offload.is_pinned("session-a") and manager.usage() == 0.4
    offload.check_integrity()
    manager.check_integrity(offload.pinned_block_lists())
    offload.unpin("session-a")
    assert offload.num_pinned_blocks == 3 and not offload.is_pinned("session-a")
    offload.unpin("session-b")
    offload.unpin("unknown")  # ignored
    assert offload.num_pinned_blocks == 0 and manager.usage() == 0.0
    offload.check_integrity()
    manager.check_integrity()


def test_reclaim_offloads_least_recently_pinned_first_to_the_store():
    manager, offload = make(num_blocks=6)
    offload.store = HostKVStore(capacity_bytes=1 << 20)
    cached_context(manager, "a", list(range(8)))
    cached_context(manager, "b", list(range(50, 58)))
    offload.pin_tokens("old", list(range(8)))
    offload.pin_tokens("new", list(range(50, 58)))
    assert manager.num_free_blocks == 2
    assert offload.reclaim(num_blocks_needed=4)
    assert list(offload.pins) == ["new"] and offload.num_pins_reclaimed == 1
    store = offload.readable_store()
    assert store is not None and store.lookup(manager.hashes_for_tokens(list(range(8)), "")) == 2
    assert offload.num_saved_tokens == 8
    offload.check_integrity()
    manager.check_integrity(offload.pinned_block_lists())


def test_a_prefix_load_reserves_its_blocks_and_fills_them_on_the_engine_thread():
    manager, offload = make(num_blocks=10)
    offload.store = HostKVStore(capacity_bytes=1 << 20)
    tokens = list(range(13))  # 3 full blocks; the last token is always recomputed
    cached_context(manager, "a", tokens)
    offload.kv_cache.normal_()
    expected = offload.kv_cache[:, :, :3].clone()  # the 3 blocks "a" used: ids 0, 1, 2
    assert offload.save_tokens(tokens) == 12
    offload.readable_store()
    manager.reset_prefix_cache()  # gone from the device, kept in the store
    request = Request("b", tokens, SamplingParams())
    assert offload.restore_prefix(request, max_new_tokens=8) is None  # a load started
    held = offload.held_block_lists()
    assert [len(blocks) for blocks in held] == [3 + 1]  # 3 restored + the first chunk's
    manager.check_integrity(held)
    offload.loads["b"].done.wait(5)
    assert offload.poll_restores() == [request]
    blocks = offload.restore_prefix(request, max_new_tokens=8)
    assert blocks is not None and len(blocks) == 3 and request.num_restored_tokens == 12
    ids = torch.tensor([block.block_id for block in blocks])
    assert torch.equal(offload.kv_cache[:, :, ids], expected)
    assert manager.cached_prefix(tokens, manager.hashes_for_tokens(tokens, "")) == blocks
    manager.release(blocks)
    manager.check_integrity(offload.held_block_lists())
    assert manager.num_free_blocks == 10
