"""The Triton device code of paged attention: the attention kernel and the split-KV merge.

Launched by ``kernels.triton_attention`` (which documents the algorithm and owns the host-side
planning); kept apart so each file holds one side of the work.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _find_seq_idx(
    query_start_loc_ptr,  # [num_seqs + 1] int32
    q_tile_idx,  # int: global query-tile index
    num_seqs,  # int
    BLOCK_Q: tl.constexpr,  # int: query tokens per tile
):
    """The sequence owning global query tile ``q_tile_idx``.

    Sequence ``i``'s tiles start at ``query_start_loc[i] // BLOCK_Q + i`` (strictly increasing,
    with room for ``cdiv(q_len, BLOCK_Q)`` tiles); binary-search the last start <= the index.
    """
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        start = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        if start <= q_tile_idx:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _tanh(x):
    """tanh from exp (portable across Triton versions; saturates correctly at +-inf)."""
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr):
    """``a @ b`` in float32 (exact fp32 products for fp32 inputs: no TF32).

    ``UPCAST`` computes in float32 from upcast operands; the launcher sets it for bfloat16 under
    the CPU interpreter, whose ``tl.dot`` multiplies the raw bf16 bit patterns.
    """
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision="ieee")


# Batch-dependent integers are not specialised (e.g. on == 1), so batch shapes don't recompile.
@triton.jit(do_not_specialize=["num_seqs", "num_tokens", "sliding_window"])
def paged_attention_kernel(
    out_ptr,  # [num_tokens, num_heads, head_dim] contiguous  (NUM_SPLITS == 1)
    partial_out_ptr,  # [NUM_SPLITS, num_tokens, num_heads, head_dim] f32 (NUM_SPLITS > 1)
    partial_max_ptr,  # [NUM_SPLITS, num_tokens, num_heads] f32       (NUM_SPLITS > 1)
    partial_sum_ptr,  # [NUM_SPLITS, num_tokens, num_heads] f32       (NUM_SPLITS > 1)
    query_ptr,  # [num_tokens, num_heads, head_dim], last dim contiguous
    key_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    value_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables_ptr,  # [num_seqs, max_blocks_per_seq] int32
    seq_lens_ptr,  # [num_seqs] int32
    query_start_loc_ptr,  # [num_seqs + 1] int32
    scale,  # float: softmax scale applied to q.k
    softcap,  # float: logit softcap (used when USE_SOFTCAP)
    sliding_window,  # int: keys at positions > q_pos - sliding_window (used when USE_WINDOW)
    num_seqs,  # int
    num_tokens,  # int
    stride_q_tok,  # int: query.stride(0)
    stride_q_head,  # int: query.stride(1)
    stride_kv_blk,  # int: key_cache.stride(0) == value_cache.stride(0)
    stride_kv_tok,  # int: key_cache.stride(1)
    stride_kv_head,  # int: key_cache.stride(2)
    stride_bt_seq,  # int: block_tables.stride(0)
    NUM_HEADS: tl.constexpr,  # int
    GROUP: tl.constexpr,  # int: num_heads // num_kv_heads
    HEAD_DIM: tl.constexpr,  # int, power of two
    BLOCK_SIZE: tl.constexpr,  # int: tokens per cache block
    BLOCK_M: tl.constexpr,  # int: rows per query tile (>= 16, power of two)
    BLOCK_Q: tl.constexpr,  # int: tokens per query tile, BLOCK_M // GROUP
    TILE_N: tl.constexpr,  # int: keys per inner step (power of two, >= 16)
    NUM_SPLITS: tl.constexpr,  # int: programs sharing one tile's key range
    USE_SOFTCAP: tl.constexpr,  # bool
    USE_WINDOW: tl.constexpr,  # bool
    UPCAST_DOT: tl.constexpr,  # bool: run tl.dot on float32 copies (bf16 in the interpreter)
):
    """Grid ``(num_query_tiles, num_kv_heads, NUM_SPLITS)``; see the module docstring."""
    q_tile_idx = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    seq = _find_seq_idx(query_start_loc_ptr, q_tile_idx, num_seqs, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    q_tile_local = q_tile_idx - (q_start // BLOCK_Q + seq)
    if q_tile_local * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - q_len  # cached prefix; query token j sits at context_len + j

    # Rows of the tile: token (row // GROUP) of the tile, query head (row % GROUP) of the group.
    rows = tl.arange(0, BLOCK_M)
    tok_local = q_tile_local * BLOCK_Q + rows // GROUP  # [BLOCK_M] token index in the sequence
    head = kv_head * GROUP + rows % GROUP  # [BLOCK_M]
    row_valid = (rows < BLOCK_Q * GROUP) & (tok_local < q_len)  # [BLOCK_M]
    q_pos = context_len + tok_local  # [BLOCK_M] absolute positions
    token = (q_start + tok_local).to(tl.int64)  # [BLOCK_M] row in the packed query
    dims = tl.arange(0, HEAD_DIM)

    q_offs = token[:, None] * stride_q_tok + head[:, None] * stride_q_head + dims[None, :]
    q = tl.load(query_ptr + q_offs, mask=row_valid[:, None], other=0.0)  # [BLOCK_M, HEAD_DIM]

    # Key range of the whole tile: [first visible key of its first token, last token + 1).
    first_tok = q_tile_local * BLOCK_Q
    last_tok = tl.minimum(first_tok + BLOCK_Q, q_len) - 1
    key_end = context_len + last_tok + 1
    key_begin = 0
    if USE_WINDOW:
        key_begin = tl.maximum(context_len + first_tok - sliding_window + 1, 0)
    tile_begin = key_begin // TILE_N
    tile_end = tl.cdiv(key_end, TILE_N)
    tiles_per_split = tl.cdiv(tile_end - tile_begin, NUM_SPLITS)
    my_begin = tile_begin + split * tiles_per_split
    my_end = tl.minimum(my_begin + tiles_per_split, tile_end)

    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    block_table_row = block_tables_ptr + seq.to(tl.int64) * stride_bt_seq
    kv_head_off = kv_head.to(tl.int64) * stride_kv_head
    cols = tl.arange(0, TILE_N)

    for tile in range(my_begin, my_end):
        k_pos = tile * TILE_N + cols  # [TILE_N] absolute key positions
        k_valid = k_pos < key_end
        block_ids = tl.load(block_table_row + k_pos // BLOCK_SIZE, mask=k_valid, other=0)
        kv_offs = (
            block_ids.to(tl.int64) * stride_kv_blk
            + (k_pos % BLOCK_SIZE).to(tl.int64) * stride_kv_tok
            + kv_head_off
        )  # [TILE_N]
        k = tl.load(
            key_cache_ptr + kv_offs[None, :] + dims[:, None], mask=k_valid[None, :], other=0.0
        )  # [HEAD_DIM, TILE_N]
        v = tl.load(
            value_cache_ptr + kv_offs[:, None] + dims[None, :], mask=k_valid[:, None], other=0.0
        )  # [TILE_N, HEAD_DIM]

        scores = _dot(q, k, UPCAST_DOT) * scale  # [BLOCK_M, TILE_N] f32
        if USE_SOFTCAP:
            scores = softcap * _tanh(scores / softcap)
        allowed = k_valid[None, :] & (k_pos[None, :] <= q_pos[:, None])
        if USE_WINDOW:
            allowed = allowed & (k_pos[None, :] > q_pos[:, None] - sliding_window)
        scores = tl.where(allowed, scores, float("-inf"))

        # Online softmax; rows that have seen no visible key yet keep max -inf and sum 0.
        new_max = tl.maximum(row_max, tl.max(scores, axis=1))
        safe_max = tl.where(new_max > float("-inf"), new_max, 0.0)
        probs = tl.exp(scores - safe_max[:, None])
        alpha = tl.exp(row_max - safe_max)
        row_sum = row_sum * alpha + tl.sum(probs, axis=1)
        acc = acc * alpha[:, None]
        acc += _dot(probs.to(v.dtype), v, UPCAST_DOT)
        row_max = new_max

    if NUM_SPLITS == 1:
        out = acc / tl.where(row_sum > 0.0, row_sum, 1.0)[:, None]
        out_offs = token[:, None] * (NUM_HEADS * HEAD_DIM) + head[:, None] * HEAD_DIM
        tl.store(
            out_ptr + out_offs + dims[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=row_valid[:, None],
        )
    else:
        stat_offs = (split * num_tokens + token) * NUM_HEADS + head  # [BLOCK_M]
        tl.store(partial_max_ptr + stat_offs, row_max, mask=row_valid)
        tl.store(partial_sum_ptr + stat_offs, row_sum, mask=row_valid)
        tl.store(
            partial_out_ptr + stat_offs[:, None] * HEAD_DIM + dims[None, :],
            acc,
            mask=row_valid[:, None],
        )


@triton.jit(do_not_specialize=["num_tokens"])
def merge_splits_kernel(
    out_ptr,  # [num_tokens, num_heads, head_dim]
    partial_out_ptr,  # [NUM_SPLITS, num_tokens, num_heads, head_dim] f32
    partial_max_ptr,  # [NUM_SPLITS, num_tokens, num_heads] f32
    partial_sum_ptr,  # [NUM_SPLITS, num_tokens, num_heads] f32
    num_tokens,  # int
    NUM_HEADS: tl.constexpr,  # int
    HEAD_DIM: tl.constexpr,  # int, power of two
    NUM_SPLITS: tl.constexpr,  # int
    SPLITS_PAD: tl.constexpr,  # int: next power of two >= NUM_SPLITS
):
    """Grid ``(num_tokens, num_heads)``: merge the split-KV partial softmax results."""
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    splits = tl.arange(0, SPLITS_PAD)
    split_valid = splits < NUM_SPLITS
    dims = tl.arange(0, HEAD_DIM)
    stat_offs = (splits * num_tokens + token) * NUM_HEADS + head  # [SPLITS_PAD]
    maxes = tl.load(partial_max_ptr + stat_offs, mask=split_valid, other=float("-inf"))
    sums = tl.load(partial_sum_ptr + stat_offs, mask=split_valid, other=0.0)
    accs = tl.load(
        partial_out_ptr + stat_offs[:, None] * HEAD_DIM + dims[None, :],
        mask=split_valid[:, None],
        other=0.0,
    )  # [SPLITS_PAD, HEAD_DIM]
    global_max = tl.max(maxes, axis=0)
    global_max = tl.where(global_max > float("-inf"), global_max, 0.0)
    weights = tl.exp(maxes - global_max)  # 0 for splits that saw no key
    total = tl.sum(sums * weights, axis=0)
    out = tl.sum(accs * weights[:, None], axis=0) / tl.where(total > 0.0, total, 1.0)
    out_offs = (token * NUM_HEADS + head) * HEAD_DIM + dims
    tl.store(out_ptr + out_offs, out.to(out_ptr.dtype.element_ty))
