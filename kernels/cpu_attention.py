"""Paged attention for CPU tensors (the engine's path when not on CUDA).

Same contract as ``kernels.reference.paged_attention_ref`` (see its docstring for shapes), but
organised for speed on a few CPU cores:

* short queries (decode, speculative verification: query length <= ``NATIVE_MAX_QUERY_LEN``)
  go, when the compiled kernel ``kernels.cpu_native`` is available (float32 and a C compiler),
  to one call for the whole batch that reads every sequence's K/V in place from its blocks,
  once for all the query's tokens: no gather, no per-sequence Python, GQA without repeated
  K/V, split over the keys when queries are few. (SmolLM2
  heads on 2 cores: see docs/BENCHMARKS.md, "CPU attention".)
* without the compiled kernel, decode rows are attended together by torch: rows of similar KV
  length form a group whose keys are gathered into one padded ``[rows, kv_heads, max_len,
  head_dim]`` tensor and go through one ``scaled_dot_product_attention`` call with a key mask.
  A row starts a new group when it is shorter than half the group's longest (padding at most
  doubles the keys gathered) or the group would exceed ``MAX_GROUP_KEYS`` padded keys. Padding
  repeats a real slot of the row's sequence, so no uninitialised cache slot is read.
* a prefill row (longer query) is one ``scaled_dot_product_attention`` call; with nothing
  cached it uses SDPA's causal kernel, otherwise an explicit bottom-right-aligned causal mask.

Everything derived from the index tensors (host lengths, slots, groups, rows, masks) is computed
once per batch by ``plan_paged_attention_cpu``; ``run_paged_attention_cpu`` is the per-layer
part. Logit soft-capping falls back to the reference implementation.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from kernels import cpu_native
from kernels.reference import paged_attention_ref

# Padded keys per decode group. Larger groups gather K/V that no longer fit in the CPU caches
# before SDPA reads them again (measured with SmolLM2-135M's heads: 16 rows x 2000 keys cost
# twice as much per row as 4 x 2000; 4096 was the best of 1024..16384 over mixed batches).
MAX_GROUP_KEYS = 4096
# Longest query of a sequence that goes to the compiled kernel (one run: its K/V is read once
# for all its tokens); longer queries are prefills for SDPA, whose matrix products win there.
# (SmolLM2-135M steps of 8 sequences x 1800 keys, bench/forward_steps.py shapes: 5-token
# queries took 365 ms through the kernel and 490 ms through SDPA.)
NATIVE_MAX_QUERY_LEN = cpu_native.MAX_RUN


class SeqSpan(NamedTuple):
    """One prefill sequence (more than one new token) of the batch."""

    q_start: int  # its first row in the packed query
    q_end: int  # one past its last row
    seq_len: int  # its KV length, new tokens included
    slots: torch.Tensor  # [seq_len] int64: the flat cache slot of each of its tokens


class DecodeGroup(NamedTuple):
    """Decode rows of similar KV length, attended in one padded call."""

    rows: torch.Tensor  # [n] int64: their rows in the packed query, increasing
    slots: torch.Tensor  # [n, max_len] int64: flat cache slot of each key (padding: a real one)
    seq_lens: torch.Tensor  # [n, 1] int64
    key_pos: torch.Tensor  # [max_len] int64: 0 .. max_len - 1
    visible: torch.Tensor  # [n, 1, 1, max_len] bool: the key exists (position < seq_len)


class CpuAttentionPlan(NamedTuple):
    """What every layer's attention of one batch needs from the index tensors, made once."""

    decode_groups: list[DecodeGroup]  # torch path: decode rows (empty when native_rows is set)
    prefills: list[SeqSpan]
    decode_only: bool  # one group holding rows 0 .. num_tokens - 1: its output is the output
    native_rows: cpu_native.NativeRows | None  # compiled path: the short queries' rows


