"""The Redis KV tier: one msgpack frame per block, TTLs, a byte budget with LRU eviction per
index shard, on a single Redis or a Redis Cluster, and no Redis failure ever escaping a call
(an outage reads as an empty tier)."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from typing import TypeVar

import redis
import torch
from redis.cluster import RedisCluster
from redis.utils import HIREDIS_AVAILABLE

from engine.block_pool import BlockHash
from sessions.tiers.base import (
    KVTier,
    KVTierStats,
    block_shape_of,
    check_load_args,
    check_save_args,
    empty_staged,
    logger,
)
from sessions.tiers.cluster_routing import REDIS_FAILURES, make_router
from sessions.tiers.frame import (
    FrameError,
    FrameHeader,
    body_tensor,
    decode_frame,
    dtype_name,
    encode_frame,
    verify_checksum,
)
from sessions.tiers.redis_index import (
    DEFAULT_CLUSTER_SHARDS,
    LUA_DISCARD,
    LUA_RECORD_AND_EVICT,
    KeyLayout,
    lru_scores,
    now_us,
)
from sessions.tiers.redis_wire import Packed, ReplyWindow, Route, exchange, pack_command, stream

T = TypeVar("T")


class RedisKVStore(KVTier):
    """Blocks in Redis, one frame each, on a single Redis or a Redis Cluster (one code path;
    only the default number of shards differs).

    Round trips: ``load`` is one pipelined stream (GETs are written ahead, about
    ``inflight_bytes`` of replies in flight per connection, so no Redis buffers a whole
    restore for one client; replies are verified and copied as they arrive). ``save`` is one
    small pipelined EXISTS round trip (so held blocks are not re-sent), then one pipelined
    stream of SETs plus the budget script of each shard it touched. ``lookup`` is one
    pipelined round trip. On a cluster every stream is split by node and sent to all nodes
    at once, each over its own connection, replies handed back in command order: a call
    costs the same round trips as on one Redis.

    Keys (``KeyLayout``), the same on a single Redis and on a cluster::

        <namespace>:kv:{<fingerprint>.<shard>}:<hash hex>              one block's frame
        <namespace>:kvindex:{<fingerprint>.<shard>}:lru|sizes|bytes    its shard's budget index

    e.g. ``tarry:kv:{3f2a...c1.7}:9ab4...`` and ``tarry:kvindex:{3f2a...c1.7}:lru``. The
    braces are a Redis Cluster hash tag: a shard's blocks and index share one slot, so its
    budget scripts run on one node, while the ``index_shards`` shards (default 1 on a single
    Redis, 16 on a cluster) spread a fingerprint's blocks over the nodes.

    TTL: every block key gets ``ttl_s`` on save, refreshed on load and when a save finds it
    held (None: no expiry).
    Budget: with ``budget_bytes``, each shard keeps an index shared by all servers of this
    fingerprint and, after each save that touched it, evicts its least recently used blocks
    (tails first) down to its share, ``budget_bytes // index_shards``. LRU is per shard, so
    globally approximate: a shard may evict while another is under its share. The bytes
    used stay within ``budget_bytes`` summed over the shards. Without a budget there is no
    index. Index scores come from each server's clock.

    Failures: Redis errors (refused, timeout, error replies) never raise from
    ``lookup``/``load``/``save``/``contains``: they return 0 / None / nothing / all False,
    set ``healthy`` False and ``last_error``, and the next call simply tries again. On a
    cluster, one node down, a slot moved (MOVED, ASK) or a cluster in flux (CLUSTERDOWN,
    TRYAGAIN) fail the whole call the same way, and the slot map is reloaded for the next
    one. Invalid values (unparsable, truncated, foreign fingerprint/layout, wrong tokens,
    bad checksum) are deleted, logged as warnings and reported as misses.

    ``client_or_url``: a URL (a cluster node's with ``cluster=True``), a ``redis.Redis`` or
    a ``redis.cluster.RedisCluster`` (bytes replies) whose addresses, credentials and TLS
    options are reused under the store's own settings: short socket timeouts, no retries,
    1 MiB reads. Creating a store connects to nothing: a cluster client is built on first
    use and on later calls until the cluster answers.

    ``dtype`` and ``block_shape`` ([num_layers, 2, block_size, kv_heads, head_dim]), when
    given, are what every frame must declare (the fingerprint implies them but cannot be
    decoded into them); without them a load only requires its blocks to agree.
    """

    tier_name = "redis"

    def __init__(
        self,
        client_or_url: redis.Redis | RedisCluster | str,
        fingerprint: str,
        kv_layout: str = "LKBTHD",
        ttl_s: int | None = 3600,
        budget_bytes: int | None = None,
        namespace: str = "tarry",
        *,
        cluster: bool = False,
        index_shards: int | None = None,
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
        self._router = make_router(client_or_url, cluster, socket_timeout_s, connect_timeout_s)
        if not HIREDIS_AVAILABLE:
            logger.warning("hiredis is not installed: Redis KV restores will be slow")
        self.is_cluster = self._router.is_cluster
        if index_shards is None:
            index_shards = DEFAULT_CLUSTER_SHARDS if self.is_cluster else 1
        self.keys = KeyLayout(namespace, fingerprint, index_shards)
        self.fingerprint = fingerprint
        self.kv_layout = kv_layout
        self.ttl_s = ttl_s
        self.budget_bytes = budget_bytes
        self.shard_budget_bytes = None if budget_bytes is None else budget_bytes // index_shards
        self.dtype = dtype
        self.block_shape = tuple(block_shape) if block_shape is not None else None
        self.inflight_bytes = inflight_bytes
        self._frame_bytes_hint: int | None = None  # sizes the first load window; any value works
        self._pin_memory = torch.cuda.is_available()
        self._lock = threading.Lock()  # guards the counters and the health fields
        self._stats = KVTierStats()
        self._shard_bytes_used: dict[int, int] = {}  # each shard's counter, as last seen
        self._healthy = True
        self._last_error: str | None = None

    # -- health, stats and keys ------------------------------------------------------------

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
        """A snapshot of this process's counters; ``bytes_used`` sums the shards' counters
        as this process last saw them."""
        with self._lock:
            return replace(self._stats)

    def ping(self) -> bool:
        """Probe Redis (every primary of a cluster) now and update ``healthy``."""
        return self._guarded(self._ping, False)

    def block_key(self, block_hash: BlockHash) -> str:
        return self.keys.block_key(block_hash)

    def shard_of(self, block_hash: BlockHash) -> int:
        return self.keys.shard_of(block_hash)

    def index_keys(self, shard: int) -> tuple[str, str, str]:
        """The budget index of ``shard``: its LRU zset, sizes hash and byte counter."""
        return self.keys.index_keys[shard]

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

    def _ping(self) -> bool:
        pools = self._router.every_node()
        replies = exchange(Route(pools, range(len(pools))), [pack_command("PING")] * len(pools))
        _raise_first_error(replies)
        return True

    def _exists(self, keys: Sequence[str]) -> list[bool]:
        replies = self._exchange(keys, [pack_command("EXISTS", key) for key in keys])
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

        touch = self._touch_commands(block_hashes)
        commands = [self._get_command(key) for key in keys] + touch.commands
        window = ReplyWindow(self.inflight_bytes, self._frame_bytes_hint)
        stream(self._router.route(keys + touch.keys), commands, on_reply, window)
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
        if self.budget_bytes is not None:
            tail, recorded_shards = self._record_commands(block_hashes, keys)
        else:
            tail, recorded_shards = self._expire_commands(keys, held), []
        route = self._router.route([keys[i] for i in new_idx] + tail.keys)
        replies = exchange(route, itertools.chain(sets, tail.commands))
        _raise_first_error(replies)  # e.g. OOM: reported through _guarded, the blocks dropped
        if recorded_shards:
            self._count_budget(recorded_shards, replies[len(new_idx) :])
        block_bytes = staged[:, :, 0].numel() * staged.element_size()
        with self._lock:
            self._stats.bytes_written += len(new_idx) * block_bytes

    def _discard(self, bad_blocks: Sequence[tuple[BlockHash, str]]) -> None:
        for block_hash, reason in bad_blocks:
            logger.warning("Redis KV block %s discarded: %s", self.block_key(block_hash), reason)
        hashes = [block_hash for block_hash, _ in bad_blocks]
        batch = _Batch()
        for shard, block_idxs in self.keys.by_shard(hashes).items():
            lru, sizes, counter = self.index_keys(shard)
            block_keys = [self.block_key(hashes[i]) for i in block_idxs]
            members = [hashes[i].hex() for i in block_idxs]
            batch.add(lru, "EVAL", LUA_DISCARD, 3 + len(block_keys), lru, sizes, counter,
                      *block_keys, *members)  # fmt: skip
        self._exchange(batch.keys, batch.commands)
        with self._lock:
            self._stats.invalid += len(bad_blocks)

    def _count_budget(self, shards: Sequence[int], replies: Sequence[object]) -> None:
        """Take in the budget scripts' replies, one per shard of ``shards``."""
        results = [_int_pair(reply) for reply in replies]
        with self._lock:
            for shard, (num_evicted, bytes_used) in zip(shards, results, strict=True):
                self._stats.evictions += num_evicted
                self._shard_bytes_used[shard] = bytes_used
            self._stats.bytes_used = sum(self._shard_bytes_used.values())

    def _exchange(self, keys: Sequence[str], commands: Iterable[Packed]) -> list[object]:
        return exchange(self._router.route(keys), commands)

    # -- commands --------------------------------------------------------------------------

    def _get_command(self, key: str) -> Packed:
        if self.ttl_s is None:
            return pack_command("GET", key)
        return pack_command("GETEX", key, "EX", self.ttl_s)

    def _set_command(self, key: str, block: torch.Tensor, token_ids: Sequence[int]) -> Packed:
        frame = encode_frame(block, token_ids, self.fingerprint, self.kv_layout)
        if self.ttl_s is None:
            return pack_command("SET", key, frame, "NX")
        return pack_command("SET", key, frame, "NX", "EX", self.ttl_s)

    def _expire_commands(self, keys: Sequence[str], held: Sequence[bool]) -> _Batch:
        """Refresh the TTL of held blocks (without a budget; its script does it otherwise)."""
        batch = _Batch()
        if self.ttl_s is not None:
            for key, is_held in zip(keys, held, strict=True):
                if is_held:
                    batch.add(key, "EXPIRE", key, self.ttl_s)
        return batch

    def _touch_commands(self, block_hashes: Sequence[BlockHash]) -> _Batch:
        """Move loaded blocks to the young end of their shard's budget index (existing
        entries only)."""
        batch = _Batch()
        if self.budget_bytes is None:
            return batch
        scores = lru_scores(len(block_hashes))
        for shard, block_idxs in self.keys.by_shard(block_hashes).items():
            lru, sizes, counter = self.index_keys(shard)
            pairs = [arg for i in block_idxs for arg in (scores[i], block_hashes[i].hex())]
            batch.add(lru, "ZADD", lru, "XX", *pairs)
            if self.ttl_s is not None:
                for key in (lru, sizes, counter):
                    batch.add(key, "EXPIRE", key, self.ttl_s)
        return batch

    def _record_commands(
        self, block_hashes: Sequence[BlockHash], keys: Sequence[str]
    ) -> tuple[_Batch, list[int]]:
        """One budget script per shard that ``block_hashes`` touch; the batch and, for each
        of its commands, the shard."""
        assert self.shard_budget_bytes is not None
        prune_before = -1
        if self.ttl_s is not None:
            prune_before = now_us() - self.ttl_s * 1_000_000
        scores = lru_scores(len(block_hashes))
        batch, shards = _Batch(), []
        for shard, block_idxs in self.keys.by_shard(block_hashes).items():
            lru, sizes, counter = self.index_keys(shard)
            pairs = [arg for i in block_idxs for arg in (scores[i], block_hashes[i].hex())]
            batch.add(
                lru,
                "EVAL",
                LUA_RECORD_AND_EVICT,
                3 + len(block_idxs),
                lru,
                sizes,
                counter,
                *[keys[i] for i in block_idxs],
                self.keys.block_prefixes[shard],
                self.shard_budget_bytes,
                prune_before,
                self.ttl_s if self.ttl_s is not None else -1,
                *pairs,
            )
            shards.append(shard)
        return batch, shards

    # -- health ----------------------------------------------------------------------------

    def _guarded(self, action: Callable[[], T], fallback: T) -> T:
        """``action()``, or ``fallback`` when Redis fails; keeps ``healthy`` up to date and
        lets the router recover (a cluster reloads its slot map)."""
        try:
            result = action()
        except REDIS_FAILURES as error:
            self._mark_down(error)
            self._router.recover(error)
            return fallback
        self._mark_up()
        return result

    def _mark_down(self, error: BaseException) -> None:
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


class _Batch:
    """Small commands of one stream, each with the key it is routed by."""

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.commands: list[Packed] = []

    def add(self, route_key: str, *args: str | int | bytes) -> None:
        self.keys.append(route_key)
        self.commands.append(pack_command(*args))


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


def _raise_first_error(replies: Sequence[object]) -> None:
    for reply in replies:
        if isinstance(reply, redis.ResponseError):
            raise reply


def _int_pair(reply: object) -> tuple[int, int]:
    if not isinstance(reply, list) or len(reply) != 2:
        raise redis.ResponseError(f"unexpected budget script reply {reply!r:.80}")
    return int(reply[0]), int(reply[1])
