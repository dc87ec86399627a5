"""Our attention function for Hugging Face models, registered via ``AttentionInterface``.

The model runner packs the whole scheduled batch into one ``[1, num_tokens]`` row with explicit
``position_ids`` and passes the batch metadata (``PagedAttentionMetadata``) as a keyword argument
of the model's forward; ``transformers`` hands it through every decoder layer to this function
(the approach of vLLM's Transformers backend). Each call writes the layer's new K/V into the
paged pool and attends over each sequence's blocks. No attention mask is built: causality and
sliding windows come from ``seq_lens`` / ``query_start_loc``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch

from kernels import ops

ATTENTION_NAME = "tarry_paged"


@dataclass(frozen=True, slots=True)
class PagedAttentionMetadata:
    """What every layer's attention call of one step needs besides its q/k/v.

    Built once per step by the model runner and passed to the model's forward as the keyword
    ``paged_metadata``; anything derivable once per step lives here, so a layer only launches.
    """

    # Per layer (key_cache, value_cache), each [num_blocks, block_size, num_kv_heads, head_dim]:
    # views of the pool made once, not per call.
    layer_caches: Sequence[tuple[torch.Tensor, torch.Tensor]]
    batch: ops.AttentionBatch  # the step's index tensors and kernel plan
    # Padded decode on the CPU (engine.decode_graph): query rows from this one on are padding;
    # ``batch`` was planned for the rows before it only, and the padding rows get zeros.
    # None: ``batch`` covers every row (always on CUDA, where the kernels take padded lanes).
    num_real_tokens: int | None = None


def paged_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,  # [1, num_heads, num_tokens, head_dim]
    key: torch.Tensor,  # [1, num_kv_heads, num_tokens, head_dim]
    value: torch.Tensor,  # [1, num_kv_heads, num_tokens, head_dim]
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    *,
    paged_metadata: PagedAttentionMetadata,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:  # ([1, num_tokens, num_heads, head_dim], no weights)
    """Store this layer's K/V by the step's ``slot_mapping``, then paged attention for every
    token. No host sync and no per-layer planning: both come from ``paged_metadata``."""
    key_cache, value_cache = paged_metadata.layer_caches[cast(int, module.layer_idx)]
    batch = paged_metadata.batch
    ops.store_kv_planned(
        key[0].transpose(0, 1), value[0].transpose(0, 1), key_cache, value_cache, batch
    )
    q = query[0].transpose(0, 1)  # [num_tokens, num_heads, head_dim]
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    num_real = paged_metadata.num_real_tokens
    if num_real is not None and num_real < q.shape[0]:
        out = q.new_zeros(q.shape)
        out[:num_real] = ops.paged_attention_planned(
            q[:num_real],
            key_cache,
            value_cache,
            batch,
            scale,
            sliding_window=sliding_window,
            softcap=softcap,
        )
        return out.unsqueeze(0), None
    out = ops.paged_attention_planned(
        q,
        key_cache,
        value_cache,
        batch,
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
