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

logger = logging.getLogger(__name__)


class SessionRecordStore(ABC):
    @abstractmethod
    def save(self, record: dict[str, Any]) -> bool:
        """Write a record; False (and logged) if the store is unavailable."""

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
    """Records as msgpack values under ``{namespace}:session:{id}``, with a TTL.

    Redis errors never raise: saves report False, loads return None, and ``healthy`` turns
    False until a call succeeds again.
    """

    def __init__(self, client: Any, namespace: str = "tarry", ttl_s: int = 7 * 24 * 3600) -> None:
        self.client = client
        self.namespace = namespace
        self.ttl_s = ttl_s
        self._healthy = True

    def _key(self, session_id: str) -> str:
        return f"{self.namespace}:session:{session_id}"

    @property
    def healthy(self) -> bool:
        return self._healthy

    def save(self, record: dict[str, Any]) -> bool:
        try:
            self.client.set(self._key(record["session_id"]), msgpack.packb(record), ex=self.ttl_s)
        except Exception as exc:
            self._mark_down("save", exc)
            return False
        self._healthy = True
        return True

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
        try:
            self.client.delete(self._key(session_id))
        except Exception as exc:
            self._mark_down("delete", exc)

    def _mark_down(self, operation: str, exc: Exception) -> None:
        if self._healthy:
            logger.warning("session record %s failed, Redis unavailable: %s", operation, exc)
        self._healthy = False
