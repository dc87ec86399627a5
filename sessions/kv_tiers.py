"""KV tiers below the device pool: host memory, Redis, and a stack of tiers.

All three implement ``engine.kv_store.KVStore``; blocks are addressed by their chained content
hash, so identical prefixes are stored once per tier. Every tier may lose any block at any
time; the engine then recomputes (the token history is the truth, the KV cache is a cache).

- ``HostKVStore``: a bounded LRU dict in host memory (pinned when CUDA is present).
- ``RedisKVStore``: one msgpack frame per block (``sessions.kv_frame``), TTLs, a shared byte
  budget with LRU eviction, and no exception ever escaping ``lookup``/``load``/``save``: a Redis
  outage reads as an empty tier and shows in ``healthy``/``last_error``.
- ``TieredKVStore``: host over Redis (or any list of tiers): per-block sources, promotion of
  blocks found lower down, write-through saves.

LRU order inside one call: a sequence's tail blocks are made older than its prefix, so eviction
takes tails first (a block is useless without its prefix, as in the device pool).
"""

from __future__ import annotations

import logging
import threading
import time
from abc import abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TypeVar

import redis
import torch
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.utils import HIREDIS_AVAILABLE

from engine.block_pool import BlockHash
from engine.kv_store import KVStore
from sessions.kv_frame import (
    FrameError,
    FrameHeader,
    body_tensor,
    decode_frame,
    dtype_name,
    encode_frame,
    verify_checksum,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")
Packed = list[bytes | memoryview]  # one RESP command, big arguments left uncopied


@dataclass(slots=True)
class KVTierStats:
    """Counters of one tier, in blocks unless named otherwise."""

    hits: int = 0  # blocks returned by load
    misses: int = 0  # blocks requested by loads that returned None
    invalid: int = 0  # stored blocks discarded because they failed verification
    evictions: int = 0  # blocks evicted to respect the capacity / byte budget
    bytes_used: int = 0  # host: bytes held; Redis: the shared budget counter, as last seen
    errors: int = 0  # Redis: calls that failed (connection, timeout, error replies)


class KVTier(KVStore):
    """A KVStore that can also say block by block what it (probably) holds."""

    @abstractmethod
    def contains(self, block_hashes: Sequence[BlockHash]) -> list[bool]:
        """For each hash, whether this tier probably holds it (``load`` is the truth)."""

    def lookup(self, block_hashes: Sequence[BlockHash]) -> int:
        present = self.contains(block_hashes)
        return present.index(False) if False in present else len(present)


# --------------------------------------------------------------------------------------------
# Host memory


@dataclass(frozen=True, slots=True)
class _HostBlock:
    token_ids: tuple[int, ...]
    kv: torch.Tensor  # [num_layers, 2, block_size, num_kv_heads, head_dim]
    num_bytes: int


class HostKVStore(KVTier):
    """Blocks in host memory, at most ``capacity_bytes`` of tensor data, least recently used
    evicted first. Thread-safe. Blocks bigger than the capacity are dropped on save."""

    def __init__(self, capacity_bytes: int) -> None:
        if capacity_bytes < 0:
            raise ValueError(f"capacity_bytes must be >= 0, got {capacity_bytes}")
        self.capacity_bytes = capacity_bytes
        self._blocks: OrderedDict[BlockHash, _HostBlock] = OrderedDict()  # oldest first
        self._lock = threading.Lock()
        self._pin_memory = torch.cuda.is_available()
        self._stats = KVTierStats()

    @property
    def stats(self) -> KVTierStats:
        """A snapshot of the counters."""
        with self._lock:
            return replace(self._stats)

    def contains(self, block_hashes: Sequence[BlockHash]) -> list[bool]:
        with self._lock:
            return [block_hash in self._blocks for block_hash in block_hashes]

    def load(
        self, block_hashes: Sequence[BlockHash], token_ids: Sequence[Sequence[int]]
    ) -> torch.Tensor | None:
        """See ``KVStore.load``. A block whose stored tokens differ is discarded and logged."""
        _check_load_args(block_hashes, token_ids)
        with self._lock:
            found = [self._find(h, tuple(t)) for h, t in zip(block_hashes, token_ids, strict=True)]
            blocks = [block for block in found if block is not None]
            if not found or len(blocks) < len(found) or not _same_layout(blocks):
                self._stats.misses += len(found)
                return None
            for block_hash in reversed(block_hashes):  # prefix ends up most recently used
                self._blocks.move_to_end(block_hash)
            self._stats.hits += len(blocks)
        # Stored tensors are never written after save, so copying outside the lock is safe.
        staged = _empty_staged(blocks[0].kv, len(blocks), self._pin_memory)
        for block_idx, block in enumerate(blocks):
            staged[:, :, block_idx].copy_(block.kv)
        return staged

    def save(
        self,
        block_hashes: Sequence[BlockHash],
        token_ids: Sequence[Sequence[int]],
        staged: torch.Tensor,
    ) -> None:
        """See ``KVStore.save``. Held blocks are only touched. Blocks go in tail first, so when
        the capacity runs out within one call it is the prefix that stays."""
        _check_save_args(block_hashes, token_ids, staged)
        block_shape = (*staged.shape[:2], *staged.shape[3:])
        num_bytes = staged[:, :, 0].numel() * staged.element_size() if len(block_hashes) else 0
        with self._lock:
            for block_idx in reversed(range(len(block_hashes))):
                block_hash = block_hashes[block_idx]
                if block_hash in self._blocks:
                    self._blocks.move_to_end(block_hash)
                    continue
                if num_bytes > self.capacity_bytes:
                    continue
                self._evict_down_to(self.capacity_bytes - num_bytes)
                kv = torch.empty(block_shape, dtype=staged.dtype, pin_memory=self._pin_memory)
                kv.copy_(staged[:, :, block_idx])
                tokens = tuple(int(t) for t in token_ids[block_idx])
                self._blocks[block_hash] = _HostBlock(tokens, kv, num_bytes)
                self._stats.bytes_used += num_bytes

    def _find(self, block_hash: BlockHash, token_ids: tuple[int, ...]) -> _HostBlock | None:
        block = self._blocks.get(block_hash)
        if block is not None and block.token_ids != token_ids:
            logger.warning("host KV block %s: stored tokens differ; discarded", block_hash.hex())
            self._drop(block_hash)
            self._stats.invalid += 1
            return None
        return block

    def _evict_down_to(self, limit_bytes: int) -> None:
        while self._stats.bytes_used > limit_bytes and self._blocks:
            self._drop(next(iter(self._blocks)))
            self._stats.evictions += 1

    def _drop(self, block_hash: BlockHash) -> None:
        self._stats.bytes_used -= self._blocks.pop(block_hash).num_bytes


def _same_layout(blocks: Sequence[_HostBlock]) -> bool:
    first = blocks[0].kv
    if all(b.kv.shape == first.shape and b.kv.dtype == first.dtype for b in blocks):
        return True
    logger.warning("host KV blocks of one load differ in shape or dtype; not loaded")
    return False


# --------------------------------------------------------------------------------------------
# Redis

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

_READ_CHUNK_BYTES = 1 << 20  # hiredis reads per recv; big reads cut per-call overhead
_FIRST_WINDOW = 4  # GETs in flight while the value size is unknown


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
        self._client = _make_client(client_or_url, socket_timeout_s, connect_timeout_s)
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
        _check_load_args(block_hashes, token_ids)
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
        _check_save_args(block_hashes, token_ids, staged)
        dtype_name(staged.dtype)  # raises for dtypes a frame cannot carry
        block_shape = (*staged.shape[:2], *staged.shape[3:])
        if self.dtype is not None and staged.dtype != self.dtype:
            raise ValueError(f"this store holds {self.dtype} blocks, got {staged.dtype}")
        if self.block_shape is not None and block_shape != self.block_shape:
            raise ValueError(f"this store holds blocks of {self.block_shape}, got {block_shape}")
        if block_hashes:
            self._guarded(lambda: self._save(block_hashes, token_ids, staged), None)

    # -- the work --------------------------------------------------------------------------

    def _exists(self, keys: Sequence[str]) -> list[bool]:
        replies = self._exchange(_resp("EXISTS", key) for key in keys)
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
        window = _Window(self.inflight_bytes, self._frame_bytes_hint)
        self._stream(commands, on_reply, window)
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
                _resp("EXPIRE", keys[i], self.ttl_s) for i, is_held in enumerate(held) if is_held
            ]
        replies = self._exchange(_chain(sets, tail))
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
        command = _resp("EVAL", _LUA_DISCARD, 3, *self.index_keys, self.key_prefix, *members)
        self._exchange([command])
        with self._lock:
            self._stats.invalid += len(bad_blocks)

    def _get_command(self, key: str) -> Packed:
        if self.ttl_s is None:
            return _resp("GET", key)
        return _resp("GETEX", key, "EX", self.ttl_s)

    def _set_command(self, key: str, block: torch.Tensor, token_ids: Sequence[int]) -> Packed:
        frame = encode_frame(block, token_ids, self.fingerprint, self.kv_layout)
        if self.ttl_s is None:
            return _resp("SET", key, frame, "NX")
        return _resp("SET", key, frame, "NX", "EX", self.ttl_s)

    def _touch_commands(self, block_hashes: Sequence[BlockHash]) -> list[Packed]:
        """Move loaded blocks to the young end of the budget index (existing entries only)."""
        if self.budget_bytes is None:
            return []
        commands = [_resp("ZADD", self.index_keys[0], "XX", *_scored_members(block_hashes))]
        if self.ttl_s is not None:
            commands += [_resp("EXPIRE", key, self.ttl_s) for key in self.index_keys]
        return commands

    def _record_command(self, block_hashes: Sequence[BlockHash]) -> Packed:
        assert self.budget_bytes is not None
        prune_before = -1
        if self.ttl_s is not None:
            prune_before = _now_us() - self.ttl_s * 1_000_000
        return _resp(
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

    def _exchange(self, commands: Iterable[Packed]) -> list[object]:
        """Pipeline ``commands`` (all written before the first reply is read); their replies."""
        replies: list[object] = []
        self._stream(commands, lambda _idx, reply: replies.append(reply))
        return replies

    def _stream(
        self,
        commands: Iterable[Packed],
        on_reply: Callable[[int, object], None],
        window: _Window | None = None,
    ) -> None:
        """Pipeline ``commands`` over one pooled connection, handing each reply (an error
        reply as a ``redis.ResponseError`` object) to ``on_reply`` as it arrives.

        Without a ``window`` every command is written before the first reply is read. With
        one, commands are written ahead while the replies in flight stay within its bytes, so
        big values stream through instead of piling up in Redis's output buffer. Connection
        errors raise (and the connection is closed).
        """
        pool = self._client.connection_pool
        connection = pool.get_connection()
        try:
            _pump(connection, iter(commands), on_reply, window)
        except BaseException:
            connection.disconnect()  # replies may be left unread: never reuse it
            raise
        finally:
            pool.release(connection)

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
            num_blocks = len(self.token_ids)
            shape = (*header.block_shape[:2], num_blocks, *header.block_shape[2:])
            self.staged = torch.empty(shape, dtype=header.dtype, pin_memory=self.pin_memory)
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
            header.dtype != first.dtype
            or header.block_shape != (*first.shape[:2], *first.shape[3:])
        ):
            raise FrameError(f"dtype/shape {header.dtype}/{header.block_shape} differ in a load")
        if not verify_checksum(header, body):
            raise FrameError("checksum mismatch")
        return header, body


