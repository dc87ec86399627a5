"""The compiled CPU kernel for paged attention of short query runs (``csrc/paged_rows.c``).

Built on first use by ``kernels.native_build`` (once per machine, about a second). Where no
compiler works, ``load_paged_rows()`` returns ``None`` (with one warning) and the caller keeps
its torch path.
"""

from __future__ import annotations

import ctypes
import functools
from typing import Any, NamedTuple

import numpy as np
import torch

from kernels import native_build
from kernels.units import cdiv

SOURCE = native_build.CSRC / "paged_rows.c"
MAX_HEADS, MAX_HEAD_DIM, MAX_BLOCK = 64, 256, 128  # the C kernel refuses larger shapes
MAX_RUN = 8  # query tokens of one run (one sequence's consecutive tokens), as in the C source

_i64 = ctypes.c_int64
_ptr = ctypes.c_void_p
_ARGTYPES: list[Any] = (
    [_ptr, _i64, _i64, _ptr, _ptr, _ptr, _i64]  # query, its strides, caches, block tables
    + [_ptr, _ptr, _ptr, _ptr, _i64]  # run_query, run_len, run_seq, run_kv_len, num_runs
    + [_ptr, _ptr, _ptr, _ptr, _i64]  # item_run, item_begin, item_end, run_first_item, items
    + [_i64, _i64, _i64, _i64, ctypes.c_float, _i64]  # heads, kv heads, dim, block, scale, win
    + [_ptr, _ptr, _i64, _i64, ctypes.c_int]  # partial, out, its strides, threads
)


@functools.lru_cache(maxsize=1)
def load_paged_rows() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    """The compiled ``tarry_paged_rows_f32``, building it on first use; ``None`` where it
    cannot be built or loaded (logged once). ``TARRY_NATIVE_ATTENTION=0`` turns it off."""
    return native_build.load_function(
        SOURCE, "tarry_paged_rows_f32", _ARGTYPES, "TARRY_NATIVE_ATTENTION"
    )


def supports(
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    num_heads: int,
) -> bool:
    """Whether the compiled kernel handles attention of ``num_heads`` float32 query heads over
    caches like ``key_cache`` (on the CPU), and could be built."""
    block_size, num_kv_heads, head_dim = key_cache.shape[1:]
    return (
        key_cache.device.type == "cpu"
        and key_cache.dtype == torch.float32
        and num_heads % num_kv_heads == 0
        and num_heads <= MAX_HEADS
        and head_dim <= MAX_HEAD_DIM
        and block_size <= MAX_BLOCK
        and load_paged_rows() is not None
    )


class NativeRows(NamedTuple):
    """Query runs for the compiled kernel, planned once per batch (all tensors int64 unless
    noted). Run ``r`` is the ``run_len[r]`` (1..``MAX_RUN``) consecutive query tokens from
    ``run_query[r]`` on of sequence ``run_seq[r]``, whose last token sees that sequence's keys
    ``[0, run_kv_len[r])`` and each earlier token one key fewer (causal; less any sliding
    window, applied per layer)."""

    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32, contiguous
    run_query: torch.Tensor  # [num_runs]
    run_len: torch.Tensor  # [num_runs]
    run_seq: torch.Tensor  # [num_runs]
    run_kv_len: torch.Tensor  # [num_runs]
    item_run: torch.Tensor  # [num_items]: the run of each item (a range of key positions)
    item_begin: torch.Tensor  # [num_items]: its first key position
    item_end: torch.Tensor  # [num_items]: one past its last key position
    run_first_item: torch.Tensor  # [num_runs + 1]: run r owns items [first[r], first[r + 1])


# Fewest keys per item: shorter runs add more merge work than they spread.
MIN_ITEM_KEYS = 256
# Items per thread aimed at, so rows of unequal length still balance over the threads.
ITEMS_PER_THREAD = 8


