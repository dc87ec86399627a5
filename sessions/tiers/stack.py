"""A stack of KV tiers, fastest first, used as one store (e.g. host memory over Redis)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from engine.block_pool import BlockHash
from engine.kv_store import KVStore
from sessions.tiers.base import KVTier, check_load_args, logger


class TieredKVStore(KVTier):
    """Tiers in order, fastest first (e.g. host, then Redis).

    - lookup: leading blocks held by any tier.
    - load: each block from the first tier that holds it, in runs of consecutive blocks with
      the same source (one call per run); a run whose tier fails is retried on the tiers below.
      Blocks loaded from a lower tier are promoted (saved) into every tier above it. None if
      any block cannot be loaded.
    - save: write-through to every tier. The lower tiers are the durable ones (Redis outlives
      this process and serves other servers), so they must receive every block the upper ones
      do; each tier's save is best effort and drops what it cannot keep.
    """

    def __init__(self, tiers: Sequence[KVStore]) -> None:
        if not tiers:
            raise ValueError("TieredKVStore needs at least one tier")
        self.tiers = list(tiers)
        self._num_promoted = 0

    @property
    def num_promoted_blocks(self) -> int:
        """Blocks copied up into a faster tier by ``load`` so far."""
        return self._num_promoted

    def contains(self, block_hashes: Sequence[BlockHash]) -> list[bool]:
        return [source is not None for source in self._sources(block_hashes)]

    def load(
        self, block_hashes: Sequence[BlockHash], token_ids: Sequence[Sequence[int]]
    ) -> torch.Tensor | None:
        return self.load_with_sources(block_hashes, token_ids)[0]

    def load_with_sources(
        self, block_hashes: Sequence[BlockHash], token_ids: Sequence[Sequence[int]]
    ) -> tuple[torch.Tensor | None, dict[str, int]]:
        """``load``, plus the blocks each tier served, by ``tier_name``."""
        check_load_args(block_hashes, token_ids)
        sources = self._sources(block_hashes)
        if not sources or None in sources:
            return None, {}
        parts = []
        served: dict[str, int] = {}
        for tier_idx, start, end in _runs(sources):
            loaded = self._load_run(tier_idx, block_hashes[start:end], token_ids[start:end])
            if loaded is None:
                return None, {}
            part, source_idx = loaded
            parts.append(part)
            name = self.tiers[source_idx].tier_name
            served[name] = served.get(name, 0) + end - start
        if len(parts) == 1:
            return parts[0], served
        if any(p.dtype != parts[0].dtype or p.shape[3:] != parts[0].shape[3:] for p in parts):
            logger.warning("KV tiers returned blocks of different dtype or shape; not loaded")
            return None, {}
        return torch.cat(parts, dim=2), served

    def save(
        self,
        block_hashes: Sequence[BlockHash],
        token_ids: Sequence[Sequence[int]],
        staged: torch.Tensor,
    ) -> None:
        for tier in self.tiers:
            tier.save(block_hashes, token_ids, staged)

    def _sources(self, block_hashes: Sequence[BlockHash]) -> list[int | None]:
        """For each block, the index of the first tier that holds it; each tier is asked
        only about the blocks the tiers above it lack."""
        sources: list[int | None] = [None] * len(block_hashes)
        missing = list(range(len(block_hashes)))
        for tier_idx, tier in enumerate(self.tiers):
            if not missing:
                break
            present = tier.contains([block_hashes[i] for i in missing])
            for block_idx, is_present in zip(missing, present, strict=True):
                if is_present:
                    sources[block_idx] = tier_idx
            missing = [i for i in missing if sources[i] is None]
        return sources

    def _load_run(
        self,
        tier_idx: int,
        block_hashes: Sequence[BlockHash],
        token_ids: Sequence[Sequence[int]],
    ) -> tuple[torch.Tensor, int] | None:
        """The run's blocks and the index of the tier that served them, or None."""
        for source_idx in range(tier_idx, len(self.tiers)):
            part = self.tiers[source_idx].load(block_hashes, token_ids)
            if part is None:
                continue
            for upper in self.tiers[:source_idx]:
                upper.save(block_hashes, token_ids, part)
            self._num_promoted += len(block_hashes) if source_idx else 0
            return part, source_idx
        return None


def _runs(sources: Sequence[int | None]) -> Iterator[tuple[int, int, int]]:
    """Maximal runs ``(source, start, end)`` of equal consecutive sources."""
    start = 0
    for end in range(1, len(sources) + 1):
        if end == len(sources) or sources[end] != sources[start]:
            source = sources[start]
            assert source is not None
            yield source, start, end
            start = end
