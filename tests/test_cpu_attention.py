"""The engine's CPU attention paths against the pure-torch reference.

Both paths are checked: the compiled kernel for short queries (``kernels.cpu_native``, float32)
and the torch decode groups it falls back to (no C compiler, other dtypes). Cache slots that
belong to no sequence hold NaN, so reading one poisons the output.
"""

from __future__ import annotations

import pytest
import torch

from kernels import cpu_native, native_build, ops
from kernels.cpu_attention import (
    NATIVE_MAX_QUERY_LEN,
    paged_attention_cpu,
    plan_paged_attention_cpu,
    run_paged_attention_cpu,
)
from kernels.reference import paged_attention_ref

CASES = [  # (query_len, kv_len) per sequence of one batch
    [(1, 1328), (5, 18), (129, 463), (1, 1)],  # prefill chunks and decodes mixed
    [(1, 40), (1, 17), (1, 3)],  # decode rows in three length groups
    [(1, 40), (1, 33), (1, 21), (0, 9)],  # decode only, one group (its output is the output)
    [(1, 1500), (1, 1490), (1, 1510), (1, 1400)],  # groups split by MAX_GROUP_KEYS
    [(64, 64), (7, 7)],  # prefills with nothing cached
    [(1, 5000)],  # one long row: its keys are split into items and merged
    [(1, 900 + 13 * i) for i in range(16)] + [(512, 1536)],  # batch 16 decode + a long chunk
    [(2, 2), (1, 17), (3, 50)],  # short multi-token queries (speculative-decoding shape)
    [(4, 1500), (8, 900), (3, 3), (1, 100), (6, 2100)],  # speculative runs, split into items
]
HEADS = [(4, 4), (9, 3), (8, 1)]  # (num_heads, num_kv_heads): MHA, SmolLM2's GQA, MQA


def _batch(cases, num_heads, num_kv_heads, head_dim, block_size, dtype, seed=0):
    """(query, key_cache, value_cache, block_tables, seq_lens, query_start_loc) with each
    sequence's blocks scattered over a shuffled pool; every slot past a sequence's length,
    and every block of nobody, is NaN."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-kv // block_size) for _, kv in cases]
    num_blocks = sum(blocks_per_seq) + 3
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    key_cache = torch.full(shape, float("nan"))
    value_cache = torch.full(shape, float("nan"))
    perm = torch.randperm(num_blocks, generator=gen)
    block_tables = torch.zeros(len(cases), max(blocks_per_seq), dtype=torch.int32)
    used = 0
    for seq_idx, (_, kv_len) in enumerate(cases):
        ids = perm[used : used + blocks_per_seq[seq_idx]]
        used += ids.numel()
        block_tables[seq_idx, : ids.numel()] = ids.int()
        slots = (ids[:, None] * block_size + torch.arange(block_size)).flatten()[:kv_len]
        for cache in (key_cache, value_cache):
            fresh = torch.randn(kv_len, num_kv_heads, head_dim, generator=gen)
            cache.view(-1, num_kv_heads, head_dim)[slots] = fresh
    q_lens = [q for q, _ in cases]
    query_start_loc = torch.zeros(len(cases) + 1, dtype=torch.int32)
    query_start_loc[1:] = torch.cumsum(torch.tensor(q_lens), 0)
    query = torch.randn(sum(q_lens), num_heads, head_dim, generator=gen)
    seq_lens = torch.tensor([kv for _, kv in cases], dtype=torch.int32)
    tensors = (query, key_cache, value_cache)
    return (*(t.to(dtype) for t in tensors), block_tables, seq_lens, query_start_loc)


def _planned(args, native, scale, sliding_window=None):
    """The CPU attention of ``args`` through an explicit plan (``native``: compiled rows)."""
    query, key_cache, value_cache, block_tables, seq_lens, query_start_loc = args
    block_size = key_cache.shape[1]
    plan = plan_paged_attention_cpu(block_tables, seq_lens, query_start_loc, block_size, native)
    q_lens = query_start_loc.diff()
    short = (q_lens >= 1) & (q_lens <= NATIVE_MAX_QUERY_LEN)
    assert (plan.native_rows is not None) == (native and bool(short.any()))
    return run_paged_attention_cpu(query, key_cache, value_cache, plan, scale, sliding_window)


def test_compiled_kernel_builds_here():
    """This machine has a C compiler, so the engine's float32 CPU path is the compiled one."""
    assert cpu_native.load_paged_rows() is not None
    assert cpu_native.supports(torch.empty(4, 16, 3, 64), 9)
    assert not cpu_native.supports(torch.empty(4, 16, 3, 64, dtype=torch.bfloat16), 9)


