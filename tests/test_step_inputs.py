"""Packing a step's chunks into flat host arrays, against a per-token reference."""

from __future__ import annotations

from engine.step_inputs import SeqChunk, pack_chunks


def test_pack_chunks_matches_a_per_token_reference():
    block_size = 4
    chunks = [
        SeqChunk([11, 12, 13], start_pos=5, block_ids=[7, 2], needs_logits=True),  # cached prefix
        SeqChunk([21], start_pos=9, block_ids=[0, 3, 5], needs_logits=True),  # decode
        SeqChunk([31, 32, 33, 34, 35], start_pos=0, block_ids=[1, 4], needs_logits=False),
        SeqChunk([41], start_pos=0, block_ids=[6], needs_logits=True),  # first token
    ]
    host = pack_chunks(chunks, block_size)
    expected_slots, expected_positions = [], []
    for chunk in chunks:
        for pos in range(chunk.start_pos, chunk.start_pos + len(chunk.token_ids)):
            expected_positions.append(pos)
            expected_slots.append(
                chunk.block_ids[pos // block_size] * block_size + pos % block_size
            )
    assert host.num_tokens == 10
    assert host.input_ids.tolist() == [11, 12, 13, 21, 31, 32, 33, 34, 35, 41]
    assert host.positions.tolist() == expected_positions
    assert host.slot_mapping.tolist() == expected_slots
    assert host.query_start_loc.tolist() == [0, 3, 4, 9, 10]
    assert host.seq_lens.tolist() == [8, 10, 5, 1]
    assert host.block_tables.tolist() == [[7, 2, 0], [0, 3, 5], [1, 4, 0], [6, 0, 0]]
    assert host.logits_indices.tolist() == [2, 3, 9]  # the third chunk's logits are not wanted
    assert host.slot_mapping.dtype.name == "int64" and host.block_tables.dtype.name == "int32"
