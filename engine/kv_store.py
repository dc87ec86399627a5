"""The interface between the engine and KV tiers below the device pool (host memory, Redis).

The engine only knows this interface; ``sessions.tiers`` implements it. Blocks are addressed
by their chained content hash (which already mixes in the model fingerprint and tenant salt),
so identical prefixes are stored once per tier and can be shared across sessions and servers.

A staged tensor holds ``n`` whole blocks of every layer, on the CPU::

    staged: [num_layers, 2, n, block_size, num_kv_heads, head_dim]   (2 = key, value)

Any block may vanish from a tier at any time: the engine then recomputes. A tier must never
return a block whose stored tokens, fingerprint, layout, dtype or checksum do not match.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

import torch

from engine.block_pool import BlockHash


class KVStore(ABC):
    """A content-addressed store of KV blocks below the device pool.

    ``tier_name`` names the tier in metrics and health (``host``, ``redis``); a stack of
    tiers reports its members' names through ``load_with_sources``.
    """

    tier_name: ClassVar[str] = "store"

    @abstractmethod
    def lookup(self, block_hashes: Sequence[BlockHash]) -> int:
        """How many of the leading ``block_hashes`` this store (probably) holds.

        May over-report (a block can vanish between lookup and load); ``load`` is the truth.
        """

    def contains(self, block_hashes: Sequence[BlockHash]) -> list[bool]:
        """For each hash, whether this store probably holds it (``load`` is the truth).
        Stores that can answer for many blocks at once override this."""
        return [self.lookup([block_hash]) == 1 for block_hash in block_hashes]

    @abstractmethod
    def load(
        self, block_hashes: Sequence[BlockHash], token_ids: Sequence[Sequence[int]]
    ) -> torch.Tensor | None:
        """The staged tensor for exactly these blocks, or None if any is missing or invalid
        (wrong tokens, foreign fingerprint/layout/dtype, bad checksum, truncated): invalid
        entries are discarded and logged, never returned."""

    def load_with_sources(
        self, block_hashes: Sequence[BlockHash], token_ids: Sequence[Sequence[int]]
    ) -> tuple[torch.Tensor | None, dict[str, int]]:
        """``load``, plus how many of the blocks each tier served (``{tier_name: blocks}``,
        empty when nothing was loaded). Stacks of tiers override this."""
        staged = self.load(block_hashes, token_ids)
        return staged, ({self.tier_name: len(block_hashes)} if staged is not None else {})

    @abstractmethod
    def save(
        self,
        block_hashes: Sequence[BlockHash],
        token_ids: Sequence[Sequence[int]],
        staged: torch.Tensor,
    ) -> None:
        """Store blocks (``staged[:, :, i]`` is block ``i``); blocks already held are skipped.

        Best effort: a full or unavailable tier drops what it cannot keep.
        """
