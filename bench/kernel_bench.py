"""Achieved memory bandwidth of the Triton decode paged-attention kernel.

Usage (from the repository root, on a machine with CUDA)::

    python bench/kernel_bench.py [--iters 50]

For each context length (4k and 32k tokens) it runs a decode step (one new token per sequence,
bf16, 8 KV heads, 32 query heads, head dim 128, block size 16, shuffled block tables) and reports
the K/V bytes read per second. It compares that with the device copy bandwidth measured by
cloning a large tensor, counted the same way as ``bandwidthTest``: bytes read + bytes written.
Without CUDA it prints that a GPU is needed and exits 0.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
GIB = 1024**3


@dataclass(frozen=True)
class DecodeCase:
    """One decode batch: ``batch`` sequences of ``context`` cached tokens each."""

    context: int
    batch: int
    num_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128
    block_size: int = 16
    dtype: torch.dtype = torch.bfloat16

    def kv_bytes(self) -> int:
        """Bytes of K and V one decode step must read."""
        per_token = 2 * self.num_kv_heads * self.head_dim * self.dtype.itemsize
        return self.batch * self.context * per_token


CASES = [DecodeCase(context=4096, batch=32), DecodeCase(context=32768, batch=8)]


def _triton_attention() -> ModuleType:
    """``kernels.triton_attention``, importable when run as ``python bench/kernel_bench.py``."""
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    from kernels import triton_attention

    return triton_attention


def cuda_seconds_per_call(fn: Callable[[], object], iters: int, warmup: int = 3) -> float:
    """Mean GPU time of ``fn`` over ``iters`` back-to-back calls, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000.0 / iters


def copy_bandwidth(nbytes: int, iters: int) -> float:
    """Device copy bandwidth in bytes/s (read + write) from cloning an ``nbytes`` tensor."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    src.fill_(1)
    seconds = cuda_seconds_per_call(src.clone, iters)
    return 2 * nbytes / seconds


def _decode_inputs(case: DecodeCase) -> tuple:
    """Random query, caches and shuffled block tables for ``case`` on the GPU."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    blocks_per_seq = -(-case.context // case.block_size)
    num_blocks = case.batch * blocks_per_seq
    cache_shape = (num_blocks, case.block_size, case.num_kv_heads, case.head_dim)
    key_cache = torch.randn(cache_shape, generator=gen, device="cuda", dtype=case.dtype)
    value_cache = torch.randn(cache_shape, generator=gen, device="cuda", dtype=case.dtype)
    perm = torch.randperm(num_blocks, generator=gen, device="cuda")
    block_tables = perm.view(case.batch, blocks_per_seq).to(torch.int32)
    seq_lens = torch.full((case.batch,), case.context, dtype=torch.int32, device="cuda")
    query_start_loc = torch.arange(case.batch + 1, dtype=torch.int32, device="cuda")
    query_shape = (case.batch, case.num_heads, case.head_dim)
    query = torch.randn(query_shape, generator=gen, device="cuda", dtype=case.dtype)
    scale = case.head_dim**-0.5
    return query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, scale


def bench_decode(case: DecodeCase, iters: int) -> tuple[float, float, int, float]:
    """(bytes/s, seconds per call, split factor, max abs error vs the reference)."""
    attention = _triton_attention()
    from kernels import reference

    args = _decode_inputs(case)
    out = attention.paged_attention(*args)
    ref = reference.paged_attention_ref(*args)
    max_err = (out.float() - ref.float()).abs().max().item()
    del ref
    seconds = cuda_seconds_per_call(lambda: attention.paged_attention(*args), iters)
    splits = attention.choose_num_splits(args[0], args[1], args[3])
    return case.kv_bytes() / seconds, seconds, splits, max_err


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=50, help="timed calls per measurement")
    parser.add_argument("--copy-gib", type=float, default=2.0, help="size of the copy tensor")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("kernel_bench: needs a CUDA GPU; none found, nothing measured.")
        return 0

    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}", flush=True)
    copy_bw = copy_bandwidth(int(args.copy_gib * GIB), args.iters)
    print(f"copy bandwidth (torch clone, read + write): {copy_bw / 1e9:8.1f} GB/s", flush=True)
    for case in CASES:
        bw, seconds, splits, max_err = bench_decode(case, args.iters)
        print(
            f"decode ctx={case.context:>6} batch={case.batch:>3} heads={case.num_heads}/"
            f"{case.num_kv_heads} d={case.head_dim} bs={case.block_size} bf16 splits={splits:>2}: "
            f"{seconds * 1e6:8.1f} us, K/V {case.kv_bytes() / GIB:.2f} GiB, "
            f"{bw / 1e9:8.1f} GB/s = {bw / copy_bw:5.1%} of copy (max err {max_err:.1e})",
            flush=True,
        )
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
