"""KV tiers below the device pool: host memory, Redis, and a stack of tiers.

All three implement ``engine.kv_store.KVStore``; blocks are addressed by their chained content
hash, so identical prefixes are stored once per tier. Every tier may lose any block at any
time; the engine then recomputes (the token history is the truth, the KV cache is a cache).

- ``HostKVStore`` (``sessions.host_tier``): a bounded LRU dict in host memory (pinned when
  CUDA is present).
- ``RedisKVStore`` (``sessions.redis_tier``, wire protocol in ``sessions.redis_wire``, node
  routing in ``sessions.redis_routing``): one msgpack frame per block (``sessions.kv_frame``)
  on one Redis or spread over a Redis Cluster's masters, TTLs, a byte budget shared by every
  server and split over hash-tagged shards, each with LRU eviction, and no exception ever
  escaping ``lookup``/``load``/``save``: a Redis outage reads as an empty tier and shows in
  ``healthy``/``last_error``.
- ``TieredKVStore`` (``sessions.tiered_store``): host over Redis (or any list of tiers):
  per-block sources, promotion of blocks found lower down, write-through saves.

``KVTier`` and ``KVTierStats`` (``sessions.kv_tier_base``) are what they share; all of them
log under this module's name.

LRU order inside one call: a sequence's tail blocks are made older than its prefix, so eviction
takes tails first (a block is useless without its prefix, as in the device pool).
"""

from sessions.host_tier import HostKVStore
from sessions.kv_tier_base import KVTier, KVTierStats
from sessions.redis_tier import RedisKVStore
from sessions.tiered_store import TieredKVStore

__all__ = ["HostKVStore", "KVTier", "KVTierStats", "RedisKVStore", "TieredKVStore"]
