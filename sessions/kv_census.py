"""Where the KV is: the device pool, each tier's counters, and each session's blocks per tier.

Read-only and cheap by construction, for the inspector page (``api/inspector.py``):

- block hashes of a session's history are memoised and recomputed only when its token ids
  change (hashing runs on the caller's thread, without the engine lock);
- the device pool counters and every session's device blocks are read in ONE short engine
  critical section per census (dictionary look-ups only, no tensor work);
- the host tier is asked in memory; Redis at most once per ``redis_refresh_s`` per session
  (or when its history changes), so a page left open causes no Redis traffic storm.

Run ``take`` on a worker thread, never on the event loop: the engine lock may be held by a
step for its whole duration.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from engine.async_engine import AsyncEngine
from engine.block_pool import BlockHash
from engine.pool_stats import PoolStats
from sessions.tiers import HostKVStore, RedisKVStore


@dataclass(frozen=True, slots=True)
class SessionKV:
    """A session's full history blocks and how many of them each tier holds.

    ``device`` counts the leading blocks cached on the device (what a resume reuses without a
    transfer); ``host`` / ``redis`` count the blocks that tier holds, None without that tier.
    ``redis`` is as last checked (at most ``redis_refresh_s`` old).
    """

    num_blocks: int
    device: int
    host: int | None
    redis: int | None


@dataclass(frozen=True, slots=True)
class TierCounters:
    """One KV tier below the device: its kind (``host`` / ``redis``) and its counters.

    ``bytes_used``: host, bytes held; Redis, the budget counters as last seen (0 without a
    budget, see ``bytes_written``). Hits and misses are blocks asked of ``load``.
    """

    kind: str
    healthy: bool
    bytes_used: int
    capacity_bytes: int | None
    bytes_written: int
    hits: int
    misses: int
    evictions: int


@dataclass(frozen=True, slots=True)
class SessionKey:
    """What the census needs of a session: its id, history and prefix-cache salt."""

    session_id: str
    token_ids: list[int]
    cache_salt: str


@dataclass(slots=True)
class _Memo:
    token_ids: list[int]  # the very list hashed (sessions replace it, never mutate it)
    num_tokens: int
    hashes: list[BlockHash]
    redis: int | None = None
    redis_checked_at: float = float("-inf")


class KVCensus:
    """Counts pool blocks and each session's blocks per tier; see the module docstring.

    Not thread-safe: one caller at a time (the inspector's single sampler).
    """

    def __init__(self, async_engine: AsyncEngine, redis_refresh_s: float = 10.0) -> None:
        self.async_engine = async_engine
        self.engine = async_engine.engine
        self.redis_refresh_s = redis_refresh_s
        self._memos: dict[str, _Memo] = {}
        self.last_lock_s = 0.0  # how long the latest census held the engine lock
        self.last_lock_wait_s = 0.0  # how long it waited for it (a step was running)

    def tiers(self) -> list[Any]:
        """The engine's KV store's tiers, fastest first ([] without a store)."""
        store = self.engine.kv_store
        if store is None:
            return []
        return list(getattr(store, "tiers", [store]))

    def tier_counters(self) -> list[TierCounters]:
        counters = []
        for tier in self.tiers():
            kind = _kind_of(tier)
            stats = getattr(tier, "stats", None)
            if kind is None or stats is None:
                continue
            counters.append(
                TierCounters(
                    kind=kind,
                    healthy=bool(getattr(tier, "healthy", True)),
                    bytes_used=stats.bytes_used,
                    capacity_bytes=getattr(tier, "capacity_bytes", None)
                    or getattr(tier, "budget_bytes", None),
                    bytes_written=stats.bytes_written,
                    hits=stats.hits,
                    misses=stats.misses,
                    evictions=stats.evictions,
                )
            )
        return counters

    def take(self, sessions: list[SessionKey]) -> tuple[PoolStats, dict[str, SessionKV]]:
        """The pool now and each session's blocks per tier (keyed by session id)."""
        hashes = {key.session_id: self._hashes(key) for key in sessions}
        for gone in set(self._memos) - set(hashes):
            del self._memos[gone]
        asked = time.perf_counter()
        pool, on_device = self.async_engine.run_exclusive(self._read_device, hashes)
        self.last_lock_wait_s = time.perf_counter() - asked - self.last_lock_s
        host = redis = None
        for tier in self.tiers():
            kind = _kind_of(tier)
            if kind == "host" and host is None:
                host = tier
            elif kind == "redis" and redis is None:
                redis = tier
        census = {}
        for session_id, block_hashes in hashes.items():
            census[session_id] = SessionKV(
                num_blocks=len(block_hashes),
                device=on_device[session_id],
                host=None if host is None else sum(host.contains(block_hashes)),
                redis=None if redis is None else self._redis_count(redis, session_id),
            )
        return pool, census

    def _read_device(self, hashes: dict[str, list[BlockHash]]) -> tuple[PoolStats, dict[str, int]]:
        """Under the engine lock: dictionary look-ups only."""
        started = time.perf_counter()
        on_device = {sid: self.engine.num_device_blocks(h) for sid, h in hashes.items()}
        pool = self.engine.pool_stats()
        self.last_lock_s = time.perf_counter() - started
        return pool, on_device

    def _hashes(self, key: SessionKey) -> list[BlockHash]:
        memo = self._memos.get(key.session_id)
        token_ids = key.token_ids
        if memo is None or memo.token_ids is not token_ids or memo.num_tokens != len(token_ids):
            hashes = self.engine.block_hashes_of(token_ids, key.cache_salt)
            memo = _Memo(token_ids, len(token_ids), hashes)
            self._memos[key.session_id] = memo
        return memo.hashes

    def _redis_count(self, redis: Any, session_id: str) -> int:
        memo = self._memos[session_id]
        now = time.monotonic()
        if memo.redis is None or now - memo.redis_checked_at >= self.redis_refresh_s:
            memo.redis = sum(redis.contains(memo.hashes))
            memo.redis_checked_at = now
        return memo.redis


def _kind_of(tier: Any) -> str | None:
    if isinstance(tier, HostKVStore):
        return "host"
    if isinstance(tier, RedisKVStore):
        return "redis"
    return None
