"""The Redis KV tier: one msgpack frame per block, TTLs, a shared byte budget with LRU
eviction, and no Redis failure ever escaping a call (an outage reads as an empty tier)."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TypeVar

import redis
import torch
from redis.utils import HIREDIS_AVAILABLE

from engine.block_pool import BlockHash
from sessions.kv_frame import (
    FrameError,
    FrameHeader,
    body_tensor,
    decode_frame,
    dtype_name,
    encode_frame,
    verify_checksum,
)
from sessions.kv_tier_base import (
    KVTier,
    KVTierStats,
    block_shape_of,
    check_load_args,
    check_save_args,
    empty_staged,
    logger,
)
from sessions.redis_wire import Packed, ReplyWindow, exchange, make_client, pack_command, stream

T = TypeVar("T")

# The budget index, per namespace and fingerprint: a sorted set of block members (hash hex) by
# last use in microseconds, a hash member -> value size, and a byte counter. Scripts keep the
# three consistent atomically. They build block keys from a prefix, which standalone Redis
# allows; Redis Cluster would need hash tags in the key names.
_LUA_FORGET = """
local function forget(lru, sizes, counter, member)
  local size = redis.call('HGET', sizes, member)
  if size then
    redis.call('HDEL', sizes, member)
    redis.call('DECRBY', counter, size)
  end
  redis.call('ZREM', lru, member)
end
"""

# KEYS: lru, sizes, counter. ARGV: block key prefix, budget bytes, prune-before score or -1,
# ttl seconds or -1, then (score, member) pairs. Records the blocks that exist (sizes via
# STRLEN, so racing writers count a block once), forgets expired entries, evicts down to the
# budget. Returns {evicted, bytes used}.
_LUA_RECORD_AND_EVICT = (
    _LUA_FORGET
    + """
local lru, sizes, counter = KEYS[1], KEYS[2], KEYS[3]
local prefix, budget, prune_before, ttl = ARGV[1], tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
for i = 5, #ARGV, 2 do
  local score, member = ARGV[i], ARGV[i + 1]
  local size = redis.call('STRLEN', prefix .. member)
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

# KEYS: lru, sizes, counter. ARGV: block key prefix, then members. Deletes blocks and their
# index entries.
_LUA_DISCARD = (
    _LUA_FORGET
    + """
for i = 2, #ARGV do
  redis.call('DEL', ARGV[1] .. ARGV[i])
  forget(KEYS[1], KEYS[2], KEYS[3], ARGV[i])
end
return #ARGV - 1
"""
)


