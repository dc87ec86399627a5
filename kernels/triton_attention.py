"""Triton kernels for the paged KV cache: varlen paged attention and K/V stores.

The contracts (shapes, dtypes, masking semantics) are those of ``kernels.reference``:
``paged_attention`` matches ``paged_attention_ref`` and ``store_kv`` matches ``store_kv_ref``.

Paged attention, one kernel family for decode, prefill and prefill over a cached prefix:

* Work is split into *query tiles*: ``BLOCK_Q`` consecutive tokens of one sequence times the
  ``GROUP`` query heads that share one KV head (GQA), packed into ``BLOCK_M = BLOCK_Q * GROUP``
  rows (padded to a power of two). A tile therefore reads each K/V tile once for all its heads.
* Query tiles of all sequences are numbered globally; the kernel finds a tile's sequence by a
  binary search over ``query_start_loc``, so the launcher never syncs with the device.
* Each program walks the key tiles (``TILE_N`` keys, looked up token by token through the block
  table, so any block size works) from the sliding-window start to its causal end, with an
  online softmax in float32.
* With ``num_splits > 1`` (small decode batches) the key range is split among programs
  (flash-decoding); each writes an unnormalised partial result and a second kernel merges them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.triton_attention_kernels import merge_splits_kernel, paged_attention_kernel

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TILE_N = 64  # keys per inner-loop step of the attention kernel
DECODE_BLOCK_M = 16  # query rows per tile for decode batches and float32
PREFILL_BLOCK_M = 64  # query rows per tile otherwise
MAX_SPLITS = 64  # upper bound on the split-KV factor chosen by the heuristic
# Key tiles each split gets at least. Short contexts are not split: their attention takes a few
# microseconds of GPU time either way, while a split costs a second launch (the merge) per
# layer, and small decode batches are bound by the host's launch rate, not by the GPU.
MIN_TILES_PER_SPLIT = 4


# --------------------------------------------------------------------------------------------
# store_kv
# --------------------------------------------------------------------------------------------


@triton.jit
def _store_kv_kernel(
    key_ptr,  # [num_tokens, num_kv_heads, head_dim], last dim contiguous
    value_ptr,  # [num_tokens, num_kv_heads, head_dim], last dim contiguous
    key_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim], contiguous
    value_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim], contiguous
    slot_mapping_ptr,  # [num_tokens] int64, -1 = skip
    stride_k_tok,  # int: key.stride(0)
    stride_k_head,  # int: key.stride(1)
    stride_v_tok,  # int: value.stride(0)
    stride_v_head,  # int: value.stride(1)
    NUM_KV_HEADS: tl.constexpr,  # int
    HEAD_DIM: tl.constexpr,  # int
    HEADS_PAD: tl.constexpr,  # int: next power of two >= NUM_KV_HEADS
    DIM_PAD: tl.constexpr,  # int: next power of two >= HEAD_DIM
):
    """One program per token: copy its K and V rows into cache slot ``slot_mapping[token]``."""
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:
        return
    heads = tl.arange(0, HEADS_PAD)[:, None]
    dims = tl.arange(0, DIM_PAD)[None, :]
    mask = (heads < NUM_KV_HEADS) & (dims < HEAD_DIM)
    key = tl.load(key_ptr + token * stride_k_tok + heads * stride_k_head + dims, mask=mask)
    value = tl.load(value_ptr + token * stride_v_tok + heads * stride_v_head + dims, mask=mask)
    dst = slot * (NUM_KV_HEADS * HEAD_DIM) + heads * HEAD_DIM + dims
    tl.store(key_cache_ptr + dst, key.to(key_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(value_cache_ptr + dst, value.to(value_cache_ptr.dtype.element_ty), mask=mask)


def store_kv(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    value_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int64, -1 = skip
) -> None:
    """Write each token's K/V into its slot of the paged cache, in place (``-1`` = skip).

    K/V are cast to the cache dtype. The caches must be contiguous; K/V may be strided views
    (e.g. transposed from ``[num_kv_heads, num_tokens, head_dim]``) with a contiguous last dim.
    """
    _check_cache(key_cache, value_cache)
    num_tokens = key.shape[0]
    num_kv_heads, head_dim = key_cache.shape[2], key_cache.shape[3]
    assert key.shape == value.shape == (num_tokens, num_kv_heads, head_dim), "key/value shape"
    assert key.dtype in SUPPORTED_DTYPES and value.dtype in SUPPORTED_DTYPES, "key/value dtype"
    assert key.stride(2) == 1 and value.stride(2) == 1, "key/value last dim must be contiguous"
    check_slot_mapping(slot_mapping, num_tokens)
    _check_same_device(key, value, key_cache, value_cache, slot_mapping)
    launch_store_kv(key, value, key_cache, value_cache, slot_mapping)


def check_slot_mapping(slot_mapping: torch.Tensor, num_tokens: int) -> None:
    """Shape, dtype and layout preconditions of ``slot_mapping`` (no device sync)."""
    assert slot_mapping.shape == (num_tokens,), "slot_mapping must be [num_tokens]"
    assert slot_mapping.dtype == torch.int64, "slot_mapping must be int64"
    assert slot_mapping.is_contiguous(), "slot_mapping must be contiguous"


def launch_store_kv(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim], last dim contiguous
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim], last dim contiguous
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim], contiguous
    value_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim], contiguous
    slot_mapping: torch.Tensor,  # [num_tokens] int64, contiguous, -1 = skip
) -> None:
    """``store_kv`` without its checks: the launch alone, for callers that checked the
    arguments once per batch (the engine's per-layer path)."""
    num_tokens = key.shape[0]
    if num_tokens == 0:
        return
    num_kv_heads, head_dim = key_cache.shape[2], key_cache.shape[3]
    _store_kv_kernel[(num_tokens,)](
        key,
        value,
        key_cache,
        value_cache,
        slot_mapping,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        HEADS_PAD=triton.next_power_of_2(num_kv_heads),
        DIM_PAD=triton.next_power_of_2(head_dim),
    )


# --------------------------------------------------------------------------------------------
# paged attention
# --------------------------------------------------------------------------------------------


def paged_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    value_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """Varlen paged attention; same contract as ``reference.paged_attention_ref``.

    ``num_splits`` is the split-KV factor; None picks it from the batch shape and the device's
    SM count (no device sync). The caches and index tensors must be contiguous; ``query`` may
    be a strided view with a contiguous last dim. The output is a new contiguous tensor.
    """
    _check_attention_args(query, key_cache, value_cache, block_tables, seq_lens, query_start_loc)
    assert sliding_window is None or sliding_window > 0, "sliding_window must be positive"
    plan = plan_paged_attention(
        query.shape[0],
        query.shape[1],
        key_cache,
        block_tables,
        seq_lens,
        query_start_loc,
        num_splits,
    )
    return run_paged_attention(
        query,
        key_cache,
        value_cache,
        block_tables,
        seq_lens,
        query_start_loc,
        scale,
        plan,
        sliding_window=sliding_window,
        softcap=softcap,
    )


@dataclass(frozen=True, slots=True)
class AttentionPlan:
    """Launch parameters of one batch's paged attention, shared by all layers of a step.

    Made from shapes alone (no device sync). The split-KV scratch tensors are reused by every
    launch that takes this plan: launches on one stream run in order, so one layer's merge has
    read them before the next layer's attention overwrites them. Use a plan on one stream only.
    """

    num_tokens: int
    num_heads: int
    head_dim: int
    dtype: torch.dtype
    num_splits: int  # programs sharing one query tile's key range (1: no split)
    block_m: int  # rows per query tile
    block_q: int  # tokens per query tile
    num_q_tiles: int  # grid size along the query axis (an upper bound)
    partial_out: torch.Tensor  # [num_splits, num_tokens, num_heads, head_dim] f32 ([1] unsplit)
    partial_max: torch.Tensor  # [num_splits, num_tokens, num_heads] f32 ([1] unsplit)
    partial_sum: torch.Tensor  # [num_splits, num_tokens, num_heads] f32 ([1] unsplit)


def plan_paged_attention(
    num_tokens: int,
    num_heads: int,
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    num_splits: int | None = None,
) -> AttentionPlan:
    """Check the index tensors and the cache, pick tile sizes and the split-KV factor
    (``None``: ``choose_num_splits``'s) and allocate the split-KV scratch tensors.

    The query is ``[num_tokens, num_heads, head_dim]`` of the cache's dtype. No device sync.
    """
    _check_cache(key_cache, key_cache)
    _check_index_tensors(block_tables, seq_lens, query_start_loc, key_cache.device)
    _, block_size, num_kv_heads, head_dim = key_cache.shape
    num_seqs, max_blocks = block_tables.shape
    assert head_dim >= 16 and head_dim & (head_dim - 1) == 0, "head_dim must be a power of two"
    assert num_heads % num_kv_heads == 0, "num_heads must be a multiple of num_kv_heads"
    if num_splits is None:
        num_splits = _num_splits(
            num_tokens, num_seqs, max_blocks, num_kv_heads, block_size, key_cache.device
        )
    assert num_splits >= 1, "num_splits must be >= 1"
    group = num_heads // num_kv_heads
    block_m = _block_m(group, decode_only=num_tokens <= num_seqs, dtype=key_cache.dtype)
    block_q = block_m // group
    device = key_cache.device
    if num_splits > 1:
        partial_out = torch.empty(
            (num_splits, num_tokens, num_heads, head_dim), dtype=torch.float32, device=device
        )
        partial_max = torch.empty(partial_out.shape[:3], dtype=torch.float32, device=device)
        partial_sum = torch.empty_like(partial_max)
    else:  # unused by the kernel; any float32 tensor will do
        partial_out = partial_max = partial_sum = torch.empty(1, dtype=torch.float32, device=device)
    return AttentionPlan(
        num_tokens=num_tokens,
        num_heads=num_heads,
        head_dim=head_dim,
        dtype=key_cache.dtype,
        num_splits=num_splits,
        block_m=block_m,
        block_q=block_q,
        num_q_tiles=num_tokens // block_q + num_seqs,  # surplus programs exit early
        partial_out=partial_out,
        partial_max=partial_max,
        partial_sum=partial_sum,
    )


def run_paged_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim], last dim contiguous
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim], contiguous
    value_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim], contiguous
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    scale: float,
    plan: AttentionPlan,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim], contiguous
    """Launch paged attention by ``plan`` (made by ``plan_paged_attention`` from the same index
    tensors and a cache of the same shape). Only the query is checked, against the plan; this
    is the per-layer path, so it does no other work than the launches."""
    assert query.shape == (plan.num_tokens, plan.num_heads, plan.head_dim), "query shape"
    assert query.dtype == plan.dtype and query.stride(2) == 1, "query dtype or layout"
    out = torch.empty(query.shape, dtype=query.dtype, device=query.device)  # contiguous
    num_seqs = seq_lens.shape[0]
    if plan.num_tokens == 0 or num_seqs == 0:
        return out
    num_kv_heads = key_cache.shape[2]
    softcap_value = float(softcap) if softcap is not None and softcap > 0 else 0.0
    paged_attention_kernel[(plan.num_q_tiles, num_kv_heads, plan.num_splits)](
        out,
        plan.partial_out,
        plan.partial_max,
        plan.partial_sum,
        query,
        key_cache,
        value_cache,
        block_tables,
        seq_lens,
        query_start_loc,
        float(scale),
        softcap_value if softcap_value > 0 else 1.0,
        int(sliding_window) if sliding_window is not None else 0,
        num_seqs,
        plan.num_tokens,
        query.stride(0),
        query.stride(1),
        key_cache.stride(0),
        key_cache.stride(1),
        key_cache.stride(2),
        block_tables.stride(0),
        NUM_HEADS=plan.num_heads,
        GROUP=plan.num_heads // num_kv_heads,
        HEAD_DIM=plan.head_dim,
        BLOCK_SIZE=key_cache.shape[1],
        BLOCK_M=plan.block_m,
        BLOCK_Q=plan.block_q,
        TILE_N=TILE_N,
        NUM_SPLITS=plan.num_splits,
        USE_SOFTCAP=softcap_value > 0,
        USE_WINDOW=sliding_window is not None,
        UPCAST_DOT=query.dtype == torch.bfloat16 and query.device.type != "cuda",
        num_warps=4,
        # fp32 tiles take twice the shared memory: no software pipelining for them.
        num_stages=1 if query.dtype == torch.float32 else 2,
    )
    if plan.num_splits > 1:
        merge_splits_kernel[(plan.num_tokens, plan.num_heads)](
            out,
            plan.partial_out,
            plan.partial_max,
            plan.partial_sum,
            plan.num_tokens,
            NUM_HEADS=plan.num_heads,
            HEAD_DIM=plan.head_dim,
            NUM_SPLITS=plan.num_splits,
            SPLITS_PAD=triton.next_power_of_2(plan.num_splits),
        )
    return out


