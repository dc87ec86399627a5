"""Pins and KV store traffic: what stays on the device between requests, and what moves
between the device pool and the KV store below it (host memory, Redis).

One class owns both, because they are one decision: a pinned context is the first thing
offloaded to the store when the pool runs short, and a request's prefix is restored from the
store into blocks that the pool must first make room for (by releasing pins).

Life of a context kept for a session (``owner_id``)::

    pin_tokens --> pinned (blocks referenced, cannot be evicted)
        --unpin--> cached (ref 0, evictable)             the next request may still hit them
        --offload_pin / reclaim--> saved to the store, then unpinned
    store --restore_prefix (at admission: starts a load)--> poll_restores (a later step:
          the KV is scattered into the blocks)--> cached device blocks, found as prefix hits

Every full block that leaves the device is written to the store once per content hash, so
the store serves every request, not only sessions: pins are saved when offloaded or
reclaimed, preempted requests when swapped out, and any other cached block when the pool
evicts it (write-back: ``write_back_evicted``, called before the KV of the evicted blocks is
overwritten).

Writes and reads both run on a ``TransferWorker`` beside the forward passes, in submission
order, so a load sees every write submitted before it. A request whose prefix is being loaded
waits alone (the scheduler parks it) while the batch keeps stepping: its blocks are taken at
the start, the store read (for Redis, the network fetch) runs on the worker, and the next
step after it finished scatters the KV into the blocks on the engine thread and indexes them
as cached; a load that fails or runs past ``restore_timeout_s`` releases its blocks and the
prefix is recomputed.

Not thread-safe: the engine's step loop (or a caller holding the engine's step lock) is the
only caller.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from engine.block_pool import BlockHash, KVBlock
from engine.kv_cache_manager import KVCacheManager
from engine.kv_store import KVStore
from engine.request import Request
from engine.scheduler import RestoreResult, RestoreWait
from engine.transfer_worker import TransferWorker
from kernels import ops

logger = logging.getLogger(__name__)
RESTORE_TIMEOUT_S = 10.0  # a load still running after this long is given up (recompute)


@dataclass(slots=True)
class Pin:
    """An owner's context kept on the device: its full cached blocks and the tokens/salt they
    were hashed from (needed to write the blocks to the store later)."""

    blocks: list[KVBlock]
    token_ids: list[int]
    cache_salt: str


@dataclass(slots=True, eq=False)
class PrefixLoad:
    """One request's prefix being read from the store on the transfer worker.

    ``blocks`` are taken (held, uncached) when the load starts, with ``reserve``: room for
    the request's first chunk after them, so its admission cannot fail for lack of blocks;
    ``prefix`` are the request's leading blocks already on the device, held for the load so
    that taking ``blocks`` cannot evict them (the restored blocks would follow a hole);
    ``state`` goes ``loading`` -> ``ready`` (KV scattered into ``blocks``, which are indexed
    as cached) or ``failed`` (all released, the prefix is recomputed).
    """

    request: Request
    blocks: list[KVBlock]
    reserve: list[KVBlock]
    hashes: list[BlockHash]
    token_ids: list[list[int]]
    started: float
    done: threading.Event = field(default_factory=threading.Event)
    prefix: list[KVBlock] = field(default_factory=list)
    staged: torch.Tensor | None = None
    blocks_by_tier: dict[str, int] = field(default_factory=dict)  # which tier served them
    state: str = "loading"


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
        # Hashes submitted for saving whose write has not finished (count per hash): a
        # later save skips them and a later load may count on them (it runs after them).
        self._saving: dict[BlockHash, int] = {}
        self._saving_lock = threading.Lock()
        self.loads: dict[str, PrefixLoad] = {}  # request id -> its prefix load
        self.restore_timeout_s = RESTORE_TIMEOUT_S
        self.num_failed_restores = 0  # loads that failed or timed out (prefix recomputed)
        self.last_load_s = 0.0  # how long the last finished load took, start to scatter
        kv_manager.observe_evictions(self._note_eviction)

    def close(self) -> None:
        """Finish the queued transfers and end the transfer thread (later transfers run on
        the caller's thread)."""
        self.transfers.close()

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

    def held_block_lists(self) -> list[list[KVBlock]]:
        """Every block list this manager holds a reference on: pins and prefix loads."""
        loads = [[*load.prefix, *load.blocks, *load.reserve] for load in self.loads.values()]
        return [*self.pinned_block_lists(), *loads]

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
        in_store = 0
        if self.store is not None:
            held = self._held(hashes[on_device:])
            in_store = held.index(False) if False in held else len(held)
        return on_device * self.block_size, in_store * self.block_size

    def restore_prefix(self, request: Request, max_new_tokens: int) -> RestoreResult:
        """Bring back the blocks of ``request``'s prefix that the store holds and the device
        lacks (the scheduler calls this right before admitting it, so blocks are only
        restored for a request about to use them).

        Returns None when a load started: the request must wait (``poll_restores`` names it
        once the load finished) and be admitted again, when this returns its restored blocks,
        cached and held one reference each until the caller passes them to
        ``KVCacheManager.release``. Returns [] without a store or a hit, and after a failed
        load (the prefix is then recomputed). Returns ``RestoreWait.NO_ROOM`` (nothing held)
        when the pool has no room for the restored blocks plus the request's first
        ``max_new_tokens`` new tokens, even after reclaiming pins: the scheduler decides
        whether the request waits for room or recomputes."""
        load = self.loads.get(request.request_id)
        if load is not None:  # failed loads stay until the request ends: no second try
            assert load.state != "loading", "a request was admitted while its load ran"
            if load.state == "failed":
                return []
            del self.loads[request.request_id]
            self.kv_manager.release(load.reserve)  # free again, for the admission to take
            return [*load.prefix, *load.blocks]
        if self.store is None:
            return []
        return self._start_restore(self.store, request, max_new_tokens)

    def poll_restores(self) -> list[Request]:
        """Finish the loads that are done (scatter their KV into their blocks, on this
        thread) or failed or timed out (release their blocks); returns their requests, in the
        order their loads started, to be admitted again."""
        finished = []
        now = time.monotonic()
        for load in self.loads.values():
            if load.state != "loading":
                continue
            if load.done.is_set() and load.staged is not None:
                self._fill(load)
            elif load.done.is_set():
                self._fail(load, "failed")
            elif now - load.started > self.restore_timeout_s:
                self._fail(load, f"timed out after {self.restore_timeout_s:.1f} s")
            else:
                continue
            finished.append(load.request)
        return finished

    def cancel_restore(self, request: Request) -> None:
        """Drop ``request``'s load (finished or not; unknown requests are ignored) and the
        blocks it holds. A read still running on the worker only fills a staging tensor."""
        load = self.loads.pop(request.request_id, None)
        if load is not None:
            self.kv_manager.release([*load.prefix, *load.blocks, *load.reserve])

    def wait_for_loads(self, timeout_s: float) -> None:
        """Block until some running load is done or ``timeout_s`` passed (for a step that had
        nothing to compute: the engine thread then sleeps instead of spinning)."""
        running = [load for load in self.loads.values() if load.state == "loading"]
        if running:
            first = min(running, key=lambda load: load.started)
            deadline = first.started + self.restore_timeout_s - time.monotonic()
            first.done.wait(max(0.0, min(timeout_s, deadline)))

    @property
    def num_loading(self) -> int:
        """Prefix loads still running."""
        return sum(1 for load in self.loads.values() if load.state == "loading")

    def _note_eviction(self, block: KVBlock) -> None:
        if self.store is not None and block.block_hash is not None and block.token_ids:
            self._evicted.append((block.block_id, block.block_hash, block.token_ids))

    def write_back_evicted(self) -> None:
        """Save the blocks the pool evicted since the last call to the store, skipping those
        it already holds or is being written. Call before anything overwrites the evicted
        blocks' KV (the restore scatter, the next forward pass)."""
        if not self._evicted:
            return
        evicted, self._evicted = self._evicted, []
        if self.store is None:
            return
        held = self._held([block_hash for _, block_hash, _ in evicted])
        missing = [entry for entry, is_held in zip(evicted, held, strict=True) if not is_held]
        if not missing:
            return
        block_ids = torch.tensor([block_id for block_id, _, _ in missing])
        hashes = [block_hash for _, block_hash, _ in missing]
        self._submit_save(block_ids, hashes, [list(t) for _, _, t in missing])

    def _held(self, hashes: Sequence[BlockHash]) -> list[bool]:
        """For each hash: in the store, or on its way there (a save submitted, not done).
        Does not wait for the worker."""
        assert self.store is not None
        in_store = self.store.contains(hashes) if hashes else []
        with self._saving_lock:
            return [found or h in self._saving for h, found in zip(hashes, in_store, strict=True)]

    def _submit_save(
        self, block_ids: torch.Tensor, hashes: list[BlockHash], token_ids: list[list[int]]
    ) -> None:
        """Stage the blocks' KV now (this thread) and write it on the worker."""
        assert self.store is not None
        staged = ops.gather_blocks(self.kv_cache, block_ids).cpu()
        with self._saving_lock:
            for block_hash in hashes:
                self._saving[block_hash] = self._saving.get(block_hash, 0) + 1
        self.transfers.submit(self._run_save, self.store, hashes, token_ids, staged)
        self.num_saved_tokens += len(hashes) * self.block_size

    def _run_save(
        self,
        store: KVStore,
        hashes: list[BlockHash],
        token_ids: list[list[int]],
        staged: torch.Tensor,
    ) -> None:
        """On the worker: one save; its hashes stop counting as in flight whatever happens."""
        try:
            store.save(hashes, token_ids, staged)
        finally:
            with self._saving_lock:
                for block_hash in hashes:
                    count = self._saving[block_hash] - 1
                    if count:
                        self._saving[block_hash] = count
                    else:
                        del self._saving[block_hash]

    def _start_restore(
        self, store: KVStore, request: Request, max_new_tokens: int
    ) -> RestoreResult:
        # Blocks evicted earlier in this schedule (by another admission's allocation) are
        # still intact: submit their writes now, so this load finds them and runs after them.
        self.write_back_evicted()
        max_blocks = (request.num_tokens - 1) // self.block_size
        hashes = self.kv_manager.block_hashes(request)[:max_blocks]
        on_device = self.kv_manager.cached_prefix(request.all_token_ids, hashes)
        start = len(on_device)
        held = self._held(hashes[start:])
        num_blocks = held.index(False) if False in held else len(held)
        if num_blocks == 0:
            return []
        self.kv_manager.hold(on_device)  # not evicted by what this load takes
        try:
            return self._start_load(store, request, max_new_tokens, on_device, hashes, num_blocks)
        except BaseException:
            self.kv_manager.release(on_device)
            raise

    def _start_load(
        self,
        store: KVStore,
        request: Request,
        max_new_tokens: int,
        on_device: list[KVBlock],
        hashes: list[BlockHash],
        num_blocks: int,
    ) -> RestoreWait | None:
        """Take the blocks for ``num_blocks`` restored blocks after the held ``on_device``
        prefix (plus room for the first chunk) and start their read (None);
        ``RestoreWait.NO_ROOM`` (``on_device`` released) when the pool has no room."""
        start = len(on_device)
        # Room for the restored blocks and the first chunk after them, or nothing: blocks
        # restored for a request that then cannot be admitted would be evicted again before
        # its next try, and restored again, step after step.
        num_new = min(request.num_tokens - (start + num_blocks) * self.block_size, max_new_tokens)
        needed = num_blocks + self.kv_manager.num_blocks_for(max(1, num_new))
        if needed > self.kv_manager.num_free_blocks:
            self.reclaim(needed)  # paused contexts make room for a resuming one
        if needed > self.kv_manager.num_free_blocks:
            self.kv_manager.release(on_device)
            return RestoreWait.NO_ROOM
        taken = self.kv_manager.allocate_held(needed)
        assert taken is not None
        load = PrefixLoad(
            request,
            taken[:num_blocks],
            taken[num_blocks:],
            hashes[start : start + num_blocks],
            [
                request.all_token_ids[idx * self.block_size : (idx + 1) * self.block_size]
                for idx in range(start, start + num_blocks)
            ],
            time.monotonic(),
            prefix=on_device,
        )
        self.loads[request.request_id] = load
        self.transfers.submit(self._run_load, store, load)
        return None

    @staticmethod
    def _run_load(store: KVStore, load: PrefixLoad) -> None:
        """On the worker: read the blocks (after every save submitted before)."""
        try:
            load.staged, load.blocks_by_tier = store.load_with_sources(load.hashes, load.token_ids)
        except Exception:
            logger.exception("a KV store read failed; the prefix will be recomputed")
        finally:
            load.done.set()

    def _fill(self, load: PrefixLoad) -> None:
        """Scatter a finished load into its blocks and index them as cached."""
        assert load.staged is not None
        self.write_back_evicted()  # the blocks it took may have been cached ones
        block_ids = torch.tensor([block.block_id for block in load.blocks])
        ops.scatter_blocks(self.kv_cache, block_ids, load.staged)
        load.staged = None
        self.kv_manager.index_blocks(load.blocks, load.hashes, load.token_ids)
        num_tokens = len(load.blocks) * self.block_size
        load.request.num_restored_tokens += num_tokens
        by_tier = load.request.restored_tokens_by_tier
        for name, count in load.blocks_by_tier.items():
            by_tier[name] = by_tier.get(name, 0) + count * self.block_size
        self.num_restored_tokens += num_tokens
        self.last_load_s = time.monotonic() - load.started
        load.state = "ready"

    def _fail(self, load: PrefixLoad, why: str) -> None:
        logger.warning(
            "restoring %d blocks of request %s %s; its prefix will be recomputed",
            len(load.blocks),
            load.request.request_id,
            why,
        )
        self.kv_manager.release([*load.prefix, *load.blocks, *load.reserve])
        load.prefix, load.blocks, load.reserve = [], [], []
        load.state = "failed"
        self.num_failed_restores += 1

    def _save_blocks(
        self, blocks: list[KVBlock], hashes: list[BlockHash], token_ids: list[int]
    ) -> None:
        """Write device blocks (the full blocks of ``token_ids``) to the store, skipping the
        leading ones it already holds (or is being sent)."""
        if self.store is None or not blocks:
            return
        held = self._held(hashes[: len(blocks)])
        skip = held.index(False) if False in held else len(held)
        blocks, hashes = blocks[skip:], hashes[skip : len(blocks)]
        if not blocks:
            return
        tokens = [
            token_ids[(skip + i) * self.block_size : (skip + i + 1) * self.block_size]
            for i in range(len(blocks))
        ]
        block_ids = torch.tensor([block.block_id for block in blocks])
        self._submit_save(block_ids, list(hashes), tokens)
