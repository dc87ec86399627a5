"""The host side of padded decode steps: buckets and the fixed-shape input arrays."""

from __future__ import annotations

import numpy as np
import pytest

from engine.decode_inputs import (
    PAD_SLOT,
    DecodeHostBuffers,
    blocks_needed,
    bucket_for,
    decode_buckets,
    fill_decode_inputs,
    is_pure_decode,
)
from engine.step_inputs import SeqChunk


def host_buffers(max_num_seqs: int, width: int) -> DecodeHostBuffers:
    return DecodeHostBuffers(
        longs=np.full((3, max_num_seqs), 77, np.int64),  # 77: stale values from a past step
        seq_lens=np.full(max_num_seqs, 77, np.int32),
        block_tables=np.full((max_num_seqs, width), 77, np.int32),
    )


def test_buckets_are_powers_of_two_then_steps_of_8_then_16():
    assert decode_buckets(1) == [1]
    assert decode_buckets(5) == [1, 2, 4, 5]
    assert decode_buckets(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert decode_buckets(100) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 100]
    with pytest.raises(ValueError):
        decode_buckets(0)


def test_bucket_for_picks_the_smallest_that_holds():
    buckets = decode_buckets(64)
    assert [bucket_for(buckets, n) for n in (1, 2, 3, 5, 8, 9, 33, 64)] == [
        1, 2, 4, 8, 8, 16, 40, 64
    ]  # fmt: skip
    assert bucket_for(buckets, 65) is None


def test_pure_decode_needs_one_token_with_logits_per_chunk():
    decode = SeqChunk([5], 9, [0], True)
    assert is_pure_decode([decode, decode])
    assert not is_pure_decode([decode, SeqChunk([5, 6], 9, [0], True)])  # a prefill piece
    assert not is_pure_decode([SeqChunk([5], 9, [0], False)])  # last token of a chunked prefill


def test_fill_writes_real_lanes_and_pads_up_to_the_bucket():
    block_size = 4
    chunks = [
        SeqChunk([11], 0, [7], True),  # position 0 in block 7
        SeqChunk([12], 5, [3, 9], True),  # position 5: block 9, offset 1
        SeqChunk([13], 8, [1, 2, 6, 8], True),  # position 8: third block (6), offset 0
    ]
    buffers = host_buffers(max_num_seqs=8, width=4)
    num_blocks = fill_decode_inputs(chunks, block_size, bucket=4, buffers=buffers)
    assert num_blocks == 3 == blocks_needed(chunks, block_size)
    assert buffers.longs[:, :4].tolist() == [
        [11, 12, 13, 0],
        [0, 5, 8, 0],
        [7 * 4 + 0, 9 * 4 + 1, 6 * 4 + 0, PAD_SLOT],
    ]
    assert buffers.seq_lens[:4].tolist() == [1, 6, 9, 0]
    # Only the blocks up to the new token's are written; nothing reads the rest.
    assert buffers.block_tables[0, :1].tolist() == [7]
    assert buffers.block_tables[1, :2].tolist() == [3, 9]
    assert buffers.block_tables[2, :3].tolist() == [1, 2, 6]
    # Lanes past the bucket keep stale values: no forward of this bucket reads them.
    assert buffers.longs[:, 4:].tolist() == [[77] * 4] * 3
    assert buffers.seq_lens[4:].tolist() == [77] * 4