def plan_paged_attention_cpu(
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    block_size: int,
    native: bool = False,
) -> CpuAttentionPlan:
    """Read the batch's lengths to the host, turn block tables into token slots and plan the
    short queries: with ``native`` (see ``cpu_native.supports``) as rows of the compiled kernel,
    otherwise as torch decode groups."""
    starts = np.asarray(query_start_loc.tolist(), np.int64)
    lens = np.asarray(seq_lens.tolist(), np.int64)
    q_lens = starts[1:] - starts[:-1]
    max_short = NATIVE_MAX_QUERY_LEN if native else 1
    short = (q_lens >= 1) & (q_lens <= max_short)
    long_idx = np.flatnonzero(q_lens > max_short).tolist()
    if native:
        slots = _token_slots(block_tables[long_idx], block_size)
        prefills = [
            SeqSpan(int(starts[i]), int(starts[i + 1]), int(lens[i]), slots[n, : lens[i]])
            for n, i in enumerate(long_idx)
        ]
        rows = _native_rows(block_tables, starts, lens, q_lens, short, block_size)
        return CpuAttentionPlan([], prefills, False, rows)
    slots = _token_slots(block_tables, block_size)
    prefills = [
        SeqSpan(int(starts[i]), int(starts[i + 1]), int(lens[i]), slots[i, : lens[i]])
        for i in long_idx
    ]
    decode = [(i, int(lens[i])) for i in np.flatnonzero(short).tolist()]
    groups = [_decode_group(slots, starts, members) for members in _group_by_length(decode)]
    num_tokens = int(starts[-1]) if starts.shape[0] else 0
    decode_only = not prefills and len(groups) == 1 and len(decode) == num_tokens
    return CpuAttentionPlan(groups, prefills, decode_only, None)


def _token_slots(
    block_tables: torch.Tensor,  # [n, max_blocks_per_seq] int32
    block_size: int,
) -> torch.Tensor:  # [n, max_blocks_per_seq * block_size] int64: flat cache slot of each token
    offsets = torch.arange(block_size)
    return (block_tables.long().unsqueeze(-1) * block_size + offsets).flatten(1)


def _native_rows(
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    starts: np.ndarray,  # [num_seqs + 1] query_start_loc
    lens: np.ndarray,  # [num_seqs] seq_lens
    q_lens: np.ndarray,  # [num_seqs]
    short: np.ndarray,  # [num_seqs] bool: its query goes to the kernel
    block_size: int,
) -> cpu_native.NativeRows | None:
    """One run per short query: its tokens, at the end of its sequence."""
    if not short.any():
        return None
    seqs = np.flatnonzero(short)
    return cpu_native.plan_native_rows(
        block_tables,
        starts[:-1][seqs],
        q_lens[seqs],
        seqs,
        lens[seqs],
        block_size,
        torch.get_num_threads(),
    )


def _group_by_length(decode: list[tuple[int, int]]) -> list[list[tuple[int, int]]]:
    """Split (seq_idx, seq_len) rows into groups, longest first. A row starts a new group when
    it is shorter than half the group's longest (padding at most doubles the keys) or when the
    group's padded keys would pass ``MAX_GROUP_KEYS``."""
    groups: list[list[tuple[int, int]]] = []
    for member in sorted(decode, key=lambda m: -m[1]):
        if groups:
            longest = groups[-1][0][1]
            fits = (len(groups[-1]) + 1) * longest <= MAX_GROUP_KEYS
            if fits and 2 * member[1] >= longest:
                groups[-1].append(member)
                continue
        groups.append([member])
    return groups


def _decode_group(
    slots: torch.Tensor,  # [num_seqs, max_blocks_per_seq * block_size] int64
    starts: np.ndarray,  # [num_seqs + 1] query_start_loc on the host
    members: list[tuple[int, int]],  # (seq_idx, seq_len)
) -> DecodeGroup:
    members = sorted(members)  # rows in query order
    seq_idx = torch.tensor([m[0] for m in members])
    seq_lens = torch.tensor([m[1] for m in members]).unsqueeze(1)  # [n, 1]
    max_len = max(m[1] for m in members)
    key_pos = torch.arange(max_len)
    exists = key_pos < seq_lens  # [n, max_len]
    group_slots = slots.index_select(0, seq_idx)[:, :max_len]
    return DecodeGroup(
        rows=torch.tensor([starts[m[0]] for m in members]),
        slots=torch.where(exists, group_slots, group_slots[:, :1]).contiguous(),
        seq_lens=seq_lens,
        key_pos=key_pos,
        visible=exists[:, None, None, :],
    )


