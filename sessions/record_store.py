"""Durable session records (messages, token ids, settings): in memory, or in Redis.

The record is written at every turn end. With Redis, a restarted server (or another instance
sharing the Redis) can resume the session; its KV comes back from the KV tiers or is
recomputed from the token ids.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from typing import Any

import msgpack

from sessions.redis_keys import session_lease_key, session_record_key

logger = logging.getLogger(__name__)

# KEYS[1] = record, KEYS[2] = lease (one slot: both carry the session id as hash tag).
# ARGV[1] = this instance. Returns 1 when the write may go ahead (the lease is ours or nobody's),
# else the holder's id. FENCED_SET adds ARGV[2] = value, ARGV[3] = TTL seconds.
_FENCE = """
local holder = redis.call('GET', KEYS[2])
if holder and holder ~= ARGV[1] then return holder end
"""
_FENCED_SET = _FENCE + "redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])\nreturn 1\n"
_FENCED_DELETE = _FENCE + "redis.call('DEL', KEYS[1])\nreturn 1\n"


class SessionRecordStore(ABC):
    fenced_writes = 0  # writes refused because another instance owns the session

    @abstractmethod
    def save(self, record: dict[str, Any]) -> bool:
        """Write a record; False (and logged) if the store is unavailable or refused it."""

    @abstractmethod
    def load(self, session_id: str) -> dict[str, Any] | None:
        """The record, or None if unknown (or the store is unavailable)."""

    @abstractmethod
    def delete(self, session_id: str) -> None: ...

    @property
    def healthy(self) -> bool:
        return True


class MemoryRecordStore(SessionRecordStore):
    """Records in this process only (no Redis configured): lost on restart."""

    def __init__(self) -> None:
        self._records: dict[str, dict[str, Any]] = {}

    def save(self, record: dict[str, Any]) -> bool:
        self._records[record["session_id"]] = record
        return True

    def load(self, session_id: str) -> dict[str, Any] | None:
        return self._records.get(session_id)

    def delete(self, session_id: str) -> None:
        self._records.pop(session_id, None)


class RedisRecordStore(SessionRecordStore):
    """Records as msgpack values under ``{namespace}:session:{<id>}``, with a TTL.

    With ``instance_id`` (several instances share the Redis, ``sessions.ownership``), writes
    and deletes are fenced by the session's lease: they happen only while the lease is this
    instance's or nobody's, atomically in one script (record and lease share a slot, so this
    holds on Redis Cluster too). An instance that lost a session to another one therefore
    cannot overwrite the new owner's record; such a write returns False, is logged and counted
    in ``fenced_writes``.

    Redis errors never raise: saves report False, loads return None, and ``healthy`` turns
    False until a call succeeds again.
    """

    def __init__(
        self,
        client: Any,
        namespace: str = "tarry",
        ttl_s: int = 7 * 24 * 3600,
        instance_id: str | None = None,
    ) -> None:
        self.client = client
        self.namespace = namespace
        self.ttl_s = ttl_s
        self.instance_id = instance_id
        self.fenced_writes = 0
        self._healthy = True

    def _key(self, session_id: str) -> str:
        return session_record_key(self.namespace, session_id)

    def _fenced(self, script: str, session_id: str, *args: Any) -> bool:
        """Run a fence script; False (logged, counted) if another instance holds the lease."""
        assert self.instance_id is not None
        keys = (self._key(session_id), session_lease_key(self.namespace, session_id))
        outcome = self.client.eval(script, 2, *keys, self.instance_id, *args)
        if outcome == 1:
            return True
        holder = outcome.decode() if isinstance(outcome, bytes) else outcome
        logger.warning("session %s record not written: instance %s owns it", session_id, holder)
        self.fenced_writes += 1
        return False

    @property
    def healthy(self) -> bool:
        return self._healthy

    def save(self, record: dict[str, Any]) -> bool:
        session_id = record["session_id"]
        try:
            value = msgpack.packb(record)
        except (TypeError, ValueError, OverflowError) as exc:  # input checks should prevent it
            logger.error("session %s record not written: it cannot be encoded: %s", session_id, exc)
            return False
        try:
            if self.instance_id is not None:
                written = self._fenced(_FENCED_SET, session_id, value, self.ttl_s)
            else:
                written = bool(self.client.set(self._key(session_id), value, ex=self.ttl_s))
        except Exception as exc:
            self._mark_down("save", exc)
            return False
        self._healthy = True
        return written

    def load(self, session_id: str) -> dict[str, Any] | None:
        try:
            raw = self.client.get(self._key(session_id))
        except Exception as exc:
            self._mark_down("load", exc)
            return None
        self._healthy = True
        if raw is None:
            return None
        try:
            record = msgpack.unpackb(raw)
        except Exception:
            logger.warning("discarding unreadable session record %s", session_id)
            return None
        return record if isinstance(record, dict) else None

    def delete(self, session_id: str) -> None:
        """Delete the record (fenced like ``save`` when an ``instance_id`` is set)."""
        try:
            if self.instance_id is not None:
                self._fenced(_FENCED_DELETE, session_id)
            else:
                self.client.delete(self._key(session_id))
        except Exception as exc:
            self._mark_down("delete", exc)
            return
        self._healthy = True

    def _mark_down(self, operation: str, exc: Exception) -> None:
        if self._healthy:
            logger.warning("session record %s failed, Redis unavailable: %s", operation, exc)
        self._healthy = False
