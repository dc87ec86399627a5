"""What every KV tier shares: the ``KVTier`` base, its counters and the argument checks.

Tiers log under ``sessions.tiers``, one logger for all of them (see ``sessions.tiers``).
"""

from __future__ import annotations

import logging
from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from engine.block_pool import BlockHash
from engine.kv_store import KVStore

logger = logging.getLogger("sessions.tiers")


@dataclass(slots=True)
class KVTierStats:
    """Counters of one tier, in blocks unless named otherwise."""

    hits: int = 0  # blocks returned by load
    misses: int = 0  # blocks requested by loads that returned None
    invalid: int = 0  # stored blocks discarded because they failed verification
    evictions: int = 0  # blocks evicted to respect the capacity / byte budget
    bytes_used: int = 0  # host: bytes held; Redis: the shards' budget counters, as last seen
    errors: int = 0  # Redis: calls that failed (connection, timeout, error replies)
    bytes_written: int = 0  # block bytes this process stored (new blocks only) since start


class KVTier(KVStore):
    """A KVStore that can also say block by block what it (probably) holds."""

    @abstractmethod
    def contains(self, block_hashes: Sequence[BlockHash]) -> list[bool]:
        """For each hash, whether this tier probably holds it (``load`` is the truth)."""

    def lookup(self, block_hashes: Sequence[BlockHash]) -> int:
        present = self.contains(block_hashes)
        return present.index(False) if False in present else len(present)


# Argument checks shared by the tiers (caller bugs raise ValueError)


def check_load_args(block_hashes: Sequence[BlockHash], token_ids: Sequence[Sequence[int]]) -> None:
    if len(block_hashes) != len(token_ids):
        raise ValueError(f"{len(block_hashes)} block hashes but {len(token_ids)} token lists")


def check_save_args(
    block_hashes: Sequence[BlockHash], token_ids: Sequence[Sequence[int]], staged: torch.Tensor
) -> None:
    check_load_args(block_hashes, token_ids)
    if staged.dim() != 6 or staged.shape[1] != 2 or staged.device.type != "cpu":
        raise ValueError(
            f"staged must be a CPU tensor [layers, 2, n, block_size, kv_heads, head_dim], "
            f"got {tuple(staged.shape)} on {staged.device}"
        )
    if staged.shape[2] != len(block_hashes):
        raise ValueError(f"staged holds {staged.shape[2]} blocks, {len(block_hashes)} hashes")
    block_size = staged.shape[3]
    if any(len(tokens) != block_size for tokens in token_ids):
        raise ValueError(f"every block must have {block_size} token ids")


# Staged tensors [layers, 2, n, block_size, kv_heads, head_dim] and the blocks they hold


def block_shape_of(staged: torch.Tensor) -> tuple[int, ...]:
    """The shape of one block of ``staged``: [layers, 2, block_size, kv_heads, head_dim]."""
    return (*staged.shape[:2], *staged.shape[3:])


def empty_staged(
    block_shape: Sequence[int], dtype: torch.dtype, num_blocks: int, pin_memory: bool
) -> torch.Tensor:
    """An uninitialised staged tensor for ``num_blocks`` blocks of ``block_shape``."""
    shape = (*block_shape[:2], num_blocks, *block_shape[2:])
    return torch.empty(shape, dtype=dtype, pin_memory=pin_memory)
