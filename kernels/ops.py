"""Device dispatch for the KV-cache kernels.

The engine calls these functions only. On a CUDA tensor they run the Triton kernels (when
Triton imports); on any other device they run torch code: ``kernels.cpu_attention`` for
attention and the references in ``kernels.reference`` for the rest.
Argument shapes are documented in ``kernels.reference``.
"""

from __future__ import annotations

import functools

import torch

from kernels import reference
from kernels.cpu_attention import paged_attention_cpu


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


def store_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write K/V of the packed tokens into their slots (``-1`` = skip)."""
    if _use_triton(key_cache):
        from kernels import triton_attention

        triton_attention.store_kv(key, value, key_cache, value_cache, slot_mapping)
        return
    reference.store_kv_ref(key, value, key_cache, value_cache, slot_mapping)


def paged_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Varlen paged attention; see ``reference.paged_attention_ref`` for the contract."""
    if _use_triton(query):
        from kernels.triton_attention import paged_attention as implementation
    else:
        implementation = paged_attention_cpu
    return implementation(
        query,
        key_cache,
        value_cache,
        block_tables,
        seq_lens,
        query_start_loc,
        scale,
        sliding_window=sliding_window,
        softcap=softcap,
    )


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


def copy_blocks(
    kv_cache: torch.Tensor, src_block_ids: torch.Tensor, dst_block_ids: torch.Tensor
) -> None:
    """Copy blocks inside the pool, all layers at once."""
    if _use_triton(kv_cache):
        from kernels import triton_blocks

        triton_blocks.copy_blocks(kv_cache, src_block_ids, dst_block_ids)
        return
    reference.copy_blocks_ref(kv_cache, src_block_ids, dst_block_ids)