def choose_num_splits(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
) -> int:
    """Split-KV factor: enough programs to fill the device when there are few query tiles.

    Only shapes are used (no device sync): the key-length bound is the block table's width.
    Batches with more tokens than sequences (prefill) are never split, nor key ranges shorter
    than ``2 * MIN_TILES_PER_SPLIT`` tiles.
    """
    num_seqs, max_blocks = block_tables.shape
    num_kv_heads, block_size = key_cache.shape[2], key_cache.shape[1]
    return _num_splits(query.shape[0], num_seqs, max_blocks, num_kv_heads, block_size, query.device)


def _num_splits(
    num_tokens: int,
    num_seqs: int,
    max_blocks: int,
    num_kv_heads: int,
    block_size: int,
    device: torch.device,
) -> int:
    """``choose_num_splits`` from the sizes alone."""
    if num_tokens > num_seqs or num_seqs == 0:
        return 1
    programs = num_seqs * num_kv_heads
    target = 4 * _num_sms(device)  # a few resident programs per SM hide load latency
    if programs >= target:
        return 1
    max_tiles = triton.cdiv(max_blocks * block_size, TILE_N)
    max_splits = min(max_tiles // MIN_TILES_PER_SPLIT, MAX_SPLITS)
    return max(1, min(triton.cdiv(target, programs), max_splits))


def _block_m(group: int, decode_only: bool, dtype: torch.dtype) -> int:
    """Rows per query tile: a power of two >= 16 holding at least one full GQA group.

    Small tiles for decode (rows beyond the group are padding) and for float32, whose
    non-tensor-core dots spill registers on large tiles.
    """
    small = decode_only or dtype == torch.float32
    rows = DECODE_BLOCK_M if small else PREFILL_BLOCK_M
    return max(rows, triton.next_power_of_2(group))


@functools.lru_cache(maxsize=16)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 1 elsewhere (the interpreter)."""
    if device.type != "cuda":
        return 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _sm_count(index)


def _check_cache(key_cache: torch.Tensor, value_cache: torch.Tensor) -> None:
    assert key_cache.dim() == 4, "cache must be [num_blocks, block_size, num_kv_heads, head_dim]"
    assert key_cache.shape == value_cache.shape, "key/value cache shapes differ"
    assert key_cache.dtype == value_cache.dtype, "key/value cache dtypes differ"
    assert key_cache.dtype in SUPPORTED_DTYPES, f"unsupported cache dtype {key_cache.dtype}"
    assert key_cache.is_contiguous() and value_cache.is_contiguous(), "cache must be contiguous"


def _check_same_device(*tensors: torch.Tensor) -> None:
    devices = {t.device for t in tensors}
    assert len(devices) == 1, f"tensors on several devices: {devices}"


def _check_attention_args(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
) -> None:
    """Shape, dtype, layout and device preconditions of ``paged_attention``."""
    _check_cache(key_cache, value_cache)
    assert query.dim() == 3, "query must be [num_tokens, num_heads, head_dim]"
    assert query.dtype == key_cache.dtype, "query and cache dtypes differ"
    assert query.stride(2) == 1, "query's last dim must be contiguous"
    num_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads = key_cache.shape[2]
    assert key_cache.shape[3] == head_dim, "query and cache head_dim differ"
    assert head_dim >= 16 and head_dim & (head_dim - 1) == 0, "head_dim must be a power of two"
    assert num_heads % num_kv_heads == 0, "num_heads must be a multiple of num_kv_heads"
    _check_index_tensors(block_tables, seq_lens, query_start_loc, query.device)
    _check_same_device(query, key_cache, value_cache)


def _check_index_tensors(
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    device: torch.device,
) -> None:
    """Shapes, dtypes, layout and device of the batch's index tensors."""
    num_seqs = seq_lens.shape[0]
    assert block_tables.dim() == 2 and block_tables.shape[0] == num_seqs, "block_tables shape"
    assert seq_lens.dim() == 1, "seq_lens must be [num_seqs]"
    assert query_start_loc.shape == (num_seqs + 1,), "query_start_loc must be [num_seqs + 1]"
    for name, t in (
        ("block_tables", block_tables),
        ("seq_lens", seq_lens),
        ("query_start_loc", query_start_loc),
    ):
        assert t.dtype == torch.int32, f"{name} must be int32"
        assert t.is_contiguous(), f"{name} must be contiguous"
        assert t.device == device, f"{name} is on {t.device}, not {device}"
