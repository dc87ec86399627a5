"""Host side of the graph-safe decode step: batch-size buckets and padded, fixed-shape inputs.

Pure bookkeeping: numpy, no torch. A pure-decode step (every scheduled sequence computes one
token) is padded up to a *bucket* of a few fixed sizes, so the device side can run one
pre-planned (on CUDA: pre-captured) forward per bucket. The inputs live in preallocated arrays
sized for the largest bucket, filled in place every step::

    bucket 4, 3 real sequences          lane:   0    1    2  | 3 (padding)
    input_ids       [3, max_num_seqs]  row 0:  a9   b4   c30 |  0
    positions                          row 1:   9    4   30  |  0
    slot_mapping                       row 2:  s0   s1   s2  | -1   (-1: the KV store skips it)
    seq_lens        [max_num_seqs]             10    5   31  |  0   (0: attends to nothing)
    block_tables    [max_num_seqs, max_blocks_per_seq]  rows 0..2 hold each sequence's blocks

Lanes past the bucket keep whatever an earlier step left there: nothing reads them. Columns of
a block-table row past the sequence's last needed block are never read either.
"""

from __future__ import annotations

import bisect
from typing import NamedTuple

import numpy as np

from engine.step_inputs import SeqChunk

PAD_SLOT = -1  # slot_mapping value of a padded lane: the KV store skips it
SMALL_BUCKETS = (1, 2, 4)
FINE_STEP, FINE_LIMIT, COARSE_STEP = 8, 64, 16  # every 8 up to 64, then every 16


def decode_buckets(max_num_seqs: int) -> list[int]:
    """Padded batch sizes: 1, 2, 4, then every 8 up to 64, then every 16; the last one is
    ``max_num_seqs`` itself, so every batch the scheduler can form has a bucket."""
    if max_num_seqs <= 0:
        raise ValueError(f"max_num_seqs must be positive, got {max_num_seqs}")
    sizes = [*SMALL_BUCKETS, *range(FINE_STEP, FINE_LIMIT + 1, FINE_STEP)]
    sizes += range(FINE_LIMIT + COARSE_STEP, max_num_seqs, COARSE_STEP)
    return [size for size in sizes if size < max_num_seqs] + [max_num_seqs]


def bucket_for(buckets: list[int], num_seqs: int) -> int | None:
    """The smallest bucket holding ``num_seqs`` sequences; None if even the largest is too
    small. ``buckets`` is increasing (as ``decode_buckets`` returns it)."""
    idx = bisect.bisect_left(buckets, num_seqs)
    return buckets[idx] if idx < len(buckets) else None


def is_pure_decode(chunks: list[SeqChunk]) -> bool:
    """Every chunk computes exactly one token and wants its logits (no prefill piece)."""
    return all(len(chunk.token_ids) == 1 and chunk.needs_logits for chunk in chunks)


class DecodeHostBuffers(NamedTuple):
    """The decode step's inputs on the host, sized for the largest bucket; filled in place."""

    longs: np.ndarray  # [3, max_num_seqs] int64: rows input_ids, positions, slot_mapping
    seq_lens: np.ndarray  # [max_num_seqs] int32
    block_tables: np.ndarray  # [max_num_seqs, max_blocks_per_seq] int32

    @property
    def max_blocks_per_seq(self) -> int:
        return int(self.block_tables.shape[1])


def fill_decode_inputs(
    chunks: list[SeqChunk], block_size: int, bucket: int, buffers: DecodeHostBuffers
) -> int:
    """Write the one-token ``chunks`` into lanes ``0 .. len(chunks) - 1`` of ``buffers`` and
    padding into lanes up to ``bucket``; return the most blocks any sequence needs.

    Preconditions (``DecodeRunner.fits`` checks them): ``is_pure_decode(chunks)``,
    ``1 <= len(chunks) <= bucket`` and no sequence needs more than ``max_blocks_per_seq`` blocks.
    """
    num_seqs = len(chunks)
    positions = np.fromiter((chunk.start_pos for chunk in chunks), np.int64, num_seqs)
    num_blocks = positions // block_size + 1  # blocks up to and including the new token's
    block_tables = buffers.block_tables
    for seq_idx, chunk in enumerate(chunks):
        needed = int(num_blocks[seq_idx])
        block_tables[seq_idx, :needed] = chunk.block_ids[:needed]
    longs = buffers.longs
    longs[0, :num_seqs] = [chunk.token_ids[0] for chunk in chunks]
    longs[1, :num_seqs] = positions
    last_block = block_tables[np.arange(num_seqs), num_blocks - 1].astype(np.int64)
    longs[2, :num_seqs] = last_block * block_size + positions % block_size
    buffers.seq_lens[:num_seqs] = positions + 1
    longs[:2, num_seqs:bucket] = 0
    longs[2, num_seqs:bucket] = PAD_SLOT
    buffers.seq_lens[num_seqs:bucket] = 0
    return int(num_blocks.max())


def blocks_needed(chunks: list[SeqChunk], block_size: int) -> int:
    """The most blocks any one-token chunk's sequence needs (its new token included)."""
    return max(chunk.start_pos for chunk in chunks) // block_size + 1