class RedisKVStore(KVTier):
    """Blocks in Redis under ``{namespace}:kv:{fingerprint}:{hash hex}``, one frame each.

    Round trips: ``load`` is one pipelined stream (GETs are written ahead, about
    ``inflight_bytes`` of replies in flight, so Redis never buffers a whole restore for one
    client; replies are verified and copied as they arrive). ``save`` is one small pipelined
    EXISTS round trip (so held blocks are not re-sent), then one pipelined stream of SETs plus
    the budget script. ``lookup`` is one pipelined round trip.

    TTL: every block key gets ``ttl_s`` on save, refreshed on load (None: no expiry).
    Budget: with ``budget_bytes``, an index shared by all servers of this fingerprint evicts
    least recently used blocks (tails first) after each save; without it there is no index.
    Index scores come from each server's clock.

    Failures: Redis errors (refused, timeout, error replies) never raise from
    ``lookup``/``load``/``save``/``contains``: they return 0 / None / nothing / all False,
    set ``healthy`` False and ``last_error``, and the next call simply tries again. Invalid
    values (unparsable, truncated, foreign fingerprint/layout, wrong tokens, bad checksum)
    are deleted, logged as warnings and reported as misses.

    ``client_or_url``: a URL, or a client (bytes replies) whose address and options are reused
    under the store's own settings: short socket timeouts, no retries, 1 MiB reads.

    ``dtype`` and ``block_shape`` ([num_layers, 2, block_size, kv_heads, head_dim]), when
    given, are what every frame must declare (the fingerprint implies them but cannot be
    decoded into them); without them a load only requires its blocks to agree.
    """

    def __init__(
        self,
        client_or_url: redis.Redis | str,
        fingerprint: str,
        kv_layout: str = "LKBTHD",
        ttl_s: int | None = 3600,
        budget_bytes: int | None = None,
        namespace: str = "tarry",
        *,
        dtype: torch.dtype | None = None,
        block_shape: Sequence[int] | None = None,
        socket_timeout_s: float = 1.0,
        connect_timeout_s: float = 0.5,
        inflight_bytes: int = 8 << 20,
    ) -> None:
        if ttl_s is not None and ttl_s < 1:
            raise ValueError(f"ttl_s must be >= 1 or None, got {ttl_s}")
        if budget_bytes is not None and budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0 or None, got {budget_bytes}")
        self._client = make_client(client_or_url, socket_timeout_s, connect_timeout_s)
        if not HIREDIS_AVAILABLE:
            logger.warning("hiredis is not installed: Redis KV restores will be slow")
        self.fingerprint = fingerprint
        self.kv_layout = kv_layout
        self.ttl_s = ttl_s
        self.budget_bytes = budget_bytes
        self.dtype = dtype
        self.block_shape = tuple(block_shape) if block_shape is not None else None
        self.inflight_bytes = inflight_bytes
        self._frame_bytes_hint: int | None = None  # sizes the first load window; any value works
        self.key_prefix = f"{namespace}:kv:{fingerprint}:"
        index = f"{namespace}:kvindex:{fingerprint}"
        self.index_keys = (f"{index}:lru", f"{index}:sizes", f"{index}:bytes")
        self._pin_memory = torch.cuda.is_available()
        self._lock = threading.Lock()  # guards the counters and the health fields
        self._stats = KVTierStats()
        self._healthy = True
        self._last_error: str | None = None

    # -- health and stats ------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        """False after a call failed to reach Redis, until one succeeds again."""
        return self._healthy

    @property
    def last_error(self) -> str | None:
        """The latest failure, kept after recovery for reporting; None if there was none."""
        return self._last_error

    @property
    def stats(self) -> KVTierStats:
        """A snapshot of this process's counters."""
        with self._lock:
            return replace(self._stats)

    def ping(self) -> bool:
        """Probe Redis now and update ``healthy``."""
        return self._guarded(lambda: bool(self._client.ping()), False)

    def block_key(self, block_hash: BlockHash) -> str:
        return self.key_prefix + block_hash.hex()

    # -- KVStore ---------------------------------------------------------------------------

    def contains(self, block_hashes: Sequence[BlockHash]) -> list[bool]:
        if not block_hashes:
            return []
        keys = [self.block_key(h) for h in block_hashes]
        return self._guarded(lambda: self._exists(keys), [False] * len(keys))

    def load(
        self, block_hashes: Sequence[BlockHash], token_ids: Sequence[Sequence[int]]
    ) -> torch.Tensor | None:
        """See ``KVStore.load``; an empty request returns None (there is no shape to give)."""
        check_load_args(block_hashes, token_ids)
        if not block_hashes:
            return None
        staged = self._guarded(lambda: self._load(block_hashes, token_ids), None)
        with self._lock:
            if staged is None:
                self._stats.misses += len(block_hashes)
            else:
                self._stats.hits += len(block_hashes)
        return staged

    def save(
        self,
        block_hashes: Sequence[BlockHash],
        token_ids: Sequence[Sequence[int]],
        staged: torch.Tensor,
    ) -> None:
        """See ``KVStore.save``. Held blocks are not re-sent; their TTL and LRU position are
        refreshed. Raises ValueError only for inconsistent arguments (a caller bug)."""
        check_save_args(block_hashes, token_ids, staged)
        dtype_name(staged.dtype)  # raises for dtypes a frame cannot carry
        block_shape = block_shape_of(staged)
        if self.dtype is not None and staged.dtype != self.dtype:
            raise ValueError(f"this store holds {self.dtype} blocks, got {staged.dtype}")
        if self.block_shape is not None and block_shape != self.block_shape:
            raise ValueError(f"this store holds blocks of {self.block_shape}, got {block_shape}")
        if block_hashes:
            self._guarded(lambda: self._save(block_hashes, token_ids, staged), None)

    # -- the work --------------------------------------------------------------------------

    def _exists(self, keys: Sequence[str]) -> list[bool]:
        replies = exchange(self._client, [pack_command("EXISTS", key) for key in keys])
        return [reply == 1 for reply in replies]

    def _load(
        self, block_hashes: Sequence[BlockHash], token_ids: Sequence[Sequence[int]]
    ) -> torch.Tensor | None:
        keys = [self.block_key(h) for h in block_hashes]
        restore = _Restore(self, token_ids, self._pin_memory)
        num_blocks = len(keys)

        def on_reply(reply_idx: int, reply: object) -> None:
            if reply_idx < num_blocks:
                if isinstance(reply, bytes):
                    self._frame_bytes_hint = len(reply)
                restore.accept(reply_idx, reply)

        commands = [self._get_command(key) for key in keys]
        commands += self._touch_commands(block_hashes)
        window = ReplyWindow(self.inflight_bytes, self._frame_bytes_hint)
        stream(self._client, commands, on_reply, window)
        if restore.invalid:
            self._discard([(block_hashes[i], reason) for i, reason in restore.invalid])
        return restore.result()

    def _save(
        self,
        block_hashes: Sequence[BlockHash],
        token_ids: Sequence[Sequence[int]],
        staged: torch.Tensor,
    ) -> None:
        keys = [self.block_key(h) for h in block_hashes]
        held = self._exists(keys)
        new_idx = [i for i, is_held in enumerate(held) if not is_held]
        sets = (self._set_command(keys[i], staged[:, :, i], token_ids[i]) for i in new_idx)
        tail: list[Packed] = []
        if self.budget_bytes is not None:
            tail.append(self._record_command(block_hashes))
        elif self.ttl_s is not None:
            tail += [
                pack_command("EXPIRE", keys[i], self.ttl_s)
                for i, is_held in enumerate(held)
                if is_held
            ]
        replies = exchange(self._client, itertools.chain(sets, tail))
        errors = [reply for reply in replies if isinstance(reply, redis.ResponseError)]
        if errors:
            raise errors[0]  # e.g. OOM: reported through _guarded, the blocks are dropped
        if self.budget_bytes is not None:
            evicted, used = _int_pair(replies[-1])
            with self._lock:
                self._stats.evictions += evicted
                self._stats.bytes_used = used

    def _discard(self, bad_blocks: Sequence[tuple[BlockHash, str]]) -> None:
        for block_hash, reason in bad_blocks:
            logger.warning("Redis KV block %s discarded: %s", self.block_key(block_hash), reason)
        members = [block_hash.hex() for block_hash, _ in bad_blocks]
        command = pack_command("EVAL", _LUA_DISCARD, 3, *self.index_keys, self.key_prefix, *members)
        exchange(self._client, [command])
        with self._lock:
            self._stats.invalid += len(bad_blocks)

    def _get_command(self, key: str) -> Packed:
        if self.ttl_s is None:
            return pack_command("GET", key)
        return pack_command("GETEX", key, "EX", self.ttl_s)

    def _set_command(self, key: str, block: torch.Tensor, token_ids: Sequence[int]) -> Packed:
        frame = encode_frame(block, token_ids, self.fingerprint, self.kv_layout)
        if self.ttl_s is None:
            return pack_command("SET", key, frame, "NX")
        return pack_command("SET", key, frame, "NX", "EX", self.ttl_s)

    def _touch_commands(self, block_hashes: Sequence[BlockHash]) -> list[Packed]:
        """Move loaded blocks to the young end of the budget index (existing entries only)."""
        if self.budget_bytes is None:
            return []
        commands = [pack_command("ZADD", self.index_keys[0], "XX", *_scored_members(block_hashes))]
        if self.ttl_s is not None:
            commands += [pack_command("EXPIRE", key, self.ttl_s) for key in self.index_keys]
        return commands

    def _record_command(self, block_hashes: Sequence[BlockHash]) -> Packed:
        assert self.budget_bytes is not None
        prune_before = -1
        if self.ttl_s is not None:
            prune_before = _now_us() - self.ttl_s * 1_000_000
        return pack_command(
            "EVAL",
            _LUA_RECORD_AND_EVICT,
            3,
            *self.index_keys,
            self.key_prefix,
            self.budget_bytes,
            prune_before,
            self.ttl_s if self.ttl_s is not None else -1,
            *_scored_members(block_hashes),
        )

    def _guarded(self, action: Callable[[], T], fallback: T) -> T:
        """``action()``, or ``fallback`` when Redis fails; keeps ``healthy`` up to date."""
        try:
            result = action()
        except (redis.RedisError, OSError) as error:
            self._mark_down(error)
            return fallback
        self._mark_up()
        return result

    def _mark_down(self, error: Exception) -> None:
        with self._lock:
            was_healthy, self._healthy = self._healthy, False
            self._last_error = f"{type(error).__name__}: {error}"
            self._stats.errors += 1
        if was_healthy:
            logger.warning("Redis KV tier unavailable: %s", self._last_error)

    def _mark_up(self) -> None:
        if not self._healthy:
            with self._lock:
                self._healthy = True
            logger.info("Redis KV tier is reachable again")


