"""The engine's CPU attention path against the pure-torch reference."""

from __future__ import annotations

import pytest
import torch

from kernels.cpu_attention import paged_attention_cpu
from kernels.reference import paged_attention_ref

CASES = [  # (query_len, kv_len) per sequence of one batch
    [(1, 1328), (5, 18), (129, 463), (1, 1)],
    [(1, 40), (1, 17), (1, 3)],  # decode rows in three length groups
    [(1, 40), (1, 33), (1, 21), (0, 9)],  # decode only, one group (its output is the output)
    [(1, 1500), (1, 1490), (1, 1510), (1, 1400)],  # groups split by MAX_GROUP_KEYS
    [(64, 64), (7, 7)],
]


def _batch(cases, num_heads, num_kv_heads, head_dim, block_size, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    max_blocks = max(-(-kv // block_size) for _, kv in cases)
    num_blocks = max_blocks * len(cases) + 3
    key_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen)
    value_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen)
    perm = torch.randperm(num_blocks, generator=gen)  # scattered, non-contiguous block tables
    block_tables = perm[: max_blocks * len(cases)].view(len(cases), max_blocks).int()
    q_lens = [q for q, _ in cases]
    query_start_loc = torch.zeros(len(cases) + 1, dtype=torch.int32)
    query_start_loc[1:] = torch.cumsum(torch.tensor(q_lens), 0)
    query = torch.randn(sum(q_lens), num_heads, head_dim, generator=gen)
    seq_lens = torch.tensor([kv for _, kv in cases], dtype=torch.int32)
    tensors = (query, key_cache, value_cache)
    return (*(t.to(dtype) for t in tensors), block_tables, seq_lens, query_start_loc)


@pytest.mark.parametrize("cases", CASES)
@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(4, 4), (9, 3), (8, 1)])
@pytest.mark.parametrize("sliding_window", [None, 32])
def test_cpu_attention_matches_reference(cases, num_heads, num_kv_heads, sliding_window):
    args = _batch(cases, num_heads, num_kv_heads, 64, 16, torch.float32)
    expected = paged_attention_ref(*args, 0.125, sliding_window=sliding_window)
    actual = paged_attention_cpu(*args, 0.125, sliding_window=sliding_window)
    torch.testing.assert_close(actual, expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_attention_half_precision(dtype):
    args = _batch(CASES[0], 8, 2, 128, 32, dtype)
    expected = paged_attention_ref(*args, 0.09)
    actual = paged_attention_cpu(*args, 0.09)
    assert actual.dtype == dtype
    torch.testing.assert_close(actual.float(), expected.float(), atol=2e-2, rtol=2e-2)


def test_softcap_falls_back_to_reference():
    args = _batch(CASES[1], 4, 2, 64, 16, torch.float32)
    expected = paged_attention_ref(*args, 0.125, softcap=30.0)
    torch.testing.assert_close(paged_attention_cpu(*args, 0.125, softcap=30.0), expected)