class _Window:
    """How many commands may be in flight so that about ``inflight_bytes`` of replies are:
    sized from a hint of the reply size, then from each reply that arrives."""

    def __init__(self, inflight_bytes: int, reply_bytes_hint: int | None) -> None:
        self.inflight_bytes = inflight_bytes
        self.num_commands = _FIRST_WINDOW
        if reply_bytes_hint is not None:
            self.observe(reply_bytes_hint)

    def observe(self, reply_bytes: int) -> None:
        self.num_commands = max(_FIRST_WINDOW, self.inflight_bytes // max(reply_bytes, 1))


def _pump(
    connection: redis.connection.Connection,
    commands: Iterator[Packed],
    on_reply: Callable[[int, object], None],
    window: _Window | None,
) -> None:
    num_pending = 0
    reply_idx = 0
    exhausted = False
    while True:
        while not exhausted and (window is None or num_pending < window.num_commands):
            command = next(commands, None)
            if command is None:
                exhausted = True
                break
            connection.send_packed_command(command, check_health=False)
            num_pending += 1
        if num_pending == 0:
            return
        try:
            reply = connection.read_response()
        except redis.ResponseError as error:  # an error reply; the connection is fine
            reply = error
        if window is not None and isinstance(reply, bytes):
            window.observe(len(reply))
        on_reply(reply_idx, reply)
        reply_idx += 1
        num_pending -= 1


def _make_client(
    client_or_url: redis.Redis | str, socket_timeout_s: float, connect_timeout_s: float
) -> redis.Redis:
    """A client with short timeouts, no retries (the next call is the retry) and big reads.

    A given client lends its address, credentials and options to a pool of the store's own,
    so its (default: blocking, retrying) settings cannot stall the engine; only clients with
    an unusual pool class (sentinel, blocking) are used as they are.
    """
    settings: dict[str, object] = {
        "socket_timeout": socket_timeout_s,
        "socket_connect_timeout": connect_timeout_s,
        "socket_read_size": _READ_CHUNK_BYTES,
        "retry": Retry(NoBackoff(), 0),
    }
    if isinstance(client_or_url, str):
        return redis.Redis.from_url(client_or_url, **settings)
    pool = client_or_url.connection_pool
    if pool.connection_kwargs.get("decode_responses"):
        raise ValueError("the Redis client must be created with decode_responses=False")
    if type(pool) is not redis.ConnectionPool:
        logger.warning("Redis client with a %s: its timeouts apply", type(pool).__name__)
        return client_or_url
    own_pool = redis.ConnectionPool(
        connection_class=pool.connection_class, **{**pool.connection_kwargs, **settings}
    )
    return redis.Redis(connection_pool=own_pool)


def _resp(*args: str | int | bytes | bytearray) -> Packed:
    """One command in the Redis protocol. Arguments over 16 KiB become their own buffer
    (no copy); the rest are joined."""
    pieces: Packed = []
    small = bytearray(b"*%d\r\n" % len(args))
    for arg in args:
        data = _arg_bytes(arg)
        small += b"$%d\r\n" % len(data)
        if len(data) > 16384:
            pieces += [bytes(small), memoryview(data)]
            small = bytearray(b"\r\n")
        else:
            small += data
            small += b"\r\n"
    pieces.append(bytes(small))
    return pieces


def _arg_bytes(arg: str | int | bytes | bytearray) -> bytes | bytearray:
    if isinstance(arg, str):
        return arg.encode()
    if isinstance(arg, int):
        return b"%d" % arg
    return arg


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


def _chain(first: Iterable[Packed], second: Iterable[Packed]) -> Iterator[Packed]:
    yield from first
    yield from second


# --------------------------------------------------------------------------------------------
# Tiers stacked


class TieredKVStore(KVTier):
    """Tiers in order, fastest first (e.g. host, then Redis).

    - lookup: leading blocks held by any tier.
    - load: each block from the first tier that holds it, in runs of consecutive blocks with
      the same source (one call per run); a run whose tier fails is retried on the tiers below.
      Blocks loaded from a lower tier are promoted (saved) into every tier above it. None if
      any block cannot be loaded.
    - save: write-through to every tier. The lower tiers are the durable ones (Redis outlives
      this process and serves other servers), so they must receive every block the upper ones
      do; each tier's save is best effort and drops what it cannot keep.
    """

    def __init__(self, tiers: Sequence[KVStore]) -> None:
        if not tiers:
            raise ValueError("TieredKVStore needs at least one tier")
        self.tiers = list(tiers)
        self._num_promoted = 0

    @property
    def num_promoted_blocks(self) -> int:
        """Blocks copied up into a faster tier by ``load`` so far."""
        return self._num_promoted

    def contains(self, block_hashes: Sequence[BlockHash]) -> list[bool]:
        return [source is not None for source in self._sources(block_hashes)]

    def load(
        self, block_hashes: Sequence[BlockHash], token_ids: Sequence[Sequence[int]]
    ) -> torch.Tensor | None:
        _check_load_args(block_hashes, token_ids)
        sources = self._sources(block_hashes)
        if not sources or None in sources:
            return None
        parts = []
        for tier_idx, start, end in _runs(sources):
            part = self._load_run(tier_idx, block_hashes[start:end], token_ids[start:end])
            if part is None:
                return None
            parts.append(part)
        if len(parts) == 1:
            return parts[0]
        if any(p.dtype != parts[0].dtype or p.shape[3:] != parts[0].shape[3:] for p in parts):
            logger.warning("KV tiers returned blocks of different dtype or shape; not loaded")
            return None
        return torch.cat(parts, dim=2)

    def save(
        self,
        block_hashes: Sequence[BlockHash],
        token_ids: Sequence[Sequence[int]],
        staged: torch.Tensor,
    ) -> None:
        for tier in self.tiers:
            tier.save(block_hashes, token_ids, staged)

    def _sources(self, block_hashes: Sequence[BlockHash]) -> list[int | None]:
        """For each block, the index of the first tier that holds it; each tier is asked
        only about the blocks the tiers above it lack."""
        sources: list[int | None] = [None] * len(block_hashes)
        missing = list(range(len(block_hashes)))
        for tier_idx, tier in enumerate(self.tiers):
            if not missing:
                break
            present = _contains(tier, [block_hashes[i] for i in missing])
            for block_idx, is_present in zip(missing, present, strict=True):
                if is_present:
                    sources[block_idx] = tier_idx
            missing = [i for i in missing if sources[i] is None]
        return sources

    def _load_run(
        self,
        tier_idx: int,
        block_hashes: Sequence[BlockHash],
        token_ids: Sequence[Sequence[int]],
    ) -> torch.Tensor | None:
        for source_idx in range(tier_idx, len(self.tiers)):
            part = self.tiers[source_idx].load(block_hashes, token_ids)
            if part is None:
                continue
            for upper in self.tiers[:source_idx]:
                upper.save(block_hashes, token_ids, part)
            self._num_promoted += len(block_hashes) if source_idx else 0
            return part
        return None


def _contains(tier: KVStore, block_hashes: Sequence[BlockHash]) -> list[bool]:
    if isinstance(tier, KVTier):
        return tier.contains(block_hashes)
    return [tier.lookup([block_hash]) == 1 for block_hash in block_hashes]


def _runs(sources: Sequence[int | None]) -> Iterator[tuple[int, int, int]]:
    """Maximal runs ``(source, start, end)`` of equal consecutive sources."""
    start = 0
    for end in range(1, len(sources) + 1):
        if end == len(sources) or sources[end] != sources[start]:
            source = sources[start]
            assert source is not None
            yield source, start, end
            start = end


# --------------------------------------------------------------------------------------------
# Argument checks shared by the tiers (caller bugs raise ValueError)


def _check_load_args(block_hashes: Sequence[BlockHash], token_ids: Sequence[Sequence[int]]) -> None:
    if len(block_hashes) != len(token_ids):
        raise ValueError(f"{len(block_hashes)} block hashes but {len(token_ids)} token lists")


def _check_save_args(
    block_hashes: Sequence[BlockHash], token_ids: Sequence[Sequence[int]], staged: torch.Tensor
) -> None:
    _check_load_args(block_hashes, token_ids)
    if staged.dim() != 6 or staged.shape[1] != 2 or staged.device.type != "cpu":
        raise ValueError(
            f"staged must be a CPU tensor [layers, 2, n, block_size, kv_heads, head_dim], "
            f"got {tuple(staged.shape)} on {staged.device}"
        )
    if staged.shape[2] != len(block_hashes):
        raise ValueError(f"staged holds {staged.shape[2]} blocks, {len(block_hashes)} hashes")
    block_size = staged.shape[3]
    if any(len(tokens) != block_size for tokens in token_ids):
        raise ValueError(f"every block must have {block_size} token ids")


def _empty_staged(block: torch.Tensor, num_blocks: int, pin_memory: bool) -> torch.Tensor:
    shape = (*block.shape[:2], num_blocks, *block.shape[2:])
    return torch.empty(shape, dtype=block.dtype, pin_memory=pin_memory)
