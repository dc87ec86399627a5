"""Per-request block tables on top of the block pool, with prefix-cache lookups.

Pure bookkeeping: no torch. The manager knows which physical blocks hold each request's tokens
and which of those blocks are full and hashed (shareable). It never touches KV tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

from engine.block_hash import hash_full_blocks
from engine.block_pool import BlockHash, BlockPool, KVBlock
from engine.request import Request


class KVCacheManager:
    """Maps request ids to block tables.

    Contract: ``allocate_slots`` either reserves every block needed and returns True, or
    changes nothing and returns False. Blocks of a running request are referenced, so the pool
    never evicts them. ``free`` releases a request's blocks tail-first, so a shared prefix
    outlives the tails that follow it in the LRU queue.
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        hash_extra: bytes = b"",
    ) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.block_size = block_size
        self.pool = BlockPool(num_blocks, enable_prefix_caching)
        self.enable_prefix_caching = enable_prefix_caching
        self.hash_extra = hash_extra
        self.block_tables: dict[str, list[KVBlock]] = {}
        self._block_hashes: dict[str, list[BlockHash]] = {}
        # External references that keep cached blocks on the device (e.g. a paused session's
        # context), by owner id; dict order = least recently pinned first.
        self.pins: dict[str, list[KVBlock]] = {}
        self._pin_refs: dict[int, int] = {}  # block id -> number of pins holding it
        self.num_prefix_queries = 0
        self.num_prefix_hits = 0  # tokens served by the prefix cache

    # -- lookups -----------------------------------------------------------------------------

    def _extra(self, cache_salt: str) -> bytes:
        return self.hash_extra + b"\x00salt:" + cache_salt.encode()

    def block_hashes(self, request: Request) -> list[BlockHash]:
        """Hashes of every full block of the request's tokens (memoised per request)."""
        known = self._block_hashes.get(request.request_id, [])
        extra = self._extra(request.cache_salt)
        hashes = hash_full_blocks(request.all_token_ids, self.block_size, extra, known)
        self._block_hashes[request.request_id] = hashes
        return hashes

    def hashes_for_tokens(self, token_ids: Sequence[int], cache_salt: str) -> list[BlockHash]:
        """Hashes of every full block of ``token_ids`` under ``cache_salt`` (not memoised)."""
        return hash_full_blocks(token_ids, self.block_size, self._extra(cache_salt))

    def cached_prefix(self, token_ids: Sequence[int], hashes: Sequence[BlockHash]) -> list[KVBlock]:
        """The device blocks holding the longest cached run of ``hashes`` (no stats, no refs)."""
        found: list[KVBlock] = []
        for block_idx, block_hash in enumerate(hashes):
            start = block_idx * self.block_size
            block = self.pool.lookup(block_hash, token_ids[start : start + self.block_size])
            if block is None:
                break
            found.append(block)
        return found

    def num_cached_leading_blocks(self, hashes: Sequence[BlockHash]) -> int:
        """How many leading ``hashes`` are cached on the device, by hash only (no token check
        and no stats: for reporting, not for reuse)."""
        for block_idx, block_hash in enumerate(hashes):
            if not self.pool.is_cached(block_hash):
                return block_idx
        return len(hashes)

    def get_computed_blocks(self, request: Request) -> tuple[list[KVBlock], int]:
        """The longest cached prefix of the request, as (blocks, num_tokens).

        At most ``num_tokens - 1`` tokens are ever reused: the last token is recomputed because
        its logits are needed.
        """
        if not self.enable_prefix_caching:
            return [], 0
        max_blocks = (request.num_tokens - 1) // self.block_size
        found = self.cached_prefix(request.all_token_ids, self.block_hashes(request)[:max_blocks])
        self.num_prefix_queries += request.num_tokens
        self.num_prefix_hits += len(found) * self.block_size
        return found, len(found) * self.block_size

    # -- allocation --------------------------------------------------------------------------

    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        computed_blocks: Sequence[KVBlock] = (),
    ) -> bool:
        """Reserve blocks for ``num_new_tokens`` more tokens (after ``computed_blocks``).

        ``computed_blocks`` are prefix-cache hits for a request being admitted; they are only
        allowed when the request holds no blocks yet.
        """
        table = self.block_tables.get(request.request_id, [])
        if computed_blocks and table:
            raise ValueError("computed_blocks can only be given for a request without blocks")
        num_computed = (
            len(computed_blocks) * self.block_size
            if computed_blocks
            else (request.num_computed_tokens)
        )
        num_needed = -(-(num_computed + num_new_tokens) // self.block_size)
        num_new_blocks = max(0, num_needed - len(table) - len(computed_blocks))
        if num_new_blocks == 0 and table:  # most decode steps: the last block has room
            return True
        # Touching a free cached block takes it out of the free queue too.
        num_revived = sum(1 for block in computed_blocks if block.ref_cnt == 0)
        if num_new_blocks + num_revived > self.pool.num_free_blocks:
            return False
        self.pool.touch(computed_blocks)
        new_blocks = self.pool.allocate(num_new_blocks)
        assert new_blocks is not None
        self.block_tables[request.request_id] = [*table, *computed_blocks, *new_blocks]
        return True

    def cache_full_blocks(self, request: Request) -> None:
        """Index the request's full, computed blocks by content hash (idempotent)."""
        if not self.enable_prefix_caching:
            return
        table = self.block_tables.get(request.request_id, [])
        num_full = min(request.num_computed_tokens // self.block_size, len(table))
        if num_full == 0 or table[num_full - 1].block_hash is not None:
            return
        hashes = self.block_hashes(request)
        for block_idx in range(num_full):
            block = table[block_idx]
            if block.block_hash is None:
                start = block_idx * self.block_size
                tokens = request.all_token_ids[start : start + self.block_size]
                self.pool.cache_block(block, hashes[block_idx], tokens)

    def free(self, request_id: str) -> None:
        """Release every block of the request (tail first). Unknown ids are ignored."""
        table = self.block_tables.pop(request_id, [])
        self.pool.free(list(reversed(table)))
        self._block_hashes.pop(request_id, None)

    # -- pins ----------------------------------------------------------------------------------

    def pin(self, owner_id: str, blocks: Sequence[KVBlock]) -> None:
        """Reference ``blocks`` on behalf of ``owner_id`` (replacing its previous pin), so the
        pool cannot evict them. The owner becomes the most recently pinned."""
        self.pool.touch(blocks)
        self.unpin(owner_id)
        self.pins[owner_id] = list(blocks)
        for block in blocks:
            self._pin_refs[block.block_id] = self._pin_refs.get(block.block_id, 0) + 1

    def unpin(self, owner_id: str) -> list[KVBlock]:
        """Drop the owner's pin (its blocks stay cached until evicted); returns the blocks."""
        blocks = self.pins.pop(owner_id, [])
        self.pool.free(list(reversed(blocks)))
        for block in blocks:
            count = self._pin_refs[block.block_id] - 1
            if count:
                self._pin_refs[block.block_id] = count
            else:
                del self._pin_refs[block.block_id]
        return blocks

    @property
    def num_pinned_blocks(self) -> int:
        """Distinct blocks held by at least one pin."""
        return len(self._pin_refs)

    def get_block_ids(self, request_id: str) -> list[int]:
        return [block.block_id for block in self.block_tables.get(request_id, [])]

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    def usage(self) -> float:
        """Fraction of blocks referenced by live requests or pins."""
        return 1.0 - self.pool.num_free_blocks / self.pool.num_blocks

    def check_integrity(self) -> None:
        """Pool invariants plus: every referenced block is owned by a table, counts agree."""
        self.pool.check_integrity()
        pin_refs: dict[int, int] = {}
        for blocks in self.pins.values():
            for block in blocks:
                pin_refs[block.block_id] = pin_refs.get(block.block_id, 0) + 1
        assert pin_refs == self._pin_refs, "pinned block counts drifted"
        owners: dict[int, int] = {}
        for table in (*self.block_tables.values(), *self.pins.values()):
            for block in table:
                owners[block.block_id] = owners.get(block.block_id, 0) + 1
        for block in self.pool.blocks:
            assert block.ref_cnt == owners.get(block.block_id, 0), (
                f"{block} has ref_cnt {block.ref_cnt} but {owners.get(block.block_id, 0)} owners"
            )
