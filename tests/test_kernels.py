"""Triton KV-cache kernels against the pure-torch references in ``kernels.reference``.

On a machine with CUDA the kernels run on the GPU; elsewhere they run on CPU tensors through the
Triton interpreter (``TRITON_INTERPRET=1``, set below before any kernel module is imported).
The interpreter is slow, so the cases keep head counts small where the contexts are long.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from kernels import ops, reference, triton_attention, triton_blocks  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOLERANCE = {  # (atol, rtol) of the outputs against the float32-softmax reference
    torch.float32: (2e-5, 1e-5),
    torch.float16: (4e-3, 4e-3),
    torch.bfloat16: (2e-2, 2e-2),
}
AttentionArgs = tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float
]
MIXED = [(1, 1328), (5, 18), (129, 463), (1, 1)]  # (query_len, kv_len) per sequence


class Batch:
    """A varlen batch over a paged cache with shuffled, scattered block tables.

    Cache slots that belong to no sequence hold NaN, so reading one poisons the output.
    """

    def __init__(
        self,
        cases: list[tuple[int, int]],  # (query_len, kv_len) per sequence
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        block_size: int,
        dtype: torch.dtype,
        seed: int = 0,
    ) -> None:
        gen = torch.Generator().manual_seed(seed)
        blocks_per_seq = [-(-kv // block_size) for _, kv in cases]
        max_blocks = max(blocks_per_seq) + 1  # one spare column of junk ids
        num_blocks = sum(blocks_per_seq) + 5  # a few blocks owned by nobody
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        key_cache = torch.full(shape, float("nan"))
        value_cache = torch.full(shape, float("nan"))
        perm = torch.randperm(num_blocks, generator=gen)
        block_tables = torch.randint(0, num_blocks, (len(cases), max_blocks), generator=gen)
        used = 0
        for seq, (_, kv_len) in enumerate(cases):
            ids = perm[used : used + blocks_per_seq[seq]]
            used += blocks_per_seq[seq]
            block_tables[seq, : ids.numel()] = ids
            slots = (ids[:, None] * block_size + torch.arange(block_size)).flatten()[:kv_len]
            for cache in (key_cache, value_cache):
                flat = cache.view(-1, num_kv_heads, head_dim)
                flat[slots] = torch.randn(kv_len, num_kv_heads, head_dim, generator=gen)
        q_lens = torch.tensor([q for q, _ in cases])
        query_start_loc = torch.zeros(len(cases) + 1, dtype=torch.int32)
        query_start_loc[1:] = q_lens.cumsum(0)
        query = torch.randn(int(q_lens.sum()), num_heads, head_dim, generator=gen)

        self.query = query.to(DEVICE, dtype)
        self.key_cache = key_cache.to(DEVICE, dtype)
        self.value_cache = value_cache.to(DEVICE, dtype)
        self.block_tables = block_tables.to(DEVICE, torch.int32)
        self.seq_lens = torch.tensor([kv for _, kv in cases], dtype=torch.int32, device=DEVICE)
        self.query_start_loc = query_start_loc.to(DEVICE)
        self.scale = head_dim**-0.5

    def args(self) -> AttentionArgs:
        return (
            self.query,
            self.key_cache,
            self.value_cache,
            self.block_tables,
            self.seq_lens,
            self.query_start_loc,
            self.scale,
        )


def _assert_matches_reference(
    batch: Batch,
    sliding_window: int | None = None,
    softcap: float | None = None,
    num_splits: int | None = None,
) -> None:
    """The Triton kernel (heuristic or explicit split factor) equals the reference."""
    out = triton_attention.paged_attention(
        *batch.args(), sliding_window=sliding_window, softcap=softcap, num_splits=num_splits
    )
    ref = reference.paged_attention_ref(
        *batch.args(), sliding_window=sliding_window, softcap=softcap
    )
    assert out.shape == ref.shape and out.dtype == ref.dtype
    atol, rtol = TOLERANCE[batch.query.dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=rtol)


# ---------------------------------------------------------------------------------------------
# paged attention
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("head_dim", "block_size"), [(64, 32), (128, 16)])
@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(2, 2), (6, 2), (8, 1)])
def test_paged_attention_mixed_batch(
    dtype: torch.dtype, head_dim: int, block_size: int, num_heads: int, num_kv_heads: int
) -> None:
    """Decode, prefill and prefill over a cached prefix in one batch; GQA ratios 1, 3, 8."""
    batch = Batch(MIXED, num_heads, num_kv_heads, head_dim, block_size, dtype)
    _assert_matches_reference(batch)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block_size", [16, 32])
def test_paged_attention_decode_batch(dtype: torch.dtype, block_size: int) -> None:
    """A decode-only batch (one new token per sequence) takes the small-tile path."""
    cases = [(1, 1), (1, 17), (1, 300), (1, 64), (1, 1328)]
    batch = Batch(cases, 4, 1, 128, block_size, dtype, seed=1)
    _assert_matches_reference(batch)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_splits", [2, 3, 8])
def test_paged_attention_split_kv(dtype: torch.dtype, num_splits: int) -> None:
    """Split-KV (flash-decoding) partials merge to the same result, empty splits included."""
    cases = [(1, 1328), (1, 5), (1, 100), (1, 1)]
    batch = Batch(cases, 8, 8, 64, 16, dtype, seed=2)
    _assert_matches_reference(batch, num_splits=num_splits)


@pytest.mark.parametrize(("dtype", "num_splits"), [(torch.float32, 1), (torch.float16, 4)], ids=str)
@pytest.mark.parametrize("sliding_window", [1, 7, 64, 200, 5000])
def test_paged_attention_sliding_window(
    sliding_window: int, dtype: torch.dtype, num_splits: int
) -> None:
    """Keys at positions > q_pos - W only; windows shorter than, spanning and beyond a block."""
    cases = [(1, 1328), (5, 18), (129, 463), (1, 1), (1, 250)]
    if sliding_window < 1000:  # windows starting on the last / first key of a key tile
        tile, w = triton_attention.TILE_N, sliding_window
        cases += [(1, tile - 1 + w), (1, tile + w), (3, tile + w + 1)]
    batch = Batch(cases, 6, 2, 64, 16, dtype, seed=3)
    _assert_matches_reference(batch, sliding_window=sliding_window, num_splits=num_splits)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sliding_window", [None, 100])
def test_paged_attention_softcap(dtype: torch.dtype, sliding_window: int | None) -> None:
    """Logit softcap ``c * tanh(s / c)`` before masking, with and without a window."""
    batch = Batch(MIXED, 6, 2, 128, 32, dtype, seed=4)
    batch.query = batch.query * 4  # large logits so the cap matters
    _assert_matches_reference(batch, sliding_window=sliding_window, softcap=5.0)


def test_paged_attention_empty_query_sequences() -> None:
    """Sequences with no new tokens (query_len 0) are skipped, the others unaffected."""
    batch = Batch([(0, 40), (3, 40), (0, 1), (1, 77)], 4, 2, 64, 16, torch.float32, seed=5)
    _assert_matches_reference(batch)


def test_paged_attention_strided_query() -> None:
    """A transposed query view (as the engine passes it) gives a contiguous, correct output."""
    batch = Batch([(7, 30), (1, 90)], 4, 2, 64, 16, torch.float16, seed=6)
    batch.query = batch.query.transpose(0, 1).contiguous().transpose(0, 1)
    assert not batch.query.is_contiguous()
    _assert_matches_reference(batch)


def test_paged_attention_rejects_bad_arguments() -> None:
    batch = Batch([(2, 20)], 4, 2, 64, 16, torch.float32)
    with pytest.raises(AssertionError, match="int32"):
        triton_attention.paged_attention(
            batch.query,
            batch.key_cache,
            batch.value_cache,
            batch.block_tables.long(),
            batch.seq_lens,
            batch.query_start_loc,
            batch.scale,
        )
    with pytest.raises(AssertionError, match="multiple"):
        triton_attention.paged_attention(batch.query[:, :3], *batch.args()[1:])


# ---------------------------------------------------------------------------------------------
# store_kv
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("src_dtype", "cache_dtype"),
    [
        (torch.float32, torch.float32),
        (torch.float16, torch.float16),
        (torch.bfloat16, torch.bfloat16),
        (torch.float32, torch.bfloat16),
    ],
    ids=str,
)
@pytest.mark.parametrize(("num_kv_heads", "head_dim", "block_size"), [(2, 64, 16), (3, 128, 32)])
def test_store_kv(
    src_dtype: torch.dtype,
    cache_dtype: torch.dtype,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
) -> None:
    """Tokens land in their (shuffled) slots, ``-1`` slots are skipped, the rest is untouched."""
    gen = torch.Generator().manual_seed(7)
    num_blocks, num_tokens = 6, 40
    cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)
    key_cache = torch.randn(cache_shape, generator=gen).to(DEVICE, cache_dtype)
    value_cache = torch.randn(cache_shape, generator=gen).to(DEVICE, cache_dtype)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[::7] = -1
    slot_mapping = slots.to(DEVICE)
    # Strided K/V, as the engine passes them: transposed from [num_kv_heads, num_tokens, dim].
    shape = (num_kv_heads, num_tokens, head_dim)
    key = torch.randn(shape, generator=gen).to(DEVICE, src_dtype).transpose(0, 1)
    value = torch.randn(shape, generator=gen).to(DEVICE, src_dtype).transpose(0, 1)

    expected_k, expected_v = key_cache.clone(), value_cache.clone()
    reference.store_kv_ref(key, value, expected_k, expected_v, slot_mapping)
    triton_attention.store_kv(key, value, key_cache, value_cache, slot_mapping)
    # Casting may round differently (the interpreter truncates to bf16): allow one ulp.
    rtol = 0.0 if src_dtype == cache_dtype else 2**-7 + 1e-6
    torch.testing.assert_close(key_cache, expected_k, atol=0, rtol=rtol)
    torch.testing.assert_close(value_cache, expected_v, atol=0, rtol=rtol)


# ---------------------------------------------------------------------------------------------
# block moves
# ---------------------------------------------------------------------------------------------

POOL_SHAPES = [  # (num_layers, num_blocks, block_size, num_kv_heads, head_dim)
    (3, 10, 16, 2, 64),  # block of 2048 elements: one chunk
    (2, 9, 32, 2, 128),  # 8192 elements: two chunks
    (2, 7, 16, 3, 64),  # 3072 elements: a masked, non-power-of-two chunk
]


def _pool(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    num_layers, num_blocks, block_size, num_kv_heads, head_dim = shape
    gen = torch.Generator().manual_seed(seed)
    pool_shape = (num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim)
    return torch.randn(pool_shape, generator=gen).to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", POOL_SHAPES)
def test_gather_blocks(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    kv_cache = _pool(shape, dtype, seed=8)
    block_ids = torch.tensor([4, 0, 6, 2])  # CPU ids, as the swap manager may pass them
    staged = triton_blocks.gather_blocks(kv_cache, block_ids)
    expected = reference.gather_blocks_ref(kv_cache, block_ids)
    assert staged.is_contiguous() and staged.shape == expected.shape
    torch.testing.assert_close(staged, expected, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", POOL_SHAPES)
def test_scatter_blocks(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    kv_cache = _pool(shape, dtype, seed=9)
    block_ids = torch.tensor([5, 1, 3], device=DEVICE)
    num_layers, _, block_size, num_kv_heads, head_dim = shape
    staged_shape = (num_layers, 2, 3, block_size, num_kv_heads, head_dim)
    staged = torch.randn(staged_shape).to(dtype)  # on the host, as after a swap-out
    expected = kv_cache.clone()
    reference.scatter_blocks_ref(expected, block_ids, staged)
    triton_blocks.scatter_blocks(kv_cache, block_ids, staged)
    torch.testing.assert_close(kv_cache, expected, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("shape", POOL_SHAPES)
def test_copy_blocks(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    kv_cache = _pool(shape, dtype, seed=10)
    src = torch.tensor([0, 2, 2, 5], device=DEVICE)  # a block may be forked twice
    dst = torch.tensor([6, 1, 4, 3], device=DEVICE)
    expected = kv_cache.clone()
    reference.copy_blocks_ref(expected, src, dst)
    triton_blocks.copy_blocks(kv_cache, src, dst)
    torch.testing.assert_close(kv_cache, expected, atol=0, rtol=0)


def test_block_moves_with_no_blocks() -> None:
    kv_cache = _pool(POOL_SHAPES[0], torch.float32, seed=11)
    before = kv_cache.clone()
    none = torch.empty(0, dtype=torch.int64)
    assert triton_blocks.gather_blocks(kv_cache, none).shape[2] == 0
    triton_blocks.scatter_blocks(kv_cache, none, reference.gather_blocks_ref(kv_cache, none))
    triton_blocks.copy_blocks(kv_cache, none, none)
    assert torch.equal(kv_cache, before)


# ---------------------------------------------------------------------------------------------
# dispatch
# ---------------------------------------------------------------------------------------------


class _Spy:
    """Counts calls, then forwards to the wrapped function."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self.fn(*args, **kwargs)


