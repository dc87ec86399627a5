"""Assemble the KV store below an engine's device pool from the configured tiers."""

from __future__ import annotations

from typing import Any

from engine.kv_store import KVStore
from engine.llm_engine import LLMEngine
from sessions.tiers import HostKVStore, RedisKVStore, TieredKVStore


def build_kv_store(
    engine: LLMEngine,
    host_capacity_bytes: int | None = None,
    redis_client: Any | None = None,
    redis_ttl_s: int | None = 3600,
    redis_budget_bytes: int | None = None,
    redis_cluster: bool = False,
) -> TieredKVStore | None:
    """Host memory (if a capacity is given) above Redis (if a client or URL is given; with
    ``redis_cluster`` the URL names a node of a Redis Cluster), keyed by the engine's
    fingerprint and checked against its KV dtype and block shape; None if neither."""
    tiers: list[KVStore] = []
    if host_capacity_bytes:
        tiers.append(HostKVStore(capacity_bytes=host_capacity_bytes))
    if redis_client is not None:
        tiers.append(
            RedisKVStore(
                redis_client,
                engine.fingerprint,
                ttl_s=redis_ttl_s,
                budget_bytes=redis_budget_bytes,
                dtype=engine.loaded.dtype,
                block_shape=engine.kv_block_shape,
                cluster=redis_cluster,
            )
        )
    return TieredKVStore(tiers) if tiers else None
