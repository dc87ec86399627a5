"""Restore bandwidth of ``RedisKVStore.load`` against plain redis-py GETs, on a local Redis.

    python bench/redis_bench.py                  # 4k tokens of SmolLM2-shaped fp32 KV
    python bench/redis_bench.py --blocks 64 --repeats 3

SmolLM2-135M's KV: 30 layers, 3 KV heads, head dim 64, fp32, block size 16, so 4096 tokens
are 256 blocks of 737 KB (189 MB). The bench starts its own redis-server on a free port
(no persistence), saves the blocks once, then times:

- ``RedisKVStore.load``: the full restore (pipelined GETs, frame checks, crc32, tokens, copy
  into one staged tensor), checked equal to what was saved; once with torch's default
  intra-op threads and once with one (on a small machine, torch's parallel copies compete
  with redis-server for the same cores);
- plain GET: a default ``redis.Redis`` fetching the same values one key at a time, bytes only
  (no checks, no tensor).

Bandwidth is tensor bytes (``load``) or value bytes (GET) over the best wall time of the
repeats, in GB/s (1e9 bytes). Both run in this process, against the same server.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import redis
import torch
from local_redis import local_redis

from engine.block_pool import BlockHash
from sessions.tiers import RedisKVStore

NUM_LAYERS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 30, 3, 64, 16  # SmolLM2-135M


def best_seconds(fn: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--blocks", type=int, default=256, help="blocks of 16 tokens")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    num_blocks = args.blocks
    shape = (NUM_LAYERS, 2, num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    staged = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    hashes = [BlockHash(os.urandom(16)) for _ in range(num_blocks)]
    tokens = torch.randint(0, 49152, (num_blocks, BLOCK_SIZE)).tolist()
    tensor_bytes = staged.numel() * staged.element_size()

    with local_redis() as url:
        store = RedisKVStore(url, fingerprint="bench", ttl_s=None)
        start = time.perf_counter()
        store.save(hashes, tokens, staged)
        save_s = time.perf_counter() - start
        loaded = store.load(hashes, tokens)
        assert loaded is not None and torch.equal(loaded, staged), "restore is not exact"
        del loaded
        default_threads = torch.get_num_threads()
        load_s = best_seconds(lambda: store.load(hashes, tokens), args.repeats)
        torch.set_num_threads(1)
        load_1t_s = best_seconds(lambda: store.load(hashes, tokens), args.repeats)
        torch.set_num_threads(default_threads)

        plain = redis.Redis.from_url(url)
        keys = [store.block_key(h) for h in hashes]
        value_bytes = sum(plain.strlen(key) for key in keys)
        get_s = best_seconds(lambda: [plain.get(key) for key in keys], args.repeats)

    print(
        f"KV: {num_blocks} blocks x {tensor_bytes / num_blocks / 1e3:.0f} KB "
        f"({num_blocks * BLOCK_SIZE} tokens, {tensor_bytes / 1e6:.0f} MB), local redis-server"
    )
    print(f"best of {args.repeats} unless said; GB/s = 1e9 bytes/s")
    print(f"RedisKVStore.save (one call)         {tensor_bytes / save_s / 1e9:6.2f} GB/s")
    for label, seconds in (
        (f"{default_threads} torch threads", load_s),
        ("1 torch thread", load_1t_s),
    ):
        print(
            f"RedisKVStore.load, {label:<16} {tensor_bytes / seconds / 1e9:6.2f} GB/s"
            f"   ({seconds * 1e3:.0f} ms, verified + staged)"
        )
    print(
        f"plain GET, one key at a time         {value_bytes / get_s / 1e9:6.2f} GB/s"
        f"   ({get_s * 1e3:.0f} ms, bytes only)"
    )


if __name__ == "__main__":
    main()
