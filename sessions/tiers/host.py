"""The host-memory KV tier: a bounded LRU of blocks (pinned when CUDA is present)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from engine.block_pool import BlockHash
from sessions.tiers.base import (
    KVTier,
    KVTierStats,
    block_shape_of,
    check_load_args,
    check_save_args,
    empty_staged,
    logger,
)


@dataclass(frozen=True, slots=True)
class _HostBlock:
    token_ids: tuple[int, ...]
    kv: torch.Tensor  # [num_layers, 2, block_size, num_kv_heads, head_dim]
    num_bytes: int


class HostKVStore(KVTier):
    """Blocks in host memory, at most ``capacity_bytes`` of tensor data, least recently used
    evicted first. Thread-safe. Blocks bigger than the capacity are dropped on save."""

    tier_name = "host"

    def __init__(self, capacity_bytes: int) -> None:
        if capacity_bytes < 0:
            raise ValueError(f"capacity_bytes must be >= 0, got {capacity_bytes}")
        self.capacity_bytes = capacity_bytes
        self._blocks: OrderedDict[BlockHash, _HostBlock] = OrderedDict()  # oldest first
        self._lock = threading.Lock()
        self._pin_memory = torch.cuda.is_available()
        self._stats = KVTierStats()

    @property
    def stats(self) -> KVTierStats:
        """A snapshot of the counters."""
        with self._lock:
            return replace(self._stats)

    def contains(self, block_hashes: Sequence[BlockHash]) -> list[bool]:
        with self._lock:
            return [block_hash in self._blocks for block_hash in block_hashes]

    def load(
        self, block_hashes: Sequence[BlockHash], token_ids: Sequence[Sequence[int]]
    ) -> torch.Tensor | None:
        """See ``KVStore.load``. A block whose stored tokens differ is discarded and logged."""
        check_load_args(block_hashes, token_ids)
        with self._lock:
            found = [self._find(h, tuple(t)) for h, t in zip(block_hashes, token_ids, strict=True)]
            blocks = [block for block in found if block is not None]
            if not found or len(blocks) < len(found) or not _same_layout(blocks):
                self._stats.misses += len(found)
                return None
            for block_hash in reversed(block_hashes):  # prefix ends up most recently used
                self._blocks.move_to_end(block_hash)
            self._stats.hits += len(blocks)
        # Stored tensors are never written after save, so copying outside the lock is safe.
        first = blocks[0].kv
        staged = empty_staged(first.shape, first.dtype, len(blocks), self._pin_memory)
        for block_idx, block in enumerate(blocks):
            staged[:, :, block_idx].copy_(block.kv)
        return staged

    def save(
        self,
        block_hashes: Sequence[BlockHash],
        token_ids: Sequence[Sequence[int]],
        staged: torch.Tensor,
    ) -> None:
        """See ``KVStore.save``. Held blocks are only touched. Blocks go in tail first, so when
        the capacity runs out within one call it is the prefix that stays."""
        check_save_args(block_hashes, token_ids, staged)
        block_shape = block_shape_of(staged)
        num_bytes = staged[:, :, 0].numel() * staged.element_size() if len(block_hashes) else 0
        with self._lock:
            for block_idx in reversed(range(len(block_hashes))):
                block_hash = block_hashes[block_idx]
                if block_hash in self._blocks:
                    self._blocks.move_to_end(block_hash)
                    continue
                if num_bytes > self.capacity_bytes:
                    continue
                self._evict_down_to(self.capacity_bytes - num_bytes)
                kv = torch.empty(block_shape, dtype=staged.dtype, pin_memory=self._pin_memory)
                kv.copy_(staged[:, :, block_idx])
                tokens = tuple(int(t) for t in token_ids[block_idx])
                self._blocks[block_hash] = _HostBlock(tokens, kv, num_bytes)
                self._stats.bytes_used += num_bytes
                self._stats.bytes_written += num_bytes

    def _find(self, block_hash: BlockHash, token_ids: tuple[int, ...]) -> _HostBlock | None:
        block = self._blocks.get(block_hash)
        if block is not None and block.token_ids != token_ids:
            logger.warning("host KV block %s: stored tokens differ; discarded", block_hash.hex())
            self._drop(block_hash)
            self._stats.invalid += 1
            return None
        return block

    def _evict_down_to(self, limit_bytes: int) -> None:
        while self._stats.bytes_used > limit_bytes and self._blocks:
            self._drop(next(iter(self._blocks)))
            self._stats.evictions += 1

    def _drop(self, block_hash: BlockHash) -> None:
        self._stats.bytes_used -= self._blocks.pop(block_hash).num_bytes


def _same_layout(blocks: Sequence[_HostBlock]) -> bool:
    first = blocks[0].kv
    if all(b.kv.shape == first.shape and b.kv.dtype == first.dtype for b in blocks):
        return True
    logger.warning("host KV blocks of one load differ in shape or dtype; not loaded")
    return False
