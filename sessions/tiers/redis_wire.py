"""Talking to Redis for the Redis KV tier: its clients, RESP command packing and streamed
pipelines (commands written ahead of their replies, with a window for big values), over one
connection or over one connection per Redis Cluster node."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.connection import Connection, ConnectionPool
from redis.exceptions import AskError, ClusterError, TryAgainError
from redis.retry import Retry

from sessions.redis_connect import build_cluster_client, cluster_seed_urls
from sessions.tiers.base import logger

Packed = list[bytes | memoryview]  # one RESP command, big arguments left uncopied

_READ_CHUNK_BYTES = 1 << 20  # hiredis reads per recv; big reads cut per-call overhead
_FIRST_WINDOW = 4  # GETs in flight per connection while the value size is unknown
_MAX_JOINED_ARG_BYTES = 16384  # bigger command arguments are sent from their own buffer

# Error replies that mean "this command went to the wrong node, or the cluster is in flux"
# (MOVED and ASK, CLUSTERDOWN and MASTERDOWN, TRYAGAIN): the call fails as a whole.
CLUSTER_ERROR_REPLIES = (AskError, ClusterError, TryAgainError)

# What a given cluster client lends to the store's own: credentials and TLS, nothing that
# could make a call block or retry.
_LENT_CLUSTER_OPTIONS = ("username", "password", "credential_provider", "client_name")


def _settings(socket_timeout_s: float, connect_timeout_s: float) -> dict[str, Any]:
    return {
        "socket_timeout": socket_timeout_s,
        "socket_connect_timeout": connect_timeout_s,
        "socket_read_size": _READ_CHUNK_BYTES,
    }


def make_client(
    client_or_url: redis.Redis | str, socket_timeout_s: float, connect_timeout_s: float
) -> redis.Redis:
    """A single-Redis client with short timeouts, no retries (the next call is the retry)
    and big reads. Connects lazily: building it needs no server.

    A given client lends its address, credentials and options to a pool of the store's own,
    so its (default: blocking, retrying) settings cannot stall the engine; only clients with
    an unusual pool class (sentinel, blocking) are used as they are.
    """
    settings = {**_settings(socket_timeout_s, connect_timeout_s), "retry": Retry(NoBackoff(), 0)}
    if isinstance(client_or_url, str):
        return redis.Redis.from_url(client_or_url, **settings)
    pool = client_or_url.connection_pool
    _require_bytes_replies(pool.connection_kwargs)
    if type(pool) is not redis.ConnectionPool:
        logger.warning("Redis client with a %s: its timeouts apply", type(pool).__name__)
        return client_or_url
    own_pool = redis.ConnectionPool(
        connection_class=pool.connection_class, **{**pool.connection_kwargs, **settings}
    )
    return redis.Redis(connection_pool=own_pool)


def make_cluster_client_factory(
    client_or_url: RedisCluster | str, socket_timeout_s: float, connect_timeout_s: float
) -> Callable[[], RedisCluster]:
    """What builds the store's own Redis Cluster client, with the same short timeouts, no
    retries and big reads as ``make_client``.

    Building a cluster client asks a node for the slot map, so it is left to the caller's
    first use: the returned function raises (``RedisClusterException``, ``RedisError``) while
    no startup node answers. A URL string names one or more startup nodes (comma-separated,
    ``sessions.redis_connect``); a given client lends its startup nodes (all nodes it
    discovered), credentials and TLS options. A client that decodes replies raises ValueError
    now.
    """
    settings = _settings(socket_timeout_s, connect_timeout_s)
    cluster_settings: dict[str, Any] = {
        "retry": Retry(NoBackoff(), 0),
        "require_full_coverage": False,
    }
    if isinstance(client_or_url, str):
        urls = client_or_url
        cluster_seed_urls(urls)  # ValueError now for an empty list
        return lambda: build_cluster_client(urls, **settings, **cluster_settings)
    lent = client_or_url.get_connection_kwargs()
    _require_bytes_replies(lent)
    options = {
        name: value
        for name, value in lent.items()
        if name in _LENT_CLUSTER_OPTIONS or name.startswith("ssl")
    }
    startup_nodes = [
        (node.host, node.port) for node in client_or_url.nodes_manager.startup_nodes.values()
    ]
    return lambda: RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in startup_nodes],
        **options,
        **settings,
        **cluster_settings,
    )


def _require_bytes_replies(connection_kwargs: dict[str, object]) -> None:
    if connection_kwargs.get("decode_responses"):
        raise ValueError("the Redis client must be created with decode_responses=False")


def pack_command(*args: str | int | bytes | bytearray) -> Packed:
    """One command in the Redis protocol. Arguments over 16 KiB become their own buffer
    (no copy); the rest are joined."""
    pieces: Packed = []
    small = bytearray(b"*%d\r\n" % len(args))
    for arg in args:
        data = _arg_bytes(arg)
        small += b"$%d\r\n" % len(data)
        if len(data) > _MAX_JOINED_ARG_BYTES:
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


class ReplyWindow:
    """How many commands may be in flight on one connection so that about ``inflight_bytes``
    of replies are: sized from a hint of the reply size, then from each reply that arrives."""

    def __init__(self, inflight_bytes: int, reply_bytes_hint: int | None) -> None:
        self.inflight_bytes = inflight_bytes
        self.num_commands = _FIRST_WINDOW
        if reply_bytes_hint is not None:
            self.observe(reply_bytes_hint)

    def observe(self, reply_bytes: int) -> None:
        self.num_commands = max(_FIRST_WINDOW, self.inflight_bytes // max(reply_bytes, 1))


@dataclass(frozen=True, slots=True)
class Route:
    """Where the commands of one stream go: command ``i`` to ``pools[pool_idx[i]]``, or
    every command to ``pools[0]`` when ``pool_idx`` is None (a single Redis)."""

    pools: Sequence[ConnectionPool]
    pool_idx: Sequence[int] | None = None


def exchange(route: Route, commands: Iterable[Packed]) -> list[object]:
    """Pipeline ``commands`` (all written before the first reply is read); their replies,
    in command order."""
    replies: list[object] = []
    stream(route, commands, lambda _idx, reply: replies.append(reply))
    return replies


def stream(
    route: Route,
    commands: Iterable[Packed],
    on_reply: Callable[[int, object], None],
    window: ReplyWindow | None = None,
) -> None:
    """Pipeline ``commands`` over one pooled connection per pool of ``route``, handing each
    reply (an error reply as a ``redis.ResponseError`` object) to ``on_reply`` with its
    command's index, in command order, as it arrives.

    Without a ``window`` every command is written before the first reply is read. With one,
    commands are written ahead (in order) while each connection's replies in flight stay
    within the window, so big values stream through instead of piling up in any node's
    output buffer. Connection errors and cluster redirections (``CLUSTER_ERROR_REPLIES``)
    raise, and every connection of the stream is closed.
    """
    pools = route.pools
    connections: list[Connection] = []
    try:
        for pool in pools:
            connections.append(pool.get_connection())
        _Pump(connections, route.pool_idx, iter(commands), window).run(on_reply)
    except BaseException:
        for connection in connections:
            connection.disconnect()  # replies may be left unread: never reuse them
        raise
    finally:
        for pool, connection in zip(pools, connections, strict=False):
            pool.release(connection)


class _Pump:
    """One streamed pipeline: commands are written in order while their connection has room
    in the window; replies are read in command order (each is the next one on its command's
    connection, because every connection receives its commands in order)."""

    def __init__(
        self,
        connections: Sequence[Connection],
        pool_idx: Sequence[int] | None,
        commands: Iterator[Packed],
        window: ReplyWindow | None,
    ) -> None:
        self.connections = connections
        self.pool_idx = pool_idx
        self.commands = commands
        self.window = window
        self.num_pending = [0] * len(connections)  # per connection: sent, not yet answered
        self.in_flight: deque[int] = deque()  # the connection of each pending command
        self.num_sent = 0
        self.next_command: Packed | None = None
        self.exhausted = False

    def run(self, on_reply: Callable[[int, object], None]) -> None:
        reply_idx = 0
        while True:
            self._write_ahead()
            if not self.in_flight:
                return
            on_reply(reply_idx, self._read_next())
            reply_idx += 1

    def _write_ahead(self) -> None:
        window = self.window
        while not self.exhausted:
            if self.next_command is None:
                self.next_command = next(self.commands, None)
                if self.next_command is None:
                    self.exhausted = True
                    return
            conn_idx = 0 if self.pool_idx is None else self.pool_idx[self.num_sent]
            if window is not None and self.num_pending[conn_idx] >= window.num_commands:
                return  # wait for this connection's replies; order is kept
            self.connections[conn_idx].send_packed_command(self.next_command, check_health=False)
            self.next_command = None
            self.num_pending[conn_idx] += 1
            self.in_flight.append(conn_idx)
            self.num_sent += 1

    def _read_next(self) -> object:
        conn_idx = self.in_flight.popleft()
        try:
            reply = self.connections[conn_idx].read_response()
        except CLUSTER_ERROR_REPLIES:
            raise
        except redis.ResponseError as error:  # an error reply; the connection is fine
            reply = error
        self.num_pending[conn_idx] -= 1
        if self.window is not None and isinstance(reply, bytes):
            self.window.observe(len(reply))
        return reply
