"""Pack one step's scheduled chunks into the flat host arrays the model and kernels take.

Pure bookkeeping: numpy, no torch. Everything is built with a few vectorised numpy calls per
step (no per-token Python, no small tensors), so the model runner can move it to the device in
two copies. Names match the kernel arguments (see ``kernels.reference``)::

    chunks       A: positions 5..7 (3 new tokens)    B: position 9 (1 new token, decode)
    input_ids    [a5 a6 a7 | b9]
    positions    [ 5  6  7 |  9]
    query_start_loc [0, 3, 4]        seq_lens [8, 10]
    slot_mapping  block_tables[seq, pos // block_size] * block_size + pos % block_size
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import numpy as np


class SeqChunk(NamedTuple):
    """The tokens of one sequence computed in this step."""

    token_ids: list[int]  # the new tokens
    start_pos: int  # absolute position of token_ids[0] (= tokens already in the pool)
    block_ids: list[int]  # the sequence's block table (covers start_pos + len(token_ids))
    needs_logits: bool  # True when the last new token's next-token logits are wanted
    # With needs_logits: how many of the last new tokens' logits are wanted (a speculative
    # step verifies every draft: the sampled token and its drafts all need theirs).
    num_logits: int = 1


class HostBatch(NamedTuple):
    """A packed step on the host."""

    input_ids: np.ndarray  # [num_tokens] int64
    positions: np.ndarray  # [num_tokens] int64
    slot_mapping: np.ndarray  # [num_tokens] int64
    logits_indices: np.ndarray  # [num_wanted] int64: rows whose next-token logits are wanted,
    # in token order (a chunk's last num_logits rows)
    query_start_loc: np.ndarray  # [num_seqs + 1] int32
    seq_lens: np.ndarray  # [num_seqs] int32
    block_tables: np.ndarray  # [num_seqs, max_blocks_per_seq] int32, zero-padded

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])


def pack_chunks(chunks: list[SeqChunk], block_size: int) -> HostBatch:
    """Pack ``chunks`` (at least one) in order. Each chunk's block table must cover its
    ``start_pos + len(token_ids)`` tokens."""
    num_seqs = len(chunks)
    q_lens = np.fromiter((len(c.token_ids) for c in chunks), np.int64, num_seqs)
    start_pos = np.fromiter((c.start_pos for c in chunks), np.int64, num_seqs)
    query_start_loc = np.zeros(num_seqs + 1, np.int64)
    np.cumsum(q_lens, out=query_start_loc[1:])
    num_tokens = int(query_start_loc[-1])
    input_ids = np.fromiter(
        itertools.chain.from_iterable(c.token_ids for c in chunks), np.int64, num_tokens
    )
    # Token i of chunk s sits at start_pos[s] + (i - query_start_loc[s]).
    positions = np.arange(num_tokens) + np.repeat(start_pos - query_start_loc[:-1], q_lens)
    block_tables = _block_tables(chunks)
    seq_of_token = np.repeat(np.arange(num_seqs), q_lens)
    slot_mapping = (
        block_tables[seq_of_token, positions // block_size].astype(np.int64) * block_size
        + positions % block_size
    )
    return HostBatch(
        input_ids=input_ids,
        positions=positions,
        slot_mapping=slot_mapping,
        logits_indices=_logits_indices(chunks, query_start_loc),
        query_start_loc=query_start_loc.astype(np.int32),
        seq_lens=(start_pos + q_lens).astype(np.int32),
        block_tables=block_tables,
    )


def _logits_indices(
    chunks: list[SeqChunk],
    query_start_loc: np.ndarray,  # [num_seqs + 1] int64
) -> np.ndarray:  # [num_wanted] int64
    """The last ``num_logits`` rows of each chunk that ``needs_logits``, in order."""
    counts = np.fromiter(
        (min(c.num_logits, len(c.token_ids)) if c.needs_logits else 0 for c in chunks),
        np.int64,
        len(chunks),
    )
    ends = query_start_loc[1:]
    if not counts.any() or counts.max() == 1:
        return ends[counts == 1] - 1
    first_of_each = np.cumsum(counts) - counts  # of each chunk's rows, among the wanted ones
    within = np.arange(int(counts.sum())) - np.repeat(first_of_each, counts)
    return np.repeat(ends - counts, counts) + within


def _block_tables(chunks: list[SeqChunk]) -> np.ndarray:  # [num_seqs, max_blocks] int32
    max_blocks = max(len(c.block_ids) for c in chunks)
    block_tables = np.zeros((len(chunks), max_blocks), np.int32)
    for seq_idx, chunk in enumerate(chunks):
        block_tables[seq_idx, : len(chunk.block_ids)] = chunk.block_ids
    return block_tables
