"""The Redis KV tier's key layout and budget index: which hash-tagged shard a block lives in,
the keys of each shard's LRU index, and the Lua scripts that keep an index consistent.

Each shard's keys share one Redis Cluster hash tag, so every script runs within one slot (on a
single Redis the layout is the same, with one shard by default).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from engine.block_pool import BlockHash

DEFAULT_CLUSTER_SHARDS = 16

# The budget index of one shard: a sorted set of block members (hash hex) by last use in
# microseconds, a hash member -> value size, and a byte counter. Scripts keep the three
# consistent atomically. Every key a script touches carries the shard's hash tag, so all of
# them live in one cluster slot; blocks a call names are passed in KEYS, the ones it cannot
# know in advance (the oldest, to evict; stale entries, to prune) are built from the
# shard's block key prefix.
LUA_FORGET = """
local function forget(lru, sizes, counter, member)
  local size = redis.call('HGET', sizes, member)
  if size then
    redis.call('HDEL', sizes, member)
    redis.call('DECRBY', counter, size)
  end
  redis.call('ZREM', lru, member)
end
"""

# KEYS: lru, sizes, counter, then one block key per recorded block. ARGV: the shard's block
# key prefix, its budget in bytes, prune-before score or -1, ttl seconds or -1, then a
# (score, member) pair per recorded block. Records the blocks that exist (sizes via STRLEN,
# so racing writers count a block once), forgets expired entries, evicts down to the budget,
# refreshes the TTL of every key named. Returns {evicted, bytes used}.
LUA_RECORD_AND_EVICT = (
    LUA_FORGET
    + """
local lru, sizes, counter = KEYS[1], KEYS[2], KEYS[3]
local prefix, budget, prune_before, ttl = ARGV[1], tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
for i = 4, #KEYS do
  local score, member = ARGV[2 * i - 3], ARGV[2 * i - 2]
  local size = redis.call('STRLEN', KEYS[i])
  if size > 0 then
    if redis.call('HSETNX', sizes, member, size) == 1 then
      redis.call('INCRBY', counter, size)
    end
    redis.call('ZADD', lru, score, member)
  end
end
if prune_before ~= '-1' then
  local stale = redis.call('ZRANGEBYSCORE', lru, '-inf', '(' .. prune_before, 'LIMIT', 0, 512)
  for _, member in ipairs(stale) do
    if redis.call('EXISTS', prefix .. member) == 0 then
      forget(lru, sizes, counter, member)
    end
  end
end
local used = tonumber(redis.call('GET', counter) or '0')
local evicted = 0
while used > budget do
  local oldest = redis.call('ZPOPMIN', lru)
  if #oldest == 0 then
    redis.call('SET', counter, 0)
    used = 0
    break
  end
  redis.call('DEL', prefix .. oldest[1])
  local size = redis.call('HGET', sizes, oldest[1])
  if size then
    redis.call('HDEL', sizes, oldest[1])
    used = redis.call('DECRBY', counter, size)
  end
  evicted = evicted + 1
end
if ttl > 0 then
  for _, key in ipairs(KEYS) do redis.call('EXPIRE', key, ttl) end
end
return {evicted, used}
"""
)

# KEYS: lru, sizes, counter, then block keys. ARGV: their members, in the same order.
# Deletes the blocks and their index entries.
LUA_DISCARD = (
    LUA_FORGET
    + """
for i = 4, #KEYS do
  redis.call('DEL', KEYS[i])
  forget(KEYS[1], KEYS[2], KEYS[3], ARGV[i - 3])
end
return #KEYS - 3
"""
)


class KeyLayout:
    """Where a block and its shard's budget index live (see ``RedisKVStore``): a block's
    shard is the first four bytes of its hash modulo ``num_shards``, and a shard's keys
    share the hash tag ``{<fingerprint>.<shard>}``. Namespace and fingerprint must not
    contain braces (they would move the tag): ValueError."""

    def __init__(self, namespace: str, fingerprint: str, num_shards: int) -> None:
        if num_shards < 1:
            raise ValueError(f"index_shards must be >= 1, got {num_shards}")
        if any(brace in name for brace in "{}" for name in (namespace, fingerprint)):
            raise ValueError("namespace and fingerprint must not contain '{' or '}'")
        self.num_shards = num_shards
        tags = [f"{{{fingerprint}.{shard}}}" for shard in range(num_shards)]
        self.block_prefixes = [f"{namespace}:kv:{tag}:" for tag in tags]
        self.index_keys = [
            (f"{namespace}:kvindex:{tag}:lru", f"{namespace}:kvindex:{tag}:sizes",
             f"{namespace}:kvindex:{tag}:bytes")
            for tag in tags
        ]  # fmt: skip

    def shard_of(self, block_hash: BlockHash) -> int:
        return int.from_bytes(block_hash[:4], "big") % self.num_shards

    def block_key(self, block_hash: BlockHash) -> str:
        return self.block_prefixes[self.shard_of(block_hash)] + block_hash.hex()

    def by_shard(self, block_hashes: Sequence[BlockHash]) -> dict[int, list[int]]:
        """The indices of ``block_hashes`` grouped by shard, in order within each shard."""
        groups: dict[int, list[int]] = {}
        for block_idx, block_hash in enumerate(block_hashes):
            groups.setdefault(self.shard_of(block_hash), []).append(block_idx)
        return groups


def lru_scores(num_blocks: int) -> list[int]:
    """Budget index scores of a call's blocks: now, minus one microsecond per position, so a
    sequence's tail is older than its prefix."""
    now = now_us()
    return [now - block_idx for block_idx in range(num_blocks)]


def now_us() -> int:
    return time.time_ns() // 1000
