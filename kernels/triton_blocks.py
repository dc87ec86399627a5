"""Triton kernels that move whole KV-cache blocks of every layer in one launch.

Contracts are those of ``kernels.reference``: ``gather_blocks`` / ``scatter_blocks`` /
``copy_blocks`` match ``gather_blocks_ref`` / ``scatter_blocks_ref`` / ``copy_blocks_ref``.

The pool is ``kv_cache [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]``; viewed
as ``[num_layers * 2, num_blocks, block_elems]`` one block of one layer (K or V) is a contiguous
run of ``block_elems = block_size * num_kv_heads * head_dim`` elements. A single kernel copies
such runs: grid ``(n * chunks_per_block, num_layers * 2)``, ``CHUNK`` elements per program.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

MAX_CHUNK = 4096  # elements copied per program


@triton.jit(do_not_specialize=["src_blocks", "dst_blocks", "chunks_per_block"])
def _copy_block_runs_kernel(
    src_ptr,  # [num_planes, src_blocks, block_elems]
    dst_ptr,  # [num_planes, dst_blocks, block_elems]
    src_ids_ptr,  # [n] int64: source block of pair i (unused when SRC_IDENTITY)
    dst_ids_ptr,  # [n] int64: destination block of pair i (unused when DST_IDENTITY)
    src_blocks,  # int: blocks per plane in src
    dst_blocks,  # int: blocks per plane in dst
    block_elems,  # int: elements per block
    chunks_per_block,  # int: cdiv(block_elems, CHUNK)
    CHUNK: tl.constexpr,  # int: elements per program, power of two
    SRC_IDENTITY: tl.constexpr,  # bool: source block of pair i is i (staging tensor)
    DST_IDENTITY: tl.constexpr,  # bool: destination block of pair i is i (staging tensor)
):
    """Copy ``src[plane, src_ids[i]] -> dst[plane, dst_ids[i]]`` for every plane and pair."""
    pid = tl.program_id(0)
    plane = tl.program_id(1).to(tl.int64)
    pair = pid // chunks_per_block
    chunk = pid % chunks_per_block
    src_block = pair if SRC_IDENTITY else tl.load(src_ids_ptr + pair)
    dst_block = pair if DST_IDENTITY else tl.load(dst_ids_ptr + pair)
    offs = chunk * CHUNK + tl.arange(0, CHUNK)
    mask = offs < block_elems
    src = src_ptr + (plane * src_blocks + src_block.to(tl.int64)) * block_elems + offs
    dst = dst_ptr + (plane * dst_blocks + dst_block.to(tl.int64)) * block_elems + offs
    tl.store(dst, tl.load(src, mask=mask), mask=mask)


def gather_blocks(
    kv_cache: torch.Tensor,  # [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]
    block_ids: torch.Tensor,  # [n] int64
) -> torch.Tensor:  # [num_layers, 2, n, block_size, num_kv_heads, head_dim], contiguous
    """Copy the given blocks of every layer into one contiguous staging tensor."""
    _check_pool(kv_cache)
    ids = _ids_on(block_ids, kv_cache.device)
    shape = kv_cache.shape
    staged = kv_cache.new_empty((shape[0], 2, ids.shape[0], *shape[3:]))
    _launch(kv_cache, staged, src_ids=ids, dst_ids=None)
    return staged


def scatter_blocks(
    kv_cache: torch.Tensor,  # [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]
    block_ids: torch.Tensor,  # [n] int64
    staged: torch.Tensor,  # [num_layers, 2, n, block_size, num_kv_heads, head_dim]
) -> None:
    """Write a staging tensor (from ``gather_blocks``) back into the given blocks, in place.

    ``staged`` may live on another device (e.g. pinned host memory); it is copied over first.
    Duplicate ids in ``block_ids`` leave the block with one of the staged copies.
    """
    _check_pool(kv_cache)
    ids = _ids_on(block_ids, kv_cache.device)
    staged = staged.to(kv_cache.device)
    shape = kv_cache.shape
    assert staged.shape == (shape[0], 2, ids.shape[0], *shape[3:]), "staged shape"
    assert staged.dtype == kv_cache.dtype, "staged dtype differs from kv_cache"
    assert staged.is_contiguous(), "staged must be contiguous"
    _launch(staged, kv_cache, src_ids=None, dst_ids=ids)


def copy_blocks(
    kv_cache: torch.Tensor,  # [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]
    src_block_ids: torch.Tensor,  # [n] int64
    dst_block_ids: torch.Tensor,  # [n] int64
) -> None:
    """Copy whole blocks inside the pool (copy-on-write for forks), every layer at once.

    Precondition (as for copy-on-write): no destination id is also a source id; the blocks are
    copied in parallel, so an overlap would read a block while it is being overwritten.
    """
    _check_pool(kv_cache)
    src = _ids_on(src_block_ids, kv_cache.device)
    dst = _ids_on(dst_block_ids, kv_cache.device)
    assert src.shape == dst.shape, "src and dst block ids differ in length"
    _launch(kv_cache, kv_cache, src_ids=src, dst_ids=dst)


def _launch(
    src: torch.Tensor,  # [num_layers, 2, src_blocks, block_size, num_kv_heads, head_dim]
    dst: torch.Tensor,  # [num_layers, 2, dst_blocks, block_size, num_kv_heads, head_dim]
    src_ids: torch.Tensor | None,  # [n] int64, None = identity (src is a staging tensor)
    dst_ids: torch.Tensor | None,  # [n] int64, None = identity (dst is a staging tensor)
) -> None:
    """One launch copying block ``src_ids[i]`` of ``src`` to ``dst_ids[i]`` of ``dst``."""
    ids = src_ids if src_ids is not None else dst_ids
    assert ids is not None, "at least one side needs block ids"
    n = ids.shape[0]
    num_planes = src.shape[0] * src.shape[1]
    block_elems = math.prod(src.shape[3:])
    if n == 0 or num_planes == 0 or block_elems == 0:
        return
    chunk = min(MAX_CHUNK, triton.next_power_of_2(block_elems))
    chunks_per_block = triton.cdiv(block_elems, chunk)
    grid = (n * chunks_per_block, num_planes)
    _copy_block_runs_kernel[grid](
        src,
        dst,
        src_ids if src_ids is not None else ids,
        dst_ids if dst_ids is not None else ids,
        src.shape[2],
        dst.shape[2],
        block_elems,
        chunks_per_block,
        CHUNK=chunk,
        SRC_IDENTITY=src_ids is None,
        DST_IDENTITY=dst_ids is None,
    )


def _check_pool(kv_cache: torch.Tensor) -> None:
    assert kv_cache.dim() == 6 and kv_cache.shape[1] == 2, (
        "kv_cache must be [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]"
    )
    assert kv_cache.is_contiguous(), "kv_cache must be contiguous"


def _ids_on(block_ids: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Block ids as a contiguous int64 vector on ``device``."""
    assert block_ids.dim() == 1, "block ids must be a vector"
    assert not block_ids.is_floating_point(), "block ids must be integers"
    return block_ids.to(device=device, dtype=torch.int64).contiguous()
