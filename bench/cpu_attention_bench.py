"""CPU paged attention: this tree's ``kernels/cpu_attention.py`` against an older version of it.

Usage (from the repository root)::

    python -m bench.cpu_attention_bench [--baseline-rev f659842] [--repeats 7] [--model]
                                        [--threads N] [--only mixed]

The baseline is the file ``kernels/cpu_attention.py`` at ``--baseline-rev`` (read with ``git
show`` into a temporary module; default: the commit before the compiled decode kernel), run in
the same process on the same inputs, alternating with the current code so that load from other
processes hits both alike. Shapes are SmolLM2-135M's (9 query heads, 3 KV heads, head dim 64,
float32, block size 16, shuffled block tables), ``torch.get_num_threads()`` threads. Cases:

* prefill: one 2048-token sequence, nothing cached
* decode: batch 1 (1024 keys) and batch 16 (contexts 900..1100)
* mixed: 4 decodes (~1k keys) + one 512-token chunk after 1024 cached tokens

For each case it prints the median over ``--repeats`` rounds of one layer's attention call
(the per-step plan made once, outside the timing, as the engine does; the plan's own time is
printed too) and the ratio old / new. With ``--model`` it also times a whole SmolLM2-135M forward
(``ModelRunner.execute``, 30 layers) of the same batches with each version plugged into
``kernels.ops``.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from kernels import cpu_attention, cpu_native, ops

REPO_ROOT = Path(__file__).resolve().parents[1]
NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 9, 3, 64, 16
CASES: dict[str, list[tuple[int, int]]] = {  # (query_len, kv_len) per sequence
    "prefill 2048": [(2048, 2048)],
    "decode b=1 1k": [(1, 1024)],
    "decode b=16 ~1k": [(1, 900 + 13 * i) for i in range(16)],
    "mixed 4 dec + 512 chunk": [(1, 1000), (1, 1040), (1, 980), (1, 1100), (512, 1536)],
}


def load_baseline(rev: str) -> ModuleType:
    """``kernels/cpu_attention.py`` as of git revision ``rev``, as a fresh module."""
    source = subprocess.run(
        ["git", "show", f"{rev}:kernels/cpu_attention.py"],
        cwd=REPO_ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    path = Path(tempfile.mkdtemp()) / "cpu_attention_baseline.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("cpu_attention_baseline", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_batch(cases: list[tuple[int, int]], seed: int = 0) -> tuple[Any, ...]:
    """(query, key_cache, value_cache, block_tables, seq_lens, query_start_loc) with every
    sequence's blocks scattered over a shuffled pool."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-kv // BLOCK_SIZE) for _, kv in cases]
    num_blocks = sum(blocks_per_seq) + 8
    shape = (num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    key_cache = torch.randn(shape, generator=gen)
    value_cache = torch.randn(shape, generator=gen)
    perm = torch.randperm(num_blocks, generator=gen)
    block_tables = torch.zeros(len(cases), max(blocks_per_seq), dtype=torch.int32)
    used = 0
    for seq_idx, count in enumerate(blocks_per_seq):
        block_tables[seq_idx, :count] = perm[used : used + count]
        used += count
    q_lens = torch.tensor([q for q, _ in cases])
    query_start_loc = torch.zeros(len(cases) + 1, dtype=torch.int32)
    query_start_loc[1:] = q_lens.cumsum(0)
    query = torch.randn(int(q_lens.sum()), NUM_HEADS, HEAD_DIM, generator=gen)
    seq_lens = torch.tensor([kv for _, kv in cases], dtype=torch.int32)
    return query, key_cache, value_cache, block_tables, seq_lens, query_start_loc


def seconds(fn: Callable[[], object], min_time: float = 0.2, warmup: bool = True) -> float:
    """Mean seconds per call of ``fn`` over at least ``min_time`` (after one warm-up call)."""
    if warmup:
        fn()
    calls, start = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_time:
            return elapsed / calls


def layer_callers(baseline: ModuleType, batch: tuple[Any, ...]) -> dict[str, Any]:
    """Per version: (plan seconds, the per-layer call), plans made once like the engine's."""
    query, key_cache, value_cache, block_tables, seq_lens, query_start_loc = batch
    index = (block_tables, seq_lens, query_start_loc, BLOCK_SIZE)
    native = cpu_native.supports(key_cache, NUM_HEADS)
    old_plan = baseline.plan_paged_attention_cpu(*index)
    new_plan = cpu_attention.plan_paged_attention_cpu(*index, native)
    scale = HEAD_DIM**-0.5
    return {
        "old": (
            lambda: baseline.plan_paged_attention_cpu(*index),
            lambda: baseline.run_paged_attention_cpu(
                query, key_cache, value_cache, old_plan, scale
            ),
        ),
        "new": (
            lambda: cpu_attention.plan_paged_attention_cpu(*index, native),
            lambda: cpu_attention.run_paged_attention_cpu(
                query, key_cache, value_cache, new_plan, scale
            ),
        ),
    }


def bench_layers(baseline: ModuleType, repeats: int, names: list[str]) -> None:
    for name in names:
        cases = CASES[name]
        batch = make_batch(cases)
        callers = layer_callers(baseline, batch)
        ref = callers["old"][1]()
        err = (callers["new"][1]() - ref).abs().max().item()
        times: dict[str, list[float]] = {"old": [], "new": [], "old plan": [], "new plan": []}
        for _ in range(repeats):
            for version, (plan, call) in callers.items():
                times[version].append(seconds(call))
                times[f"{version} plan"].append(seconds(plan, 0.05))
        med = {key: statistics.median(values) * 1e3 for key, values in times.items()}
        print(
            f"{name:<24} layer call: old {med['old']:8.3f} ms  new {med['new']:8.3f} ms  "
            f"old/new {med['old'] / med['new']:5.2f}x   plan (once per step): "
            f"old {med['old plan']:.3f} ms  new {med['new plan']:.3f} ms   "
            f"max |new - old| {err:.1e}",
            flush=True,
        )


def bench_model(baseline: ModuleType, repeats: int, names: list[str]) -> None:
    """Whole SmolLM2-135M forwards (30 layers) of the same batches, each version in ops."""
    from engine.model_loader import load_model
    from engine.model_runner import ModelRunner
    from engine.step_inputs import SeqChunk

    loaded = load_model(None, dtype="float32", device="cpu")
    runner = ModelRunner(loaded, num_blocks=1200, block_size=BLOCK_SIZE)
    current = (ops.plan_paged_attention_cpu, ops.run_paged_attention_cpu)

    def plan_old(*args: Any) -> Any:
        return baseline.plan_paged_attention_cpu(*args[:4])  # it has no ``native`` argument

    def use(version: str) -> None:
        if version == "new":
            ops.plan_paged_attention_cpu, ops.run_paged_attention_cpu = current
            return
        ops.plan_paged_attention_cpu = plan_old  # type: ignore[assignment]
        ops.run_paged_attention_cpu = baseline.run_paged_attention_cpu

    gen = torch.Generator().manual_seed(0)
    for name in sorted(names, key=lambda name: name.startswith("prefill")):  # slowest last
        cases = CASES[name]
        chunks: list[SeqChunk] = []
        next_block = 0
        for q_len, kv_len in cases:
            num_blocks = -(-kv_len // BLOCK_SIZE)
            tokens = torch.randint(100, 40000, (q_len,), generator=gen).tolist()
            block_ids = list(range(next_block, next_block + num_blocks))
            next_block += num_blocks
            chunks.append(SeqChunk(tokens, kv_len - q_len, block_ids, True))
        forward = functools.partial(runner.execute, chunks)
        times: dict[str, list[float]] = {"old": [], "new": []}
        for version in times:  # warm-up
            use(version)
            runner.execute(chunks)
        for _ in range(max(3, repeats // 2)):
            for version in times:
                use(version)
                times[version].append(seconds(forward, 0.5, warmup=False))
        use("new")
        old, new = (statistics.median(times[v]) * 1e3 for v in ("old", "new"))
        print(
            f"{name:<24} SmolLM2 forward: old {old:8.1f} ms  new {new:8.1f} ms  "
            f"old/new {old / new:5.2f}x",
            flush=True,
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline-rev", default="f659842", help="git revision of the old file")
    parser.add_argument("--repeats", type=int, default=7, help="alternating rounds per case")
    parser.add_argument("--model", action="store_true", help="also time SmolLM2 forwards")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--only", default="", help="run the cases whose name contains this")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    baseline = load_baseline(args.baseline_rev)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; compiled kernel: "
        f"{'yes' if cpu_native.load_paged_rows() is not None else 'NO (torch path)'}; "
        f"baseline kernels/cpu_attention.py @ {args.baseline_rev}",
        flush=True,
    )
    names = [name for name in CASES if args.only in name]
    bench_layers(baseline, args.repeats, names)
    if args.model:
        bench_model(baseline, args.repeats, names)
    return 0


if __name__ == "__main__":
    sys.exit(main())