class _Restore:
    """Verifies GET replies of one load as they arrive and copies them into the staged
    tensor. After the first absent or invalid block the rest are only drained."""

    def __init__(
        self, store: RedisKVStore, token_ids: Sequence[Sequence[int]], pin_memory: bool
    ) -> None:
        self.store = store
        self.token_ids = token_ids
        self.pin_memory = pin_memory
        self.staged: torch.Tensor | None = None
        self.failed = False
        self.invalid: list[tuple[int, str]] = []  # (block index, reason)

    def accept(self, block_idx: int, reply: object) -> None:
        if self.failed:
            return
        if not isinstance(reply, bytes):  # None: absent (expired, evicted, never stored)
            self.failed = True
            if reply is not None:
                self.invalid.append((block_idx, f"unexpected reply {reply!r:.80}"))
            return
        try:
            header, body = self._verify(reply, block_idx)
        except FrameError as error:
            self.failed = True
            self.invalid.append((block_idx, str(error)))
            return
        if self.staged is None:
            self.staged = empty_staged(
                header.block_shape, header.dtype, len(self.token_ids), self.pin_memory
            )
        self.staged[:, :, block_idx].copy_(body_tensor(header, body))

    def result(self) -> torch.Tensor | None:
        return None if self.failed else self.staged

    def _verify(self, value: bytes, block_idx: int) -> tuple[FrameHeader, memoryview]:
        """The frame's header and body if it is this block's, else FrameError. Cheap checks
        first; the checksum pass over the body last."""
        header, body = decode_frame(value)
        if header.fingerprint != self.store.fingerprint:
            raise FrameError(f"foreign fingerprint {header.fingerprint!r}")
        if header.layout != self.store.kv_layout:
            raise FrameError(f"foreign layout {header.layout!r}")
        if header.token_ids != tuple(self.token_ids[block_idx]):
            raise FrameError("stored tokens differ from the requested ones")
        if header.block_shape[2] != len(header.token_ids):
            raise FrameError(f"block shape {header.block_shape} does not fit its tokens")
        store = self.store
        if store.dtype is not None and header.dtype != store.dtype:
            raise FrameError(f"foreign dtype {header.dtype}")
        if store.block_shape is not None and header.block_shape != store.block_shape:
            raise FrameError(f"foreign block shape {header.block_shape}")
        first = self.staged
        if first is not None and (
            header.dtype != first.dtype or header.block_shape != block_shape_of(first)
        ):
            raise FrameError(f"dtype/shape {header.dtype}/{header.block_shape} differ in a load")
        if not verify_checksum(header, body):
            raise FrameError("checksum mismatch")
        return header, body


def _scored_members(block_hashes: Sequence[BlockHash]) -> list[str | int]:
    """``score, member`` pairs for the budget index: now, minus one microsecond per position,
    so a sequence's tail is older than its prefix."""
    now_us = _now_us()
    pairs: list[str | int] = []
    for block_idx, block_hash in enumerate(block_hashes):
        pairs += [now_us - block_idx, block_hash.hex()]
    return pairs


def _int_pair(reply: object) -> tuple[int, int]:
    if not isinstance(reply, list) or len(reply) != 2:
        raise redis.ResponseError(f"unexpected budget script reply {reply!r:.80}")
    return int(reply[0]), int(reply[1])


def _now_us() -> int:
    return time.time_ns() // 1000
