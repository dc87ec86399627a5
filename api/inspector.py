"""The inspector's sampler: one snapshot per second, computed once and shared by all viewers.

    viewers (WebSocket /ui/ws) ──subscribe──> InspectorHub ──every interval_s──> snapshot
                                                  │  sessions: read on the event loop (cheap)
                                                  │  KV census + tier counters: worker thread,
                                                  │  one short engine critical section
                                                  └──> wakes each viewer; each gets the same
                                                       snapshot, filtered to its own sessions

The sampler runs only while someone watches, and ``linger_s`` after the last viewer leaves, so
that a page reopened soon still has its plots; a server nobody inspects pays nothing. History
keeps ``history_s`` of points for the live plots.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any

from api.state import ServerState
from engine.pool_stats import PoolStats
from sessions.kv_census import KVCensus, SessionKey, SessionKV, TierCounters
from sessions.session import Session

logger = logging.getLogger(__name__)

RATE_WINDOW_S = 10.0  # hit rates in the plots are over this trailing window
MAX_DETAIL_ITEMS = 100  # items shown for one session (the newest)
MAX_ITEM_CHARS = 2000  # content shown per item


@dataclass(eq=False)
class Viewer:
    """One connected page: whose sessions it may see (None = all) and which one is open."""

    owner: str | None
    selected: str | None = None
    wake: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class Snapshot:
    """One sample, shared by every viewer. ``rows`` carry the internal owner for filtering."""

    time: float
    pool: dict[str, Any]
    tiers: list[dict[str, Any]]
    rows: list[tuple[str, dict[str, Any]]]  # (owner, row)
    point: dict[str, Any]
    sampler: dict[str, Any]


class InspectorHub:
    """Samples the server while viewers are connected; see the module docstring."""

    def __init__(
        self,
        state: ServerState,
        interval_s: float = 1.0,
        history_s: float = 300.0,
        linger_s: float = 300.0,
    ) -> None:
        self.state = state
        self.interval_s = interval_s
        self.linger_s = linger_s
        self.census = KVCensus(state.async_engine)
        self.history: deque[dict[str, Any]] = deque(maxlen=max(1, int(history_s / interval_s)))
        self.latest: Snapshot | None = None
        self.viewers: set[Viewer] = set()
        self._counters: deque[tuple[float, PoolStats, dict[str, TierCounters]]] = deque()
        self._task: asyncio.Task[None] | None = None
        self._last_viewer_left = 0.0
        self._push_cpu_s = 0.0  # CPU spent rendering views for viewers since the last sample

    # -- viewers -----------------------------------------------------------------------------

    def add(self, viewer: Viewer) -> None:
        """Register a viewer (woken at every snapshot); starts the sampler if needed."""
        self.viewers.add(viewer)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())
        elif self.latest is not None:
            viewer.wake.set()

    def remove(self, viewer: Viewer) -> None:
        self.viewers.discard(viewer)
        if not self.viewers:
            self._last_viewer_left = time.monotonic()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def note_push_cpu(self, cpu_s: float) -> None:
        """Account CPU a viewer's push spent (reported with the next snapshot)."""
        self._push_cpu_s += cpu_s

    def view_for(self, viewer: Viewer) -> dict[str, Any] | None:
        """The latest snapshot as ``viewer`` may see it (None before the first sample)."""
        snap = self.latest
        if snap is None:
            return None
        rows = [row for owner, row in snap.rows if viewer.owner is None or owner == viewer.owner]
        return {
            "type": "snapshot",
            "time": snap.time,
            "pool": snap.pool,
            "tiers": snap.tiers,
            "sessions": rows,
            "point": snap.point,
            "sampler": snap.sampler,
            "session": self._detail(viewer),
        }

    def _detail(self, viewer: Viewer) -> dict[str, Any] | None:
        if viewer.selected is None:
            return None
        session = next(
            (s for s in self.state.sessions.all_sessions() if s.session_id == viewer.selected),
            None,
        )
        if session is None or (viewer.owner is not None and session.owner != viewer.owner):
            return {"id": viewer.selected, "found": False}
        items = session.messages[-MAX_DETAIL_ITEMS:]
        return {
            "id": session.session_id,
            "found": True,
            "state": session.state.value,
            "num_items": len(session.messages),
            "items": [_item_view(item) for item in items],
            "turns": [asdict(turn) for turn in session.turns],
        }

    # -- sampling ----------------------------------------------------------------------------

    async def _run(self) -> None:
        while self.viewers or time.monotonic() - self._last_viewer_left < self.linger_s:
            started = time.monotonic()
            try:
                self.latest = await self._sample()
            except Exception:  # the page must never take the server down; try again later
                logger.exception("inspector sample failed")
            else:
                self.history.append(self.latest.point)
                for viewer in self.viewers:
                    viewer.wake.set()
            elapsed = time.monotonic() - started
            await asyncio.sleep(max(0.05, self.interval_s - elapsed))

    async def _sample(self) -> Snapshot:
        started = time.perf_counter()
        loop_cpu = time.thread_time()
        sessions = self.state.sessions.all_sessions()
        keys = [SessionKey(s.session_id, s.token_ids, s.cache_salt) for s in sessions]
        loop_cpu = time.thread_time() - loop_cpu
        pool, census, tiers, worker_cpu = await asyncio.to_thread(self._take, keys)
        loop_cpu -= time.thread_time()
        now, mono = time.time(), time.monotonic()
        rows = [(s.owner, self._row(s, census.get(s.session_id), mono)) for s in sessions]
        tier_views, rates = self._tier_views(mono, pool, tiers)
        pool_view = asdict(pool)
        point = {
            "t": now,
            "empty": pool.num_empty_blocks,
            "cached": pool.num_cached_blocks,
            "pinned": pool.num_pinned_blocks,
            "in_use": pool.num_in_use_blocks,
            "host_bytes": tiers["host"].bytes_used if "host" in tiers else None,
            "redis_bytes": _redis_bytes(tiers.get("redis")),
            **{f"hit_{name}": rate for name, rate in rates.items()},
        }
        loop_cpu += time.thread_time()
        push_cpu, self._push_cpu_s = self._push_cpu_s, 0.0
        sampler = {
            "interval_s": self.interval_s,
            # CPU this sample cost (event loop + worker thread), and the pushes since the last
            "cpu_ms": round((loop_cpu + worker_cpu) * 1000, 3),
            "push_cpu_ms": round(push_cpu * 1000, 3),
            "sample_ms": round((time.perf_counter() - started) * 1000, 2),
            "engine_lock_ms": round(self.census.last_lock_s * 1000, 3),
            "engine_lock_wait_ms": round(self.census.last_lock_wait_s * 1000, 1),
            "viewers": len(self.viewers),
        }
        return Snapshot(now, pool_view, tier_views, rows, point, sampler)

    def _take(
        self, keys: list[SessionKey]
    ) -> tuple[PoolStats, dict[str, SessionKV], dict[str, TierCounters], float]:
        """Worker thread: the census (one engine critical section), the tier counters, and
        the CPU time they took."""
        cpu = time.thread_time()
        pool, census = self.census.take(keys)
        tiers = {counters.kind: counters for counters in self.census.tier_counters()}
        return pool, census, tiers, time.thread_time() - cpu

    def _row(self, session: Session, kv: SessionKV | None, mono: float) -> dict[str, Any]:
        usage = session.last_usage
        last = session.turns[-1] if session.turns else None
        return {
            "id": session.session_id,
            "owner": owner_label(session.owner),
            "state": session.state.value,
            "num_tokens": len(session.token_ids),
            "num_items": len(session.messages),
            "num_turns": session.num_turns,
            "kv": None if kv is None else asdict(kv),
            "last_ttft_ms": None
            if last is None or last.ttft_s is None
            else round(last.ttft_s * 1000, 1),
            "last_cached_tokens": usage.cached_tokens,
            "last_restored_tokens": usage.restored_tokens,
            "last_new_tokens": usage.prompt_tokens - usage.cached_tokens,
            "idle_s": round(max(0.0, mono - session.last_active_at), 1),
            "lease": self.state.sessions.lease_holder(session.session_id),
        }

    def _tier_views(
        self, mono: float, pool: PoolStats, tiers: dict[str, TierCounters]
    ) -> tuple[list[dict[str, Any]], dict[str, float | None]]:
        """Per tier: counters, all-time hit rate and the trailing-window hit rate.

        A tier's hit rate = prompt tokens it served / prompt tokens looked up at admission;
        device = prefix hits not restored from below; host / Redis = blocks they loaded.
        """
        self._counters.append((mono, pool, tiers))
        while len(self._counters) > 1 and mono - self._counters[0][0] > RATE_WINDOW_S:
            self._counters.popleft()
        _, old_pool, old_tiers = self._counters[0]
        block_size = pool.block_size
        total = _served(pool, tiers, block_size)
        window = {
            name: served - _served(old_pool, old_tiers, block_size).get(name, 0)
            for name, served in total.items()
        }
        window_queries = pool.prefix_query_tokens - old_pool.prefix_query_tokens
        rates = {
            name: (round(value / window_queries, 4) if window_queries > 0 else None)
            for name, value in window.items()
        }
        views: list[dict[str, Any]] = [
            {
                "kind": "device",
                "healthy": True,
                "bytes_used": None,
                "blocks_used": pool.num_blocks - pool.num_empty_blocks,
                "num_blocks": pool.num_blocks,
                "hit_tokens": total["device"],
                "hit_rate": _ratio(total["device"], pool.prefix_query_tokens),
                "hit_rate_window": rates["device"],
            }
        ]
        for kind, counters in tiers.items():
            views.append(
                {
                    **asdict(counters),
                    "hit_tokens": total[kind],
                    "hit_rate": _ratio(total[kind], pool.prefix_query_tokens),
                    "hit_rate_window": rates.get(kind),
                }
            )
        return views, rates


def owner_label(owner: str) -> str:
    """A stable, non-secret label for a tenant (owners are derived from API keys)."""
    return "tenant-" + hashlib.sha256(owner.encode()).hexdigest()[:8]


def _served(pool: PoolStats, tiers: dict[str, TierCounters], block_size: int) -> dict[str, int]:
    served = {"device": max(0, pool.prefix_hit_tokens - pool.restored_tokens)}
    for kind, counters in tiers.items():
        served[kind] = counters.hits * block_size
    return served


def _ratio(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole > 0 else None


def _redis_bytes(counters: TierCounters | None) -> int | None:
    """The Redis budget counter, or (without a budget) the bytes this instance wrote."""
    if counters is None:
        return None
    return counters.bytes_used if counters.capacity_bytes else counters.bytes_written


def _item_view(item: dict[str, Any]) -> dict[str, Any]:
    content = item.get("content")
    text = content if isinstance(content, str) else str(content)
    view = {"role": item.get("role"), "content": text[:MAX_ITEM_CHARS]}
    if len(text) > MAX_ITEM_CHARS:
        view["truncated"] = len(text)
    for key in ("name", "tool_call_id"):
        if item.get(key):
            view[key] = item[key]
    return view
