"""Pins and KV store traffic: what stays on the device between requests, and what moves
between the device pool and the KV store below it (host memory, Redis).

One class owns both, because they are one decision: a pinned context is the first thing
offloaded to the store when the pool runs short, and a request's prefix is restored from the
store into blocks that the pool must first make room for (by releasing pins).

Life of a context kept for a session (``owner_id``)::

    pin_tokens --> pinned (blocks referenced, cannot be evicted)
        --unpin--> cached (ref 0, evictable)             the next request may still hit them
        --offload_pin / reclaim--> saved to the store, then unpinned
    store --restore_prefix (at admission)--> cached device blocks, found as prefix hits

Every full block that leaves the device is written to the store once per content hash, so
the store serves every request, not only sessions: pins are saved when offloaded or
reclaimed, preempted requests when swapped out, and any other cached block when the pool
evicts it (write-back: ``write_back_evicted``, called before the KV of the evicted blocks is
overwritten).

Writes run on a ``TransferWorker`` beside the next forward pass; reads wait for the writes
submitted before them (see ``engine.transfer_worker``).

Not thread-safe: the engine's step loop (or a caller holding the engine's step lock) is the
only caller.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.block_pool import BlockHash, KVBlock
from engine.kv_cache_manager import KVCacheManager
from engine.kv_store import KVStore
from engine.request import Request
from engine.transfer_worker import TransferWorker
from kernels import ops


@dataclass(slots=True)
class Pin:
    """An owner's context kept on the device: its full cached blocks and the tokens/salt they
    were hashed from (needed to write the blocks to the store later)."""

    blocks: list[KVBlock]
    token_ids: list[int]
    cache_salt: str


class OffloadManager:
    """Owns the pins and every transfer between the device pool and the KV store.

    Contract: ``kv_cache`` is the device KV tensor ``[num_layers, 2, num_blocks, block_size,
    num_kv_heads, head_dim]`` whose blocks ``kv_manager`` hands out. Without a store, saves and
    restores are no-ops and pins still work. A failed or partial restore restores nothing (the
    prefix is recomputed); a store never sees a block twice in one save (leading blocks it
    already holds are skipped).
    """

    def __init__(
        self, kv_manager: KVCacheManager, kv_cache: torch.Tensor, kv_store: KVStore | None = None
    ) -> None:
        self.kv_manager = kv_manager
        self.kv_cache = kv_cache
        self.block_size = kv_manager.block_size
        self.store = kv_store
        self.transfers = TransferWorker()
        # dict order = least recently pinned first (the first to be reclaimed)
        self.pins: dict[str, Pin] = {}
        self._pin_refs: dict[int, int] = {}  # block id -> number of pins holding it (O(1) stats)
        self.num_pins_reclaimed = 0  # pins released under memory pressure
        self.num_restored_tokens = 0  # tokens brought back from the store instead of recomputed
        self.num_saved_tokens = 0  # tokens written to the store
        # Evicted cached blocks whose KV is still in place: (block id, hash, tokens).
        self._evicted: list[tuple[int, BlockHash, tuple[int, ...]]] = []
        kv_manager.observe_evictions(self._note_eviction)

    def readable_store(self) -> KVStore | None:
        """The store, once every write submitted so far has landed in it (None if none)."""
        if self.store is not None:
            self.transfers.wait_idle()
        return self.store

    # -- pins ----------------------------------------------------------------------------------

    def pin_tokens(self, owner_id: str, token_ids: list[int], cache_salt: str = "") -> int:
        """Pin the device-cached full blocks of ``token_ids`` for ``owner_id`` (replacing its
        previous pin; the owner becomes the most recently pinned); returns tokens pinned."""
        hashes = self.kv_manager.hashes_for_tokens(token_ids, cache_salt)
        blocks = self.kv_manager.cached_prefix(token_ids, hashes)
        self.kv_manager.hold(blocks)  # before unpinning: shared blocks must not be evicted
        self.unpin(owner_id)
        self.pins[owner_id] = Pin(list(blocks), list(token_ids), cache_salt)
        for block in blocks:
            self._pin_refs[block.block_id] = self._pin_refs.get(block.block_id, 0) + 1
        return len(blocks) * self.block_size

    def unpin(self, owner_id: str) -> None:
        """Release the owner's pin (unknown owners are ignored); its blocks stay cached until
        the pool evicts them."""
        pin = self.pins.pop(owner_id, None)
        if pin is None:
            return
        self.kv_manager.release(pin.blocks)
        for block in pin.blocks:
            count = self._pin_refs[block.block_id] - 1
            if count:
                self._pin_refs[block.block_id] = count
            else:
                del self._pin_refs[block.block_id]

    def offload_pin(self, owner_id: str) -> None:
        """Write the owner's pinned blocks to the store (if any), then release the pin."""
        pin = self.pins.get(owner_id)
        if pin is None:
            return
        hashes = self.kv_manager.hashes_for_tokens(pin.token_ids, pin.cache_salt)
        self._save_blocks(pin.blocks, hashes, pin.token_ids)
        self.unpin(owner_id)

    def reclaim(self, num_blocks_needed: int) -> bool:
        """Offload pins, least recently pinned first, until ``num_blocks_needed`` blocks are
        free or no pin is left. True if any pin was released."""
        released = False
        while self.pins and self.kv_manager.num_free_blocks < num_blocks_needed:
            self.offload_pin(next(iter(self.pins)))
            released = True
            self.num_pins_reclaimed += 1
        return released

    def is_pinned(self, owner_id: str) -> bool:
        return owner_id in self.pins

    @property
    def num_pinned_blocks(self) -> int:
        """Distinct blocks held by at least one pin."""
        return len(self._pin_refs)

    def pinned_block_lists(self) -> list[list[KVBlock]]:
        """Every pin's blocks (for integrity checks: each is one reference per block)."""
        return [pin.blocks for pin in self.pins.values()]

    def check_integrity(self) -> None:
        """The O(1) pinned-block count agrees with the pins."""
        refs: dict[int, int] = {}
        for pin in self.pins.values():
            for block in pin.blocks:
                refs[block.block_id] = refs.get(block.block_id, 0) + 1
        assert refs == self._pin_refs, "pinned block counts drifted"

    # -- store traffic -------------------------------------------------------------------------

    def save_tokens(self, token_ids: list[int], cache_salt: str = "") -> int:
        """Write the device-cached full blocks of ``token_ids`` to the store; returns tokens."""
        hashes = self.kv_manager.hashes_for_tokens(token_ids, cache_salt)
        blocks = self.kv_manager.cached_prefix(token_ids, hashes)
        self._save_blocks(blocks, hashes, token_ids)
        return len(blocks) * self.block_size

    def swap_out(self, request: Request) -> None:
        """Before a preempted request's blocks are freed: keep its full blocks in the store."""
        num_full = request.num_computed_tokens // self.block_size
        table = self.kv_manager.block_table(request.request_id)[:num_full]
        self._save_blocks(table, self.kv_manager.block_hashes(request), request.all_token_ids)

    def cached_tokens(self, token_ids: list[int], cache_salt: str = "") -> tuple[int, int]:
        """(tokens of ``token_ids`` cached on the device, tokens then held by the store)."""
        hashes = self.kv_manager.hashes_for_tokens(token_ids, cache_salt)
        on_device = len(self.kv_manager.cached_prefix(token_ids, hashes))
        store = self.readable_store()
        in_store = store.lookup(hashes[on_device:]) if store is not None else 0
        return on_device * self.block_size, in_store * self.block_size

    def restore_prefix(self, request: Request, max_new_tokens: int) -> list[KVBlock]:
        """Load the blocks of ``request``'s prefix that the store holds and the device lacks
        (the scheduler calls this right before admitting it, so blocks are only restored for a
        request about to use them). They come back cached and held, one reference each, until
        the caller passes them to ``KVCacheManager.release``; [] without a store or a hit, or
        when the load fails (the prefix is then recomputed), and when the pool has no room for
        the restored blocks plus the request's first ``max_new_tokens`` new tokens (it could
        not be admitted; it tries again at its next admission)."""
        if self.store is None:
            return []
        return self._restore_prefix(request, max_new_tokens)

    def _note_eviction(self, block: KVBlock) -> None:
        if self.store is not None and block.block_hash is not None and block.token_ids:
            self._evicted.append((block.block_id, block.block_hash, block.token_ids))

    def write_back_evicted(self) -> None:
        """Save the blocks the pool evicted since the last call to the store, skipping those
        it already holds. Call before anything overwrites the evicted blocks' KV (the
        restore scatter, the next forward pass)."""
        if not self._evicted:
            return
        evicted, self._evicted = self._evicted, []
        store = self.readable_store()
        if store is None:
            return
        held = store.contains([block_hash for _, block_hash, _ in evicted])
        missing = [entry for entry, is_held in zip(evicted, held, strict=True) if not is_held]
        if not missing:
            return
        block_ids = torch.tensor([block_id for block_id, _, _ in missing])
        staged = ops.gather_blocks(self.kv_cache, block_ids).cpu()
        hashes = [block_hash for _, block_hash, _ in missing]
        self.transfers.submit(store.save, hashes, [list(t) for _, _, t in missing], staged)
        self.num_saved_tokens += len(missing) * self.block_size

    def _restore_prefix(self, request: Request, max_new_tokens: int) -> list[KVBlock]:
        store = self.readable_store()
        assert store is not None
        max_blocks = (request.num_tokens - 1) // self.block_size
        hashes = self.kv_manager.block_hashes(request)[:max_blocks]
        on_device = self.kv_manager.cached_prefix(request.all_token_ids, hashes)
        # Held while restoring: the import must not evict the request's own device prefix
        # (the restored blocks would follow a hole, and admission would restore again).
        self.kv_manager.hold(on_device)
        try:
            return self._restore_after(request, store, hashes, len(on_device), max_new_tokens)
        finally:
            self.kv_manager.release(on_device)

    def _restore_after(
        self,
        request: Request,
        store: KVStore,
        hashes: list[BlockHash],
        start: int,
        max_new_tokens: int,
    ) -> list[KVBlock]:
        """Restore the blocks the store holds after the first ``start`` (held on the device)."""
        num_blocks = store.lookup(hashes[start:])
        if num_blocks == 0:
            return []
        # Room for the restored blocks and the first chunk after them, or nothing: blocks
        # restored for a request that then cannot be admitted would be evicted again before
        # its next try, and restored again, step after step.
        num_new = min(request.num_tokens - (start + num_blocks) * self.block_size, max_new_tokens)
        needed = num_blocks + self.kv_manager.num_blocks_for(max(1, num_new))
        if needed > self.kv_manager.num_free_blocks:
            self.reclaim(needed)  # paused contexts make room for a resuming one
        if needed > self.kv_manager.num_free_blocks:
            return []
        wanted = hashes[start : start + num_blocks]
        tokens = [
            request.all_token_ids[idx * self.block_size : (idx + 1) * self.block_size]
            for idx in range(start, start + num_blocks)
        ]
        staged, blocks_by_tier = store.load_with_sources(wanted, tokens)
        if staged is None:
            return []
        blocks = self.kv_manager.import_blocks(wanted, tokens)
        self.write_back_evicted()  # the blocks just taken may have been cached ones
        block_ids = torch.tensor([block.block_id for block in blocks])
        ops.scatter_blocks(self.kv_cache, block_ids, staged)
        request.num_restored_tokens += num_blocks * self.block_size
        by_tier = request.restored_tokens_by_tier
        for name, count in blocks_by_tier.items():
            by_tier[name] = by_tier.get(name, 0) + count * self.block_size
        self.num_restored_tokens += num_blocks * self.block_size
        return blocks

    def _save_blocks(
        self, blocks: list[KVBlock], hashes: list[BlockHash], token_ids: list[int]
    ) -> None:
        """Write device blocks (the full blocks of ``token_ids``) to the store, skipping the
        leading ones it already holds."""
        store = self.readable_store()
        if store is None or not blocks:
            return
        skip = store.lookup(hashes[: len(blocks)])
        blocks, hashes = blocks[skip:], hashes[skip : len(blocks)]
        if not blocks:
            return
        tokens = [
            token_ids[(skip + i) * self.block_size : (skip + i + 1) * self.block_size]
            for i in range(len(blocks))
        ]
        block_ids = torch.tensor([block.block_id for block in blocks])
        staged = ops.gather_blocks(self.kv_cache, block_ids).cpu()
        self.transfers.submit(store.save, hashes, tokens, staged)
        self.num_saved_tokens += len(blocks) * self.block_size
