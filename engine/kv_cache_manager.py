"""Per-request block tables on top of the block pool, with prefix-cache lookups.

Pure bookkeeping: no torch. The manager knows which physical blocks hold each request's tokens
and which of those blocks are full and hashed (shareable). It never touches KV tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from engine.block_hash import hash_full_blocks
from engine.block_pool import BlockHash, BlockPool, KVBlock
from engine.request import Request
from kernels.units import cdiv


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
        self.num_prefix_queries = 0  # prompt tokens looked up at admission
        self.num_prefix_hits = 0  # of which served by the prefix cache

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
        num_needed = self.num_blocks_for(num_computed + num_new_tokens)
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

    # -- references held outside block tables (pins, blocks being restored) -------------------

    def hold(self, blocks: Sequence[KVBlock]) -> None:
        """Add one reference to each of ``blocks`` (found by ``cached_prefix``), so the pool
        cannot evict them until ``release``. The holder must report its blocks to
        ``check_integrity``."""
        self.pool.touch(blocks)

    def release(self, blocks: Sequence[KVBlock]) -> None:
        """Drop the references ``hold`` (or ``import_blocks``) took, tail first: blocks stay
        cached until evicted, the tail of a sequence before its prefix."""
        self.pool.free(list(reversed(blocks)))

    def import_blocks(
        self, block_hashes: Sequence[BlockHash], token_ids: Sequence[Sequence[int]]
    ) -> list[KVBlock]:
        """Allocate one block per hash and index it as cached under that hash and its tokens
        (the caller writes the KV into them before any step reads them). The blocks are held
        (one reference each) until ``release``. The caller checks ``num_free_blocks`` first;
        raises ValueError if too few blocks are free."""
        blocks = self.pool.allocate(len(block_hashes))
        if blocks is None:
            raise ValueError(f"{len(block_hashes)} blocks asked, {self.num_free_blocks} free")
        for block, block_hash, tokens in zip(blocks, block_hashes, token_ids, strict=True):
            self.pool.cache_block(block, block_hash, tokens)
        return blocks

    def allocate_held(self, num_blocks: int) -> list[KVBlock] | None:
        """Take ``num_blocks`` uncached blocks, held (one reference each) until ``release``,
        for KV that arrives later (an asynchronous restore); None if too few are free. Index
        them with ``index_blocks`` once their KV is written."""
        return self.pool.allocate(num_blocks)

    def index_blocks(
        self,
        blocks: Sequence[KVBlock],
        block_hashes: Sequence[BlockHash],
        token_ids: Sequence[Sequence[int]],
    ) -> None:
        """Index filled blocks as cached under their hashes and tokens (a hash another block
        already holds keeps that block; see ``BlockPool.cache_block``)."""
        for block, block_hash, tokens in zip(blocks, block_hashes, token_ids, strict=True):
            self.pool.cache_block(block, block_hash, tokens)

    def observe_evictions(self, on_evict: Callable[[KVBlock], None]) -> None:
        """Have ``on_evict(block)`` called whenever a cached block is about to be reused
        (see ``BlockPool``); the block's KV is intact until the step that reuses it runs."""
        self.pool.on_evict = on_evict

    def reset_prefix_cache(self) -> None:
        """Forget every cached hash of unreferenced blocks (for benchmarks and tests)."""
        self.pool.reset_prefix_cache()

    # -- queries -------------------------------------------------------------------------------

    def num_blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold ``num_tokens`` tokens."""
        return cdiv(num_tokens, self.block_size)

    def num_blocks_held(self, request_id: str) -> int:
        """Blocks in the request's table (0 for unknown ids)."""
        return len(self.block_tables.get(request_id, ()))

    def block_table(self, request_id: str) -> list[KVBlock]:
        """A copy of the request's block table (empty for unknown ids)."""
        return list(self.block_tables.get(request_id, ()))

    def get_block_ids(self, request_id: str) -> list[int]:
        return [block.block_id for block in self.block_tables.get(request_id, [])]

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    def usage(self) -> float:
        """Fraction of blocks referenced by live requests or held (pins, restores)."""
        return 1.0 - self.pool.num_free_blocks / self.pool.num_blocks

    def check_integrity(self, held: Iterable[Sequence[KVBlock]] = ()) -> None:
        """Pool invariants plus: every referenced block is owned by a table or by one of the
        ``held`` lists (each list is one reference per block), and the counts agree."""
        self.pool.check_integrity()
        owners: dict[int, int] = {}
        for table in (*self.block_tables.values(), *held):
            for block in table:
                owners[block.block_id] = owners.get(block.block_id, 0) + 1
        for block in self.pool.blocks:
            assert block.ref_cnt == owners.get(block.block_id, 0), (
                f"{block} has ref_cnt {block.ref_cnt} but {owners.get(block.block_id, 0)} owners"
            )
