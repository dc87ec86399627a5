"""Our attention function for Hugging Face models, registered via ``AttentionInterface``.

The model runner packs the whole scheduled batch into one ``[1, num_tokens]`` row with explicit
``position_ids`` and passes the batch metadata as keyword arguments of the model's forward;
``transformers`` hands them through every decoder layer to this function (the approach of
vLLM's Transformers backend). Each call writes the layer's new K/V into the paged pool and
attends over each sequence's blocks. No attention mask is built: causality and sliding windows
come from ``seq_lens`` / ``query_start_loc``.
"""

from __future__ import annotations

from typing import Any, cast

import torch

from kernels import ops

ATTENTION_NAME = "tarry_paged"


def paged_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,  # [1, num_heads, num_tokens, head_dim]
    key: torch.Tensor,  # [1, num_kv_heads, num_tokens, head_dim]
    value: torch.Tensor,  # [1, num_kv_heads, num_tokens, head_dim]
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    *,
    kv_cache: torch.Tensor,  # [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int64
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:  # ([1, num_tokens, num_heads, head_dim], no weights)
    """Store this layer's K/V by ``slot_mapping``, then paged attention for every token."""
    layer_idx = cast(int, module.layer_idx)
    key_cache, value_cache = kv_cache[layer_idx, 0], kv_cache[layer_idx, 1]
    q = query[0].transpose(0, 1)  # [num_tokens, num_heads, head_dim]
    ops.store_kv(
        key[0].transpose(0, 1), value[0].transpose(0, 1), key_cache, value_cache, slot_mapping
    )
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    out = ops.paged_attention(
        q,
        key_cache,
        value_cache,
        block_tables,
        seq_lens,
        query_start_loc,
        scale,
        sliding_window=sliding_window,
        softcap=softcap,
    )
    return out.unsqueeze(0), None


def register_paged_attention() -> str:
    """Register ``paged_attention_forward`` with transformers (idempotent); return its name.

    It is deliberately not registered as a mask function, so transformers builds no masks.
    """
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, paged_attention_forward)
    return ATTENTION_NAME
