"""KV tiers below the device pool: host memory, Redis (single or Cluster), and a stack of tiers.

Every tier implements ``engine.kv_store.KVStore`` and knows nothing of sessions; blocks are
addressed by their chained content hash, so identical prefixes are stored once per tier. Every
tier may lose any block at any time; the engine then recomputes (the token history is the
truth, the KV cache is a cache).

One module per idea:

- ``base``: ``KVTier`` and ``KVTierStats``, what every tier shares (argument checks, counters,
  the ``sessions.tiers`` logger).
- ``host``: ``HostKVStore``, a bounded LRU dict in host memory (pinned when CUDA is present).
- ``redis_store``: ``RedisKVStore``, one msgpack frame per block on one Redis or spread over a
  Redis Cluster's masters, TTLs, a byte budget shared by every server and split over
  hash-tagged shards, each with LRU eviction, and no exception ever escaping
  ``lookup``/``load``/``save``: a Redis outage reads as an empty tier and shows in
  ``healthy``/``last_error``.
- ``frame``: the wire format of one stored block (header + checksummed body).
- ``redis_index``: the Redis tier's key layout, shards and budget-index Lua scripts.
- ``redis_wire``: RESP packing and streamed pipelines over one or many connections.
- ``cluster_routing``: which connection (node) each Redis command goes to.
- ``stack``: ``TieredKVStore``, host over Redis (or any list of tiers): per-block sources,
  promotion of blocks found lower down, write-through saves.
- ``factory``: ``build_kv_store``, the stack for an engine from the configured tiers.

LRU order inside one call: a sequence's tail blocks are made older than its prefix, so eviction
takes tails first (a block is useless without its prefix, as in the device pool).
"""

from sessions.tiers.base import KVTier, KVTierStats
from sessions.tiers.host import HostKVStore
from sessions.tiers.redis_store import RedisKVStore
from sessions.tiers.stack import TieredKVStore

__all__ = ["HostKVStore", "KVTier", "KVTierStats", "RedisKVStore", "TieredKVStore"]