def _spy_on_triton(monkeypatch: pytest.MonkeyPatch) -> dict[str, _Spy]:
    spies = {}
    for module, name in [
        (triton_attention, "launch_store_kv"),
        (triton_attention, "run_paged_attention"),
        (triton_blocks, "gather_blocks"),
        (triton_blocks, "scatter_blocks"),
    ]:
        spies[name] = _Spy(getattr(module, name))
        monkeypatch.setattr(module, name, spies[name])
    return spies


def _run_all_ops(device: torch.device) -> None:
    """Call every ``kernels.ops`` function on ``device`` and compare with the references."""
    batch = Batch([(3, 20), (1, 9)], 4, 2, 64, 16, torch.float32, seed=12)
    query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, scale = batch.args()
    args: AttentionArgs = (
        query.to(device),
        key_cache.to(device),
        value_cache.to(device),
        block_tables.to(device),
        seq_lens.to(device),
        query_start_loc.to(device),
        scale,
    )
    query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, _ = args
    key = torch.randn(4, 2, 64, device=device)
    slots = torch.tensor([3, -1, 40, 41], device=device)
    plan = ops.plan_attention(4, key_cache, slots, block_tables, seq_lens, query_start_loc)
    expected_cache = key_cache.clone()
    ops.store_kv_planned(key, key, key_cache, value_cache, plan)
    assert torch.equal(key_cache.view(-1, 2, 64)[3], key[0])
    assert torch.equal(key_cache.view(-1, 2, 64)[40], key[2])
    expected_cache.view(-1, 2, 64)[[3, 40, 41]] = key[[0, 2, 3]]
    # slot -1 skipped, nothing else written (unused slots hold NaN)
    torch.testing.assert_close(key_cache, expected_cache, rtol=0, atol=0, equal_nan=True)
    out = ops.paged_attention_planned(query, key_cache, value_cache, plan, scale)
    expected = reference.paged_attention_ref(
        query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, scale
    )
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-5)

    kv_cache = _pool(POOL_SHAPES[0], torch.float32, seed=13).to(device)
    ids = torch.tensor([1, 3], device=device)
    staged = ops.gather_blocks(kv_cache, ids)
    assert torch.equal(staged, reference.gather_blocks_ref(kv_cache, ids))
    ops.scatter_blocks(kv_cache, torch.tensor([5, 6], device=device), staged)
    assert torch.equal(kv_cache[:, :, 5:7], staged)


