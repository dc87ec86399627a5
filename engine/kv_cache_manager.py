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
        self.num_prefix_queries = 0
        self.num_prefix_hits = 0  # tokens served by the prefix cache

    # -- lookups -----------------------------------------------------------------------------

    def _extra(self, request: Request) -> bytes:
        return self.hash_extra + b"\x00salt:" + request.cache_salt.encode()

    def block_hashes(self, request: Request) -> list[BlockHash]:
        """Hashes of every full block of the request's tokens (memoised per request)."""
        known = self._block_hashes.get(request.request_id, [])
        hashes = hash_full_blocks(
            request.all_token_ids, self.block_size, self._extra(request), known
        )
        self._block_hashes[request.request_id] = hashes
        return hashes

    def get_computed_blocks(self, request: Request) -> tuple[list[KVBlock], int]:
        """The longest cached prefix of the request, as (blocks, num_tokens).

        At most ``num_tokens - 1`` tokens are ever reused: the last token is recomputed because
        its logits are needed.
        """
        if not self.enable_prefix_caching:
            return [], 0
        max_blocks = (request.num_tokens - 1) // self.block_size
        hashes = self.block_hashes(request)[:max_blocks]
        found: list[KVBlock] = []
        for block_idx, block_hash in enumerate(hashes):
            start = block_idx * self.block_size
            block = self.pool.lookup(
                block_hash, request.all_token_ids[start : start + self.block_size]
            )
            if block is None:
                break
            found.append(block)
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

    def get_block_ids(self, request_id: str) -> list[int]:
        return [block.block_id for block in self.block_tables.get(request_id, [])]

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    def usage(self) -> float:
        """Fraction of blocks referenced by live requests."""
        return 1.0 - self.pool.num_free_blocks / self.pool.num_blocks

    def check_integrity(self) -> None:
        """Pool invariants plus: every referenced block is owned by a table, counts agree."""
        self.pool.check_integrity()
        owners: dict[int, int] = {}
        for table in self.block_tables.values():
            for block in table:
                owners[block.block_id] = owners.get(block.block_id, 0) + 1
        for block in self.pool.blocks:
            assert block.ref_cnt == owners.get(block.block_id, 0), (
                f"{block} has ref_cnt {block.ref_cnt} but {owners.get(block.block_id, 0)} owners"
            )