def test_build_into_a_fresh_directory(tmp_path):
    """A cold cache compiles the kernel; the library exports the entry point."""
    import ctypes

    library = tmp_path / "kernels" / "paged_rows-test.so"
    native_build.build(cpu_native.SOURCE, library)
    assert hasattr(ctypes.CDLL(str(library)), "tarry_paged_rows_f32")
    assert [p.name for p in library.parent.iterdir()] == [library.name]  # no temp file left


@pytest.mark.parametrize("native", [True, False], ids=["compiled", "torch"])
@pytest.mark.parametrize("cases", CASES)
@pytest.mark.parametrize(("num_heads", "num_kv_heads"), HEADS)
@pytest.mark.parametrize("sliding_window", [None, 32, 700])
def test_cpu_attention_matches_reference(cases, num_heads, num_kv_heads, sliding_window, native):
    args = _batch(cases, num_heads, num_kv_heads, 64, 16, torch.float32)
    expected = paged_attention_ref(*args, 0.125, sliding_window=sliding_window)
    actual = _planned(args, native, 0.125, sliding_window)
    torch.testing.assert_close(actual, expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize(("head_dim", "block_size"), [(128, 32), (32, 8), (80, 128)])
def test_compiled_rows_other_shapes(head_dim, block_size):
    args = _batch(CASES[0] + [(1, 3000)], 6, 2, head_dim, block_size, torch.float32)
    expected = paged_attention_ref(*args, head_dim**-0.5, sliding_window=100)
    actual = _planned(args, True, head_dim**-0.5, sliding_window=100)
    torch.testing.assert_close(actual, expected, atol=2e-5, rtol=1e-4)


def test_long_rows_are_split_into_items():
    """One long row is spread over several items (split-K); many rows get one item each."""
    lengths = torch.tensor([5000], dtype=torch.int32)
    one = plan_paged_attention_cpu(
        torch.arange(313).view(1, -1).int(), lengths, torch.tensor([0, 1]).int(), 16, True
    )
    assert one.native_rows is not None and one.native_rows.item_run.shape[0] >= 2
    assert one.native_rows.item_end[-1] == 5000 and one.native_rows.item_begin[0] == 0
    many = plan_paged_attention_cpu(
        torch.arange(64 * 64).view(64, 64).int(),
        torch.full((64,), 1000, dtype=torch.int32),
        torch.arange(65).int(),
        16,
        True,
    )
    assert many.native_rows is not None
    assert many.native_rows.run_first_item.tolist() == list(range(65))


def test_engine_plan_uses_compiled_rows_for_float32():
    """``ops.plan_attention`` (the model runner's) picks the compiled kernel on the CPU."""
    query, key_cache, value_cache, block_tables, seq_lens, query_start_loc = _batch(
        CASES[0], 9, 3, 64, 16, torch.float32
    )
    slot_mapping = torch.full((query.shape[0],), -1, dtype=torch.int64)
    batch = ops.plan_attention(9, key_cache, slot_mapping, block_tables, seq_lens, query_start_loc)
    assert batch.cpu_plan is not None and batch.cpu_plan.native_rows is not None
    actual = ops.paged_attention_planned(query, key_cache, value_cache, batch, 0.125)
    args = (query, key_cache, value_cache, block_tables, seq_lens, query_start_loc)
    torch.testing.assert_close(actual, paged_attention_ref(*args, 0.125), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_attention_half_precision(dtype):
    """Half precision takes the torch path (the compiled kernel is float32 only)."""
    args = _batch(CASES[0], 8, 2, 128, 32, dtype)
    expected = paged_attention_ref(*args, 0.09)
    actual = paged_attention_cpu(*args, 0.09)
    assert actual.dtype == dtype
    torch.testing.assert_close(actual.float(), expected.float(), atol=2e-2, rtol=2e-2)


def test_softcap_falls_back_to_reference():
    args = _batch(CASES[1], 4, 2, 64, 16, torch.float32)
    expected = paged_attention_ref(*args, 0.125, softcap=30.0)
    torch.testing.assert_close(paged_attention_cpu(*args, 0.125, softcap=30.0), expected)
