"""Time SmolLM2-135M forward passes of the step shapes the agent workload makes.

    PYTHONPATH=. .venv/bin/python bench/forward_steps.py [TREE]

Builds an engine (float32, CPU, the 15,360-token pool of ``tarry serve --kv-cache-gib
0.6592``) from the checkout ``TREE`` (default: this one; pass another worktree to A/B two
versions, alternating runs) and times ``ModelRunner.execute`` on: pure decode steps of 1, 4, 8
and 16 sequences with long and short contexts, a 330-token chunk after 3,000 cached tokens (a
turn's tool result), the same chunk beside 7 decodes, and speculative steps (each sequence's
token and its drafts, logits for all of them). Blocks are scattered over the pool, as after a
while of serving. Prints the median of 3 timed runs after one warm-up.
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

if len(sys.argv) > 1:
    sys.path.insert(0, str(Path(sys.argv[1]).resolve()))

from engine.config import EngineConfig  # noqa: E402
from engine.llm_engine import LLMEngine  # noqa: E402
from engine.model_loader import load_model  # noqa: E402
from engine.step_inputs import SeqChunk  # noqa: E402

POOL_BYTES = int(0.6592 * (1 << 30))


def main() -> None:
    engine = LLMEngine(
        load_model(None, dtype="float32", device="cpu"), EngineConfig(kv_cache_bytes=POOL_BYTES)
    )
    runner = engine.model_runner
    blocks = list(range(runner.kv_cache.shape[2]))
    random.Random(0).shuffle(blocks)
    block_size = runner.block_size

    def tables(lengths: list[int]) -> list[list[int]]:
        out, used = [], 0
        for length in lengths:
            count = length // block_size + 2
            out.append(blocks[used : used + count])
            used += count
        assert used <= len(blocks), "the shapes do not fit the pool"
        return out

    def decode(lengths: list[int]) -> list[SeqChunk]:
        return [SeqChunk([5], n, t, True) for n, t in zip(lengths, tables(lengths), strict=True)]

    def drafting(lengths: list[int], num_tokens: int) -> list[SeqChunk]:
        """A speculative step: each sequence's token and its drafts, logits for every one."""
        return [
            SeqChunk([5] * num_tokens, n, t, True, num_tokens)
            for n, t in zip(lengths, tables(lengths), strict=True)
        ]

    def mixed(lengths: list[int], chunk: int, cached: int) -> list[SeqChunk]:
        all_tables = tables([*lengths, cached + chunk])
        steps = [SeqChunk([5], n, t, True) for n, t in zip(lengths, all_tables, strict=False)]
        return [*steps, SeqChunk([7] * chunk, cached, all_tables[-1], True)]

    def median_ms(chunks: list[SeqChunk]) -> float:
        runner.execute(chunks)
        times = []
        for _ in range(3):
            start = time.perf_counter()
            runner.execute(chunks)
            times.append(time.perf_counter() - start)
        return sorted(times)[1] * 1000

    cases = {
        "decode, 1 sequence x 1800 keys": decode([1800]),
        "decode, 4 x 1800 keys": decode([1800] * 4),
        "decode, 8 x 1800 keys": decode([1800] * 8),
        "decode, 16 x 900 keys": decode([900] * 16),
        "decode, 8 x 100 keys": decode([100] * 8),
        "drafting, 8 x 1800 keys, 2 tokens each": drafting([1800] * 8, 2),
        "drafting, 8 x 1800 keys, 4 tokens each": drafting([1800] * 8, 4),
        "drafting, 8 x 100 keys, 4 tokens each": drafting([100] * 8, 4),
        "330-token chunk after 3000 cached": mixed([], 330, 3000),
        "7 decodes x 1500 keys + 330-token chunk after 2000": mixed([1500] * 7, 330, 2000),
    }
    for name, chunks in cases.items():
        print(f"{name:55s} {median_ms(chunks):8.1f} ms")
    engine.close()


if __name__ == "__main__":
    main()
