"""Paged attention for CPU tensors, built from torch ops (the engine's path when not on CUDA).

Same contract as ``kernels.reference.paged_attention_ref`` (see its docstring for shapes), but
organised for speed on a few CPU cores, where per-op overhead dominates small decode steps:

* a decode row (query length 1) is two grouped matmuls over its gathered K/V: the query heads
  that share a KV head are multiplied together, so K/V are never repeated for GQA, and a
  sliding window just drops the keys before the window (no mask);
* a prefill row (query length > 1) is one ``scaled_dot_product_attention`` call; with nothing
  cached it uses SDPA's causal kernel, otherwise an explicit bottom-right-aligned causal mask.

(Batching all decode rows into one padded call was measured slower on CPU: the padded gather
and the masked math path cost more than the loop saves.) Logit soft-capping falls back to the
reference implementation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.reference import gather_seq_kv, paged_attention_ref


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
    output = torch.empty_like(query)
    starts = query_start_loc.tolist()
    for seq_idx, seq_len in enumerate(seq_lens.tolist()):
        q_start, q_end = starts[seq_idx], starts[seq_idx + 1]
        if q_end - q_start == 1:
            output[q_start] = _decode_one(
                query[q_start],
                key_cache,
                value_cache,
                block_tables[seq_idx],
                seq_len,
                scale,
                sliding_window,
            )
        elif q_end > q_start:
            output[q_start:q_end] = _prefill_one(
                query[q_start:q_end],
                key_cache,
                value_cache,
                block_tables[seq_idx],
                seq_len,
                scale,
                sliding_window,
            )
    return output


def _decode_one(
    query: torch.Tensor,  # [num_heads, head_dim]
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,  # [max_blocks_per_seq]
    seq_len: int,
    scale: float,
    sliding_window: int | None,
) -> torch.Tensor:  # [num_heads, head_dim]
    num_kv_heads = key_cache.shape[2]
    keys = gather_seq_kv(key_cache, block_table, seq_len)  # [seq_len, num_kv_heads, head_dim]
    values = gather_seq_kv(value_cache, block_table, seq_len)
    if sliding_window is not None and sliding_window < seq_len:
        keys, values = keys[seq_len - sliding_window :], values[seq_len - sliding_window :]
    grouped = query.view(num_kv_heads, -1, query.shape[-1]).float()  # [kv_heads, group, dim]
    scores = torch.matmul(grouped, keys.permute(1, 2, 0).float()) * scale  # [kv_heads, group, L]
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs, values.transpose(0, 1).float())  # [kv_heads, group, dim]
    return out.reshape(query.shape).to(query.dtype)


def _prefill_one(
    query: torch.Tensor,  # [q_len, num_heads, head_dim]
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,  # [max_blocks_per_seq]
    seq_len: int,
    scale: float,
    sliding_window: int | None,
) -> torch.Tensor:  # [q_len, num_heads, head_dim]
    q_len = query.shape[0]
    keys = gather_seq_kv(key_cache, block_table, seq_len).transpose(0, 1)
    values = gather_seq_kv(value_cache, block_table, seq_len).transpose(0, 1)
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
        keys.unsqueeze(0),
        values.unsqueeze(0),
        attn_mask=mask,
        is_causal=plain_causal,
        scale=scale,
        enable_gqa=True,
    )
    return out[0].transpose(0, 1)