def paged_attention_cpu(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    value_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    if softcap:
        return paged_attention_ref(
            query,
            key_cache,
            value_cache,
            block_tables,
            seq_lens,
            query_start_loc,
            scale,
            sliding_window,
            softcap,
        )
    native = query.dtype == key_cache.dtype and cpu_native.supports(key_cache, query.shape[1])
    plan = plan_paged_attention_cpu(
        block_tables, seq_lens, query_start_loc, key_cache.shape[1], native
    )
    return run_paged_attention_cpu(query, key_cache, value_cache, plan, scale, sliding_window)


def run_paged_attention_cpu(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim], contiguous
    value_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim], contiguous
    plan: CpuAttentionPlan,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """``paged_attention_cpu`` (no softcap) by a plan made once for the batch."""
    num_kv_heads, head_dim = key_cache.shape[2], key_cache.shape[3]
    flat_keys = key_cache.view(-1, num_kv_heads, head_dim)  # [num_slots, kv_heads, head_dim]
    flat_values = value_cache.view(-1, num_kv_heads, head_dim)
    if plan.decode_only:
        group = plan.decode_groups[0]
        return _decode_rows(query, flat_keys, flat_values, group, scale, sliding_window)
    output = torch.empty_like(query)
    if plan.native_rows is not None:
        cpu_native.run_native_rows(
            query, key_cache, value_cache, plan.native_rows, scale, sliding_window, output
        )
    for group in plan.decode_groups:
        rows = query.index_select(0, group.rows)
        out = _decode_rows(rows, flat_keys, flat_values, group, scale, sliding_window)
        output.index_copy_(0, group.rows, out)
    for span in plan.prefills:
        output[span.q_start : span.q_end] = _prefill_one(
            query[span.q_start : span.q_end],
            flat_keys.index_select(0, span.slots),
            flat_values.index_select(0, span.slots),
            span.seq_len,
            scale,
            sliding_window,
        )
    return output


def _decode_rows(
    query: torch.Tensor,  # [n, num_heads, head_dim]: the group's rows
    flat_keys: torch.Tensor,  # [num_slots, num_kv_heads, head_dim]
    flat_values: torch.Tensor,  # [num_slots, num_kv_heads, head_dim]
    group: DecodeGroup,
    scale: float,
    sliding_window: int | None,
) -> torch.Tensor:  # [n, num_heads, head_dim]
    num_rows, max_len = group.slots.shape
    kv_shape = (num_rows, max_len, flat_keys.shape[1], flat_keys.shape[2])
    index = group.slots.view(-1)
    keys = flat_keys.index_select(0, index).view(kv_shape).transpose(1, 2)  # [n, kv, L, dim]
    values = flat_values.index_select(0, index).view(kv_shape).transpose(1, 2)
    mask = group.visible
    if sliding_window is not None:  # keys at positions >= seq_len - window
        in_window = group.key_pos >= group.seq_lens - sliding_window  # [n, max_len]
        mask = mask & in_window[:, None, None, :]
    out = F.scaled_dot_product_attention(
        query.unsqueeze(2),  # [n, num_heads, 1, head_dim]
        keys,
        values,
        attn_mask=mask,
        scale=scale,
        enable_gqa=True,
    )
    return out.squeeze(2)


def _prefill_one(
    query: torch.Tensor,  # [q_len, num_heads, head_dim]
    keys: torch.Tensor,  # [seq_len, num_kv_heads, head_dim]
    values: torch.Tensor,  # [seq_len, num_kv_heads, head_dim]
    seq_len: int,
    scale: float,
    sliding_window: int | None,
) -> torch.Tensor:  # [q_len, num_heads, head_dim]
    q_len = query.shape[0]
    mask = None
    plain_causal = q_len == seq_len and (sliding_window is None or sliding_window >= seq_len)
    if not plain_causal:
        q_pos = torch.arange(seq_len - q_len, seq_len).unsqueeze(1)
        k_pos = torch.arange(seq_len).unsqueeze(0)
        mask = k_pos <= q_pos
        if sliding_window is not None:
            mask &= k_pos > q_pos - sliding_window
    # 4-D inputs: SDPA's fused CPU kernel only takes batched tensors (3-D ones run the slow
    # math path, measured 5x slower at 2k tokens).
    out = F.scaled_dot_product_attention(
        query.transpose(0, 1).unsqueeze(0),  # [1, num_heads, q_len, head_dim]
        keys.transpose(0, 1).unsqueeze(0),  # [1, num_kv_heads, seq_len, head_dim]
        values.transpose(0, 1).unsqueeze(0),
        attn_mask=mask,
        is_causal=plain_causal,
        scale=scale,
        enable_gqa=True,
    )
    return out[0].transpose(0, 1)