def test_ops_falls_back_to_torch_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """CPU tensors never reach Triton; results match the references."""
    spies = _spy_on_triton(monkeypatch)
    assert not ops._use_triton(torch.zeros(1))
    _run_all_ops(torch.device("cpu"))
    assert all(spy.calls == 0 for spy in spies.values())


def test_ops_dispatches_by_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA every op goes through Triton; on CPU none does."""
    spies = _spy_on_triton(monkeypatch)
    _run_all_ops(DEVICE)
    expected_calls = 1 if DEVICE.type == "cuda" else 0
    assert {name: spy.calls for name, spy in spies.items()} == dict.fromkeys(spies, expected_calls)


# ---------------------------------------------------------------------------------------------
# planned per-layer calls (the engine's path)
# ---------------------------------------------------------------------------------------------

PLANNED_PATHS = ["torch", "triton"] if DEVICE.type == "cpu" else ["triton"]


@pytest.mark.parametrize("path", PLANNED_PATHS)
@pytest.mark.parametrize(
    ("cases", "num_kv_heads"),
    [([(3, 20), (1, 9), (1, 40)], 2), ([(1, 600), (1, 530)], 1)],  # mixed; split-KV decode
    ids=["mixed", "split"],
)
def test_planned_layers_match_the_references(
    monkeypatch: pytest.MonkeyPatch, path: str, cases: list[tuple[int, int]], num_kv_heads: int
) -> None:
    """One plan serves several layers (its split-KV scratch included): each layer's planned
    store_kv + paged attention equals the references. On a CPU-only machine the Triton path
    runs in the interpreter."""
    if path == "triton":
        monkeypatch.setattr(ops, "_use_triton", lambda tensor: True)
    batch = Batch(cases, 4, num_kv_heads, 64, 16, torch.float32, seed=14)
    _, key_cache, value_cache, block_tables, seq_lens, query_start_loc, scale = batch.args()
    block_size = key_cache.shape[1]
    slots = []  # the new tokens are each sequence's last q_len positions
    for seq_idx, (q_len, kv_len) in enumerate(cases):
        for pos in range(kv_len - q_len, kv_len):
            block_id = int(block_tables[seq_idx, pos // block_size])
            slots.append(block_id * block_size + pos % block_size)
    slot_mapping = torch.tensor(slots, device=DEVICE)
    plan = ops.plan_attention(4, key_cache, slot_mapping, block_tables, seq_lens, query_start_loc)
    assert (plan.triton_plan is not None) == (path == "triton")
    if path == "triton" and DEVICE.type == "cpu" and num_kv_heads == 1:
        assert plan.triton_plan is not None and plan.triton_plan.num_splits > 1
    gen = torch.Generator().manual_seed(15)
    for _layer in range(2):
        caches = (key_cache.clone(), value_cache.clone())
        expected = (key_cache.clone(), value_cache.clone())
        shape = (len(slots), num_kv_heads, 64)
        key, value = (torch.randn(shape, generator=gen).to(DEVICE) for _ in range(2))
        query = torch.randn(len(slots), 4, 64, generator=gen).to(DEVICE)
        ops.store_kv_planned(key, value, *caches, plan)
        out = ops.paged_attention_planned(query, *caches, plan, scale)
        reference.store_kv_ref(key, value, *expected, slot_mapping)
        ref = reference.paged_attention_ref(
            query, *expected, block_tables, seq_lens, query_start_loc, scale
        )
        torch.testing.assert_close(caches, expected, atol=0, rtol=0, equal_nan=True)
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)
