"""Durable session records (messages, token ids, settings): in memory, or in Redis.

The record is written at every turn end. With Redis, a restarted server (or another instance
sharing the Redis) can resume the session; its KV comes back from the KV tiers or is
recomputed from the token ids. A write that fails while Redis is unavailable is kept in memory
(the latest record of each session) and written back once Redis answers again.
"""

from __future__ import annotations

import logging
import threading
import zlib
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

    @property
    def num_dirty(self) -> int:
        """Records (or deletes) acknowledged locally but not yet written to the store."""
        return 0

    def close(self) -> None:  # noqa: B027  (optional: most stores have nothing to stop)
        """Stop background work (server shutdown); records not yet written are lost."""


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
    False. A save or delete that failed for want of Redis is *dirty*: kept in memory (per
    session, the latest record or delete wins) and written back, fenced as usual, by a
    background thread that retries with backoff (``retry_min_s`` doubling to ``retry_max_s``)
    until Redis answers. ``healthy`` is True again once Redis answers and nothing is dirty.
    Writes of one session are serialized (a striped lock), so a write-back never overwrites a
    newer record. Dirty records live only in this process: a crash before Redis returns loses
    them.
    """

    NUM_WRITE_LOCKS = 64

    def __init__(
        self,
        client: Any,
        namespace: str = "tarry",
        ttl_s: int = 7 * 24 * 3600,
        instance_id: str | None = None,
        retry_min_s: float = 0.1,
        retry_max_s: float = 1.0,
    ) -> None:
        self.client = client
        self.namespace = namespace
        self.ttl_s = ttl_s
        self.instance_id = instance_id
        self.fenced_writes = 0
        self._healthy = True
        self.retry_min_s = retry_min_s
        self.retry_max_s = retry_max_s
        self._dirty: dict[str, dict[str, Any] | None] = {}  # session id -> record, None = delete
        self._dirty_lock = threading.Lock()
        self._write_locks = [threading.Lock() for _ in range(self.NUM_WRITE_LOCKS)]
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._flusher: threading.Thread | None = None

    def _write_lock(self, session_id: str) -> threading.Lock:
        return self._write_locks[zlib.crc32(session_id.encode()) % self.NUM_WRITE_LOCKS]

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
        return self._healthy and not self._dirty

    @property
    def num_dirty(self) -> int:
        return len(self._dirty)

    def save(self, record: dict[str, Any]) -> bool:
        """Write the record now; False if refused (fenced, unencodable) or, with Redis
        unavailable, not yet written (it is then dirty and written back later)."""
        session_id = record["session_id"]
        try:
            value = msgpack.packb(record)
        except (TypeError, ValueError, OverflowError) as exc:  # input checks should prevent it
            logger.error("session %s record not written: it cannot be encoded: %s", session_id, exc)
            return False
        with self._write_lock(session_id):
            try:
                written = self._write(session_id, value)
            except Exception as exc:
                self._mark_dirty(session_id, record)
                self._mark_down("save", exc)
                return False
            self._clean(session_id)
        self._healthy = True
        return written

    def _write(self, session_id: str, value: bytes) -> bool:
        if self.instance_id is not None:
            return self._fenced(_FENCED_SET, session_id, value, self.ttl_s)
        return bool(self.client.set(self._key(session_id), value, ex=self.ttl_s))

    def _remove(self, session_id: str) -> None:
        if self.instance_id is not None:
            self._fenced(_FENCED_DELETE, session_id)
        else:
            self.client.delete(self._key(session_id))

    def load(self, session_id: str) -> dict[str, Any] | None:
        """The record; a dirty (not yet written back) one is newer than Redis's, so it wins."""
        with self._dirty_lock:
            if session_id in self._dirty:
                pending = self._dirty[session_id]
                return None if pending is None else dict(pending)
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
        """Delete the record (fenced like ``save`` when an ``instance_id`` is set); with Redis
        unavailable the delete is dirty and done later."""
        with self._write_lock(session_id):
            try:
                self._remove(session_id)
            except Exception as exc:
                self._mark_dirty(session_id, None)
                self._mark_down("delete", exc)
                return
            self._clean(session_id)
        self._healthy = True

    # -- write-back of dirty records ------------------------------------------------------

    def _mark_dirty(self, session_id: str, record: dict[str, Any] | None) -> None:
        with self._dirty_lock:
            self._dirty[session_id] = record

    def _clean(self, session_id: str) -> None:
        with self._dirty_lock:
            self._dirty.pop(session_id, None)

    def flush_dirty(self) -> bool:
        """Write back every dirty record; True when none is left. Stops at the first Redis
        error (the rest stay dirty). A write-back refused by the fence is dropped (another
        instance owns the session now)."""
        with self._dirty_lock:
            pending = list(self._dirty)
        for session_id in pending:
            with self._write_lock(session_id):
                with self._dirty_lock:
                    if session_id not in self._dirty:
                        continue  # a newer save went through meanwhile
                    record = self._dirty[session_id]
                try:
                    if record is None:
                        self._remove(session_id)
                    else:
                        self._write(session_id, msgpack.packb(record))
                except Exception as exc:
                    self._mark_down("write-back", exc)
                    return False
                self._clean(session_id)
        return not self._dirty

    def probe(self) -> bool:
        """One cheap Redis call; True (and healthy) if Redis answers."""
        try:
            self.client.exists(self._key("health-probe"))
        except Exception as exc:
            self._mark_down("probe", exc)
            return False
        if not self._healthy:
            logger.warning("session records: Redis is back (%d dirty)", len(self._dirty))
        self._healthy = True
        return True

    def _flush_loop(self) -> None:
        """While unhealthy or dirty: probe Redis and write back, backing off while it is down."""
        delay_s = self.retry_min_s
        while not self._stop.is_set():
            if self._healthy and not self._dirty:
                self._wake.clear()
                if self._healthy and not self._dirty:
                    self._wake.wait()
                delay_s = self.retry_min_s
                continue
            if self.probe() and self.flush_dirty():
                if self._dirty:  # refilled meanwhile
                    continue
                logger.warning("session records: every dirty record is written back")
                delay_s = self.retry_min_s
                continue
            self._stop.wait(delay_s)
            delay_s = min(delay_s * 2, self.retry_max_s)

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._flusher is not None:
            self._flusher.join(timeout=5)

    def _mark_down(self, operation: str, exc: Exception) -> None:
        if self._healthy:
            logger.warning("session record %s failed, Redis unavailable: %s", operation, exc)
        self._healthy = False
        with self._dirty_lock:  # started on the first failure: a store that never fails has none
            if self._flusher is None and not self._stop.is_set():
                self._flusher = threading.Thread(
                    target=self._flush_loop, name="tarry-record-write-back", daemon=True
                )
                self._flusher.start()
        self._wake.set()
