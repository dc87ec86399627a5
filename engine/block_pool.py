"""The physical KV block pool: ref counts, the LRU free queue and the prefix-cache index.

Pure bookkeeping: no torch. A block is a ``block_size``-token slice of the KV tensors owned by
the model runner; here it is only an id with a ref count and, once full, a content hash.

Life of a block::

    free (never used) --allocate--> in use (ref_cnt >= 1) --free--> cached & free (ref_cnt 0,
    still indexed by hash, reusable by a prefix hit) --allocate (evicted)--> in use, new content

Free blocks sit in one queue ordered by the time they were freed: ``allocate`` takes from the
head (least recently freed first), ``free`` appends to the tail. A prefix hit on a free cached
block ("touch") pulls it out of the queue from anywhere in O(1).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import NewType

BlockHash = NewType("BlockHash", bytes)


@dataclass(slots=True, eq=False)
class KVBlock:
    """One physical block. ``token_ids`` is kept for full cached blocks (collision guard)."""

    block_id: int
    ref_cnt: int = 0
    block_hash: BlockHash | None = None
    token_ids: tuple[int, ...] | None = None
    prev_free: KVBlock | None = None
    next_free: KVBlock | None = None

    def __repr__(self) -> str:
        return (
            f"KVBlock(id={self.block_id}, ref={self.ref_cnt}, cached={self.block_hash is not None})"
        )


class FreeBlockQueue:
    """Doubly-linked queue of free blocks with O(1) popleft, append and remove-from-middle."""

    def __init__(self, blocks: Sequence[KVBlock]) -> None:
        self._head = KVBlock(block_id=-1)  # sentinels: never handed out
        self._tail = KVBlock(block_id=-1)
        self._head.next_free = self._tail
        self._tail.prev_free = self._head
        self.num_free_blocks = 0
        for block in blocks:
            self.append(block)

    def popleft(self) -> KVBlock:
        """Remove and return the least recently freed block. Raises IndexError when empty."""
        first = self._head.next_free
        if first is None or first is self._tail:
            raise IndexError("no free blocks")
        self.remove(first)
        return first

    def remove(self, block: KVBlock) -> None:
        prev_block, next_block = block.prev_free, block.next_free
        if prev_block is None or next_block is None:
            raise ValueError(f"{block} is not in the free queue")
        prev_block.next_free = next_block
        next_block.prev_free = prev_block
        block.prev_free = block.next_free = None
        self.num_free_blocks -= 1

    def append(self, block: KVBlock) -> None:
        last = self._tail.prev_free
        assert last is not None
        last.next_free = block
        block.prev_free = last
        block.next_free = self._tail
        self._tail.prev_free = block
        self.num_free_blocks += 1

    def __iter__(self) -> Iterator[KVBlock]:
        block = self._head.next_free
        while block is not None and block is not self._tail:
            yield block
            block = block.next_free

    def __len__(self) -> int:
        return self.num_free_blocks


class BlockPool:
    """Owns every block of the pool.

    Contract: a block with ``ref_cnt > 0`` is never handed out again and never evicted; a block
    with ``ref_cnt == 0`` is in the free queue, and may still serve prefix hits until
    ``allocate`` evicts it. ``lookup`` returns a block only when both hash and tokens match.
    """

    def __init__(
        self,
        num_blocks: int,
        enable_prefix_caching: bool = True,
        on_evict: Callable[[KVBlock], None] | None = None,
    ) -> None:
        """``on_evict(block)`` is called when ``allocate`` is about to reuse a cached block,
        while the block still carries its hash and tokens (and its KV is still intact: the
        caller has not yet written the new content)."""
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [KVBlock(block_id=i) for i in range(num_blocks)]
        self.free_queue = FreeBlockQueue(self.blocks)
        self.cached_blocks: dict[BlockHash, KVBlock] = {}
        self.num_evictions = 0
        self.on_evict = on_evict
        # Free blocks that still hold a hashed, reusable block (kept so stats cost O(1)).
        self.num_cached_free_blocks = 0

    @property
    def num_free_blocks(self) -> int:
        return self.free_queue.num_free_blocks

    def allocate(self, num_blocks: int) -> list[KVBlock] | None:
        """Take ``num_blocks`` blocks (ref_cnt 1 each), evicting cached ones; None if too few."""
        if num_blocks > self.num_free_blocks:
            return None
        taken = []
        for _ in range(num_blocks):
            block = self.free_queue.popleft()
            if self.on_evict is not None and block.block_hash is not None:
                self.on_evict(block)
            self._evict(block)
            block.ref_cnt = 1
            taken.append(block)
        return taken

    def touch(self, blocks: Sequence[KVBlock]) -> None:
        """Add a reference to blocks found by ``lookup`` (pulling free ones out of the queue)."""
        for block in blocks:
            if block.ref_cnt == 0:
                self.free_queue.remove(block)
                if block.block_hash is not None:
                    self.num_cached_free_blocks -= 1
            block.ref_cnt += 1

    def free(self, blocks: Sequence[KVBlock]) -> None:
        """Drop one reference per block, in the given order; unreferenced blocks join the
        tail of the free queue (so pass a sequence's blocks tail-first to evict tails first)."""
        for block in blocks:
            if block.ref_cnt <= 0:
                raise ValueError(f"double free of {block}")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self.free_queue.append(block)
                if block.block_hash is not None:
                    self.num_cached_free_blocks += 1

    def lookup(self, block_hash: BlockHash, token_ids: Sequence[int]) -> KVBlock | None:
        """The cached block with this hash whose stored tokens equal ``token_ids``, or None."""
        block = self.cached_blocks.get(block_hash)
        if block is None or block.token_ids != tuple(token_ids):
            return None
        return block

    def is_cached(self, block_hash: BlockHash) -> bool:
        """Whether a block with this hash is cached (no token check: for statistics only)."""
        return block_hash in self.cached_blocks

    def cache_block(self, block: KVBlock, block_hash: BlockHash, token_ids: Sequence[int]) -> None:
        """Index a full, computed block by its content hash.

        If another block already holds this hash (two sequences computed the same content
        concurrently), the existing entry wins and ``block`` stays uncached.
        """
        if not self.enable_prefix_caching or block.block_hash is not None:
            return
        if block_hash in self.cached_blocks:
            return
        block.block_hash = block_hash
        block.token_ids = tuple(token_ids)
        self.cached_blocks[block_hash] = block
        if block.ref_cnt == 0:
            self.num_cached_free_blocks += 1

    def _evict(self, block: KVBlock) -> None:
        if block.block_hash is None:
            return
        if block.ref_cnt == 0:
            self.num_cached_free_blocks -= 1
        if self.cached_blocks.get(block.block_hash) is block:
            del self.cached_blocks[block.block_hash]
        block.block_hash = None
        block.token_ids = None
        self.num_evictions += 1

    def reset_prefix_cache(self) -> None:
        """Forget every cached hash of unreferenced blocks (used blocks keep theirs). This is
        not an eviction: ``on_evict`` is not called."""
        for block in list(self.free_queue):
            self._evict(block)

    def check_integrity(self) -> None:
        """Assert the pool's invariants; raises AssertionError naming the broken one."""
        in_queue = {id(block) for block in self.free_queue}
        assert len(in_queue) == self.num_free_blocks, "free queue count drifted"
        for block in self.blocks:
            assert block.ref_cnt >= 0, f"negative ref count on {block}"
            assert (block.ref_cnt == 0) == (id(block) in in_queue), f"{block} queue membership"
            if block.block_hash is not None:
                assert block.token_ids is not None, f"{block} cached without tokens"
        num_cached_free = sum(1 for b in self.blocks if b.ref_cnt == 0 and b.block_hash is not None)
        assert num_cached_free == self.num_cached_free_blocks, "cached free block count drifted"
        for block_hash, block in self.cached_blocks.items():
            assert block.block_hash == block_hash, f"{block} indexed under a stale hash"
