"""Device dispatch for the KV-cache kernels.

The engine calls these functions only. On a CUDA tensor they run the Triton kernels (when
Triton imports); on any other device ``kernels.cpu_attention`` for attention (torch's SDPA, and
for float32 decode rows the compiled ``kernels.cpu_native`` kernel) and the references in
``kernels.reference`` for the rest.
Argument shapes are documented in ``kernels.reference``.

A model step calls store_kv and paged attention once per layer with the same index tensors, so
the engine plans them once per step (``plan_attention``: checks, backend choice, split-KV
factor, scratch buffers, host-side lengths for the CPU path) and each layer then calls
``store_kv_planned`` / ``paged_attention_planned``, which do the launches and nothing else.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from kernels import cpu_native, reference
from kernels.cpu_attention import (
    CpuAttentionPlan,
    paged_attention_cpu,
    plan_paged_attention_cpu,
    run_paged_attention_cpu,
)

if TYPE_CHECKING:  # Triton may not import; the plan type is only named here
    from kernels.triton_attention import AttentionPlan


@functools.lru_cache(maxsize=1)
def _triton_available() -> bool:
    """Whether the Triton kernels import (checked once per process)."""
    try:
        import kernels.triton_attention  # noqa: F401
        import kernels.triton_blocks  # noqa: F401
    except ImportError:
        return False
    return True


def _use_triton(tensor: torch.Tensor) -> bool:
    """Triton for CUDA tensors when it imports; the torch references otherwise."""
    return tensor.device.type == "cuda" and _triton_available()


def gather_blocks(kv_cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """Stage blocks of all layers into one contiguous tensor (one launch per swap)."""
    if _use_triton(kv_cache):
        from kernels import triton_blocks

        return triton_blocks.gather_blocks(kv_cache, block_ids)
    return reference.gather_blocks_ref(kv_cache, block_ids)


def scatter_blocks(kv_cache: torch.Tensor, block_ids: torch.Tensor, staged: torch.Tensor) -> None:
    """Write a staged tensor back into the given blocks of all layers."""
    if _use_triton(kv_cache):
        from kernels import triton_blocks

        triton_blocks.scatter_blocks(kv_cache, block_ids, staged)
        return
    reference.scatter_blocks_ref(kv_cache, block_ids, staged)


# -- planned per-layer calls (one plan per model step) -------------------------------------------


@dataclass(frozen=True, slots=True)
class AttentionBatch:
    """One step's index tensors, checked and planned once for all of the step's layers.

    Exactly one of ``triton_plan`` (CUDA with Triton) and ``cpu_plan`` (otherwise) is set.
    """

    slot_mapping: torch.Tensor  # [num_tokens] int64, -1 = skip
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32
    seq_lens: torch.Tensor  # [num_seqs] int32
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    triton_plan: AttentionPlan | None
    cpu_plan: CpuAttentionPlan | None
    store_rows: torch.Tensor | None  # CPU: [n] int64 tokens with a slot; None = every token


def plan_attention(
    num_heads: int,
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim] (any layer's)
    slot_mapping: torch.Tensor,  # [num_tokens] int64, -1 = skip
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
) -> AttentionBatch:
    """Plan a batch of ``slot_mapping.shape[0]`` tokens over caches shaped like ``key_cache``.

    No device sync on CUDA. On the CPU the lengths are read to the host here, once.
    """
    num_tokens = slot_mapping.shape[0]
    if _use_triton(key_cache):
        from kernels import triton_attention

        triton_attention.check_slot_mapping(slot_mapping, num_tokens)
        plan = triton_attention.plan_paged_attention(
            num_tokens, num_heads, key_cache, block_tables, seq_lens, query_start_loc
        )
        return AttentionBatch(
            slot_mapping, block_tables, seq_lens, query_start_loc, plan, None, None
        )
    native = cpu_native.supports(key_cache, num_heads)
    cpu_plan = plan_paged_attention_cpu(
        block_tables, seq_lens, query_start_loc, key_cache.shape[1], native
    )
    valid = slot_mapping >= 0
    store_rows = None if bool(valid.all()) else valid.nonzero().squeeze(1)
    return AttentionBatch(
        slot_mapping if store_rows is None else slot_mapping[store_rows],
        block_tables,
        seq_lens,
        query_start_loc,
        None,
        cpu_plan,
        store_rows,
    )


def store_kv_planned(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim], contiguous
    value_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim], contiguous
    batch: AttentionBatch,
) -> None:
    """``store_kv`` of one layer by the step's plan."""
    if batch.triton_plan is not None:
        from kernels import triton_attention

        triton_attention.launch_store_kv(key, value, key_cache, value_cache, batch.slot_mapping)
        return
    if batch.store_rows is not None:
        key, value = key.index_select(0, batch.store_rows), value.index_select(0, batch.store_rows)
    num_kv_heads, head_dim = key_cache.shape[2], key_cache.shape[3]
    for cache, new in ((key_cache, key), (value_cache, value)):
        cache.view(-1, num_kv_heads, head_dim).index_copy_(
            0, batch.slot_mapping, new.to(cache.dtype)
        )


def paged_attention_planned(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim], contiguous
    value_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim], contiguous
    batch: AttentionBatch,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """``paged_attention`` of one layer by the step's plan."""
    if batch.triton_plan is not None:
        from kernels.triton_attention import run_paged_attention

        return run_paged_attention(
            query,
            key_cache,
            value_cache,
            batch.block_tables,
            batch.seq_lens,
            batch.query_start_loc,
            scale,
            batch.triton_plan,
            sliding_window=sliding_window,
            softcap=softcap,
        )
    if softcap:  # no supported model uses it: the unplanned CPU path owns the fallback
        return paged_attention_cpu(
            query,
            key_cache,
            value_cache,
            batch.block_tables,
            batch.seq_lens,
            batch.query_start_loc,
            scale,
            sliding_window,
            softcap,
        )
    assert batch.cpu_plan is not None
    return run_paged_attention_cpu(
        query, key_cache, value_cache, batch.cpu_plan, scale, sliding_window
    )
