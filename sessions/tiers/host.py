"""The host-memory KV tier: a bounded LRU of blocks in one preallocated slab (pinned when CUDA
is present).

Why a slab: blocks of a few hundred KB, allocated and freed one by one as the LRU turns over,
fragment the C allocator's arenas, and the process's memory grew far past the tier's budget
in a 10-minute soak. One tensor of ``capacity_bytes // block_bytes`` slots, allocated on the
first save (untouched pages cost nothing) and reused slot by slot, keeps the resident size
bounded by the capacity.
"""

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
    slot: int  # index into the slab's block dimension


class _Slab:
    """``num_slots`` blocks of one layout: a tensor [layers, 2, num_slots, block_size, kv_heads,
    head_dim] (the staged layout, so loads and saves are one indexed copy) and its free slots."""

    def __init__(
        self, block_shape: tuple[int, ...], dtype: torch.dtype, num_slots: int, pin: bool
    ) -> None:
        self.block_shape = block_shape
        self.dtype = dtype
        shape = (*block_shape[:2], num_slots, *block_shape[2:])
        self.kv = torch.empty(shape, dtype=dtype, pin_memory=pin)
        self.block_bytes = self.kv[:, :, 0].numel() * self.kv.element_size()
        self.free_slots = list(range(num_slots - 1, -1, -1))  # pop() hands out slot 0 first

    def fits(self, block_shape: tuple[int, ...], dtype: torch.dtype) -> bool:
        return self.block_shape == block_shape and self.dtype == dtype


class HostKVStore(KVTier):
    """Blocks in host memory, at most ``capacity_bytes`` of tensor data, least recently used
    evicted first. Thread-safe. Blocks bigger than the capacity are dropped on save.

    The store holds one block layout (shape and dtype) at a time, as one engine produces: a
    save in another layout drops what is held (logged) and starts a slab for the new one.
    """

    tier_name = "host"

    def __init__(self, capacity_bytes: int) -> None:
        if capacity_bytes < 0:
            raise ValueError(f"capacity_bytes must be >= 0, got {capacity_bytes}")
        self.capacity_bytes = capacity_bytes
        self._blocks: OrderedDict[BlockHash, _HostBlock] = OrderedDict()  # oldest first
        self._slab: _Slab | None = None
        self._lock = threading.Lock()
        self._pin_memory = torch.cuda.is_available()
        self._stats = KVTierStats()

    @property
    def stats(self) -> KVTierStats:
        """A snapshot of the counters."""
        with self._lock:
            block_bytes = self._slab.block_bytes if self._slab is not None else 0
            return replace(self._stats, bytes_used=len(self._blocks) * block_bytes)

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
            if not found or len(blocks) < len(found) or self._slab is None:
                self._stats.misses += len(found)
                return None
            for block_hash in reversed(block_hashes):  # prefix ends up most recently used
                self._blocks.move_to_end(block_hash)
            self._stats.hits += len(blocks)
            # Copied under the lock: a concurrent save may reuse a slot once it is evicted.
            slab = self._slab
            slots = torch.tensor([block.slot for block in blocks], dtype=torch.long)
            staged = empty_staged(slab.block_shape, slab.dtype, len(blocks), self._pin_memory)
            torch.index_select(slab.kv, 2, slots, out=staged)
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
        if not block_hashes:
            return
        num_bytes = staged[:, :, 0].numel() * staged.element_size()
        num_slots = self.capacity_bytes // num_bytes
        if num_slots == 0:
            return  # a block bigger than the whole capacity
        with self._lock:
            slab = self._slab_for(block_shape_of(staged), staged.dtype, num_slots)
            for block_idx in reversed(range(len(block_hashes))):
                block_hash = block_hashes[block_idx]
                if block_hash in self._blocks:
                    self._blocks.move_to_end(block_hash)
                    continue
                if not slab.free_slots:
                    self._drop(next(iter(self._blocks)))
                    self._stats.evictions += 1
                slot = slab.free_slots.pop()
                slab.kv[:, :, slot].copy_(staged[:, :, block_idx])
                tokens = tuple(int(t) for t in token_ids[block_idx])
                self._blocks[block_hash] = _HostBlock(tokens, slot)
                self._stats.bytes_written += num_bytes

    def _slab_for(self, block_shape: tuple[int, ...], dtype: torch.dtype, num_slots: int) -> _Slab:
        if self._slab is not None and self._slab.fits(block_shape, dtype):
            return self._slab
        if self._blocks:
            logger.warning(
                "host KV tier: blocks of shape %s %s replace %d held blocks of another layout",
                block_shape,
                dtype,
                len(self._blocks),
            )
            self._blocks.clear()
        self._slab = None  # free the old slab before allocating the new one
        self._slab = _Slab(block_shape, dtype, num_slots, self._pin_memory)
        return self._slab

    def _find(self, block_hash: BlockHash, token_ids: tuple[int, ...]) -> _HostBlock | None:
        block = self._blocks.get(block_hash)
        if block is not None and block.token_ids != token_ids:
            logger.warning("host KV block %s: stored tokens differ; discarded", block_hash.hex())
            self._drop(block_hash)
            self._stats.invalid += 1
            return None
        return block

    def _drop(self, block_hash: BlockHash) -> None:
        block = self._blocks.pop(block_hash)
        assert self._slab is not None  # blocks exist only while their slab does
        self._slab.free_slots.append(block.slot)