def plan_native_rows(
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    run_query: np.ndarray,  # [num_runs] int64
    run_len: np.ndarray,  # [num_runs] int64, each in 1..MAX_RUN
    run_seq: np.ndarray,  # [num_runs] int64
    run_kv_len: np.ndarray,  # [num_runs] int64, each >= its run_len
    block_size: int,
    num_threads: int,
) -> NativeRows:
    """Cut every run's keys into items of whole blocks, about ``ITEMS_PER_THREAD`` items per
    thread over the batch (split-K for few long runs, one item per run for many)."""
    total_keys = int(run_kv_len.sum())
    item_keys = max(MIN_ITEM_KEYS, cdiv(total_keys, ITEMS_PER_THREAD * num_threads))
    item_keys = cdiv(item_keys, block_size) * block_size
    items_per_run = -(-run_kv_len // item_keys)  # elementwise ceiling division (numpy)
    run_first_item = np.zeros(run_kv_len.shape[0] + 1, np.int64)
    np.cumsum(items_per_run, out=run_first_item[1:])
    item_run = np.repeat(np.arange(run_kv_len.shape[0]), items_per_run)
    item_begin = (np.arange(item_run.shape[0]) - run_first_item[item_run]) * item_keys
    item_end = np.minimum(item_begin + item_keys, run_kv_len[item_run])
    as_tensor = torch.from_numpy
    return NativeRows(
        block_tables=block_tables.to(torch.int32).contiguous(),
        run_query=as_tensor(run_query.astype(np.int64)),
        run_len=as_tensor(run_len.astype(np.int64)),
        run_seq=as_tensor(run_seq.astype(np.int64)),
        run_kv_len=as_tensor(run_kv_len.astype(np.int64)),
        item_run=as_tensor(item_run),
        item_begin=as_tensor(item_begin),
        item_end=as_tensor(item_end),
        run_first_item=as_tensor(run_first_item),
    )


def run_native_rows(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim] float32, last dim contiguous
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim], contiguous
    value_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim], contiguous
    rows: NativeRows,
    scale: float,
    sliding_window: int | None,
    out: torch.Tensor,  # [num_tokens, num_heads, head_dim] float32, last dim contiguous
) -> None:
    """Write the attention of every planned run's tokens into their rows of ``out`` (other
    rows are left alone). Raises ``RuntimeError`` on shapes the kernel was not built for."""
    function = load_paged_rows()
    if function is None:
        raise RuntimeError("the compiled CPU attention kernel is not available")
    num_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads, block_size = key_cache.shape[2], key_cache.shape[1]
    for tensor in (query, key_cache, value_cache, out):
        if tensor.dtype != torch.float32 or tensor.stride(-1) != 1:
            raise RuntimeError("compiled CPU attention takes float32 with a contiguous last dim")
    if not (key_cache.is_contiguous() and value_cache.is_contiguous()):
        raise RuntimeError("compiled CPU attention reads contiguous caches")
    partial = torch.empty(rows.item_run.shape[0], MAX_RUN, num_heads, head_dim + 2)
    status = function(
        query.data_ptr(),
        query.stride(0),
        query.stride(1),
        key_cache.data_ptr(),
        value_cache.data_ptr(),
        rows.block_tables.data_ptr(),
        rows.block_tables.shape[1],
        rows.run_query.data_ptr(),
        rows.run_len.data_ptr(),
        rows.run_seq.data_ptr(),
        rows.run_kv_len.data_ptr(),
        rows.run_query.shape[0],
        rows.item_run.data_ptr(),
        rows.item_begin.data_ptr(),
        rows.item_end.data_ptr(),
        rows.run_first_item.data_ptr(),
        rows.item_run.shape[0],
        num_heads,
        num_kv_heads,
        head_dim,
        block_size,
        scale,
        sliding_window or 0,
        partial.data_ptr(),
        out.data_ptr(),
        out.stride(0),
        out.stride(1),
        torch.get_num_threads(),
    )
    if status != 0:
        raise RuntimeError(f"compiled CPU attention rejected the shapes (status {status})")
