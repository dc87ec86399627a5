"""Pure-torch reference implementations of Tarry's KV-cache kernels.

These are the correctness oracles for the Triton kernels and the path the engine takes on CPU.
They favour clarity over speed, but stay vectorised per sequence so that the CPU engine is usable.

Shapes used throughout (the names match the Triton launchers):

    query          [num_tokens, num_heads, head_dim]     new tokens of all sequences, packed
    key_cache      [num_blocks, block_size, num_kv_heads, head_dim]
    value_cache    [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables   [num_seqs, max_blocks_per_seq] int32  logical -> physical block ids
    seq_lens       [num_seqs] int32                      KV length per sequence, new tokens included
    query_start_loc[num_seqs + 1] int32                  offsets of each sequence's tokens in query
    slot_mapping   [num_tokens] int64                    flat slot (block_id * block_size + offset),
                                                         -1 = do not store this token

Sequence ``i`` owns query rows ``query_start_loc[i]:query_start_loc[i+1]``; those are its *last*
``q_len`` tokens, so query row ``j`` sits at absolute position ``seq_lens[i] - q_len + j`` and
attends causally to every earlier position (the cached prefix plus the new tokens before it)::

    positions:  0 ........................ seq_len - q_len ........ seq_len - 1
                |<----- cached prefix ----->|<-------- new tokens -------->|
                 full attention               causal within the new tokens

With ``sliding_window = W`` a query at position p sees only keys at positions ``> p - W``
(the same convention as Hugging Face ``transformers``).
"""

from __future__ import annotations

import torch


def store_kv_ref(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    value_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int64, -1 = skip
) -> None:
    """Write each token's K/V into its slot of the paged cache, in place."""
    valid = slot_mapping >= 0
    if not bool(valid.all()):
        key, value, slot_mapping = key[valid], value[valid], slot_mapping[valid]
    num_kv_heads, head_dim = key_cache.shape[2], key_cache.shape[3]
    key_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, key.to(key_cache.dtype))
    value_cache.view(-1, num_kv_heads, head_dim).index_copy_(
        0, slot_mapping, value.to(value_cache.dtype)
    )


def gather_seq_kv(
    cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_table: torch.Tensor,  # [max_blocks_per_seq] int32
    seq_len: int,
) -> torch.Tensor:  # [seq_len, num_kv_heads, head_dim]
    """The first ``seq_len`` cached tokens of one sequence, contiguous."""
    block_size = cache.shape[1]
    num_blocks = (seq_len + block_size - 1) // block_size
    blocks = cache.index_select(0, block_table[:num_blocks].long())
    return blocks.reshape(-1, cache.shape[2], cache.shape[3])[:seq_len]


def paged_attention_ref(
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
    """Attention of every packed query token over its own sequence's paged K/V.

    Grouped-query attention is handled by sharing each KV head among
    ``num_heads // num_kv_heads`` query heads. Softmax runs in float32; the result has the
    query's dtype.
    """
    num_heads = query.shape[1]
    num_kv_heads = key_cache.shape[2]
    group = num_heads // num_kv_heads
    output = torch.empty_like(query)
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    for seq_idx, seq_len in enumerate(lens):
        q_start, q_end = starts[seq_idx], starts[seq_idx + 1]
        q_len = q_end - q_start
        if q_len == 0:
            continue
        keys = gather_seq_kv(key_cache, block_tables[seq_idx], seq_len)
        values = gather_seq_kv(value_cache, block_tables[seq_idx], seq_len)
        q = query[q_start:q_end].transpose(0, 1).float()  # [num_heads, q_len, head_dim]
        k = keys.transpose(0, 1).float().repeat_interleave(group, dim=0)  # [num_heads, kv, d]
        v = values.transpose(0, 1).float().repeat_interleave(group, dim=0)
        scores = torch.matmul(q, k.transpose(1, 2)) * scale  # [num_heads, q_len, seq_len]
        if softcap is not None and softcap > 0:
            scores = torch.tanh(scores / softcap) * softcap
        mask = _allowed_mask(q_len, seq_len, sliding_window, query.device)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        output[q_start:q_end] = torch.matmul(probs, v).transpose(0, 1).to(query.dtype)
    return output


def _allowed_mask(
    q_len: int, seq_len: int, sliding_window: int | None, device: torch.device
) -> torch.Tensor | None:  # [q_len, seq_len] bool, or None when every key is visible
    """Which keys each new query token may attend to (causal, optionally windowed)."""
    if q_len == 1 and (sliding_window is None or sliding_window >= seq_len):
        return None
    q_pos = torch.arange(seq_len - q_len, seq_len, device=device).unsqueeze(1)
    k_pos = torch.arange(seq_len, device=device).unsqueeze(0)
    allowed = k_pos <= q_pos
    if sliding_window is not None:
        allowed &= k_pos > q_pos - sliding_window
    return allowed


def gather_blocks_ref(
    kv_cache: torch.Tensor,  # [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]
    block_ids: torch.Tensor,  # [n] int64
) -> torch.Tensor:  # [num_layers, 2, n, block_size, num_kv_heads, head_dim], contiguous
    """Copy the given blocks of every layer into one contiguous staging tensor."""
    return kv_cache.index_select(2, block_ids.to(kv_cache.device).long()).contiguous()


def scatter_blocks_ref(
    kv_cache: torch.Tensor,  # [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]
    block_ids: torch.Tensor,  # [n] int64
    staged: torch.Tensor,  # [num_layers, 2, n, block_size, num_kv_heads, head_dim]
) -> None:
    """Write a staging tensor (from ``gather_blocks_ref``) back into the given blocks."""
    kv_cache.index_copy_(2, block_ids.to(kv_cache.device).long(), staged.to(kv_cache.device))


def copy_blocks_ref(
    kv_cache: torch.Tensor,  # [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]
    src_block_ids: torch.Tensor,  # [n] int64
    dst_block_ids: torch.Tensor,  # [n] int64
) -> None:
    """Copy whole blocks inside the pool (copy-on-write for forks), every layer at once."""
    kv_cache.index_copy_(2, dst_block_ids.long(), kv_cache.index_select(2, src_block_ids.long()))
