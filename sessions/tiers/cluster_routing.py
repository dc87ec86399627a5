"""Which connection each command of the Redis KV tier goes to: the one Redis, or the Redis
Cluster node that owns the command's key slot.

A router turns the keys of a stream of commands into a ``Route`` (``sessions.tiers.redis_wire``);
after a failed call the store hands it the error (``recover``) so a cluster router can
refresh its slot map. Routers never retry: the store's next call is the retry.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import redis
from redis.cluster import RedisCluster
from redis.connection import ConnectionPool
from redis.exceptions import RedisClusterException

from sessions.redis_connect import LazyRedisCluster
from sessions.tiers.base import logger
from sessions.tiers.redis_wire import (
    CLUSTER_ERROR_REPLIES,
    Route,
    make_client,
    make_cluster_client_factory,
)

# Errors a call can fail with, whichever the kind of Redis (RedisClusterException is not a
# RedisError: it reports a cluster that cannot be reached or whose slot map has holes).
REDIS_FAILURES = (redis.RedisError, RedisClusterException, OSError)

# Failures after which a cluster's slot map may be stale: a node went away, a slot moved.
_TOPOLOGY_FAILURES = (
    redis.ConnectionError,
    OSError,
    RedisClusterException,
    *CLUSTER_ERROR_REPLIES,
)


class Router(Protocol):
    is_cluster: bool

    def route(self, keys: Sequence[str]) -> Route:
        """Where the commands whose keys are ``keys`` (one per command) go. May raise one of
        ``REDIS_FAILURES`` (a cluster that cannot be reached, a slot nobody serves)."""

    def every_node(self) -> list[ConnectionPool]:
        """One pool per node (per primary of a cluster), for probes. May raise as ``route``."""

    def recover(self, error: BaseException) -> None:
        """Called after a call failed with ``error``; never raises."""


class StandaloneRouter:
    """Every command to one Redis, over ``client``'s pool."""

    is_cluster = False

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._route = Route([client.connection_pool])

    def route(self, keys: Sequence[str]) -> Route:
        return self._route

    def every_node(self) -> list[ConnectionPool]:
        return [self.client.connection_pool]

    def recover(self, error: BaseException) -> None:
        pass  # a pooled connection that failed was closed; the next call reconnects


class ClusterRouter:
    """Each command to the primary that owns its key's slot, per the client's slot map.

    The cluster client is built on first use (``connect`` raises while no startup node
    answers) and again on later calls until that works, so a store can be created while the
    cluster is down. After a connection failure or a redirection (MOVED, ASK, CLUSTERDOWN,
    TRYAGAIN) the slot map is reloaded from the nodes, at most once per failed call.
    """

    is_cluster = True

    def __init__(self, cluster: LazyRedisCluster) -> None:
        self._cluster = cluster

    def route(self, keys: Sequence[str]) -> Route:
        client = self._cluster.client()
        pools: list[ConnectionPool] = []
        pool_idx_of_slot: dict[int, int] = {}
        pool_idx_of_node: dict[str, int] = {}
        pool_idx: list[int] = []
        for key in keys:
            slot = client.keyslot(key)
            idx = pool_idx_of_slot.get(slot)
            if idx is None:
                node = client.nodes_manager.get_node_from_slot(slot)
                idx = pool_idx_of_node.get(node.name)
                if idx is None:
                    idx = pool_idx_of_node[node.name] = len(pools)
                    pools.append(client.get_redis_connection(node).connection_pool)
                pool_idx_of_slot[slot] = idx
            pool_idx.append(idx)
        return Route(pools, pool_idx)

    def every_node(self) -> list[ConnectionPool]:
        client = self._cluster.client()
        return [
            client.get_redis_connection(node).connection_pool for node in client.get_primaries()
        ]

    def recover(self, error: BaseException) -> None:
        client = self._cluster.built
        if client is None or not isinstance(error, _TOPOLOGY_FAILURES):
            return  # not built yet (the next call builds it), or the map is not in doubt
        try:
            client.nodes_manager.initialize(disconnect_startup_nodes_pools=False)
        except REDIS_FAILURES as refresh_error:
            logger.debug("Redis Cluster slot map not refreshed: %s", refresh_error)


def make_router(
    client_or_url: redis.Redis | RedisCluster | str,
    cluster: bool,
    socket_timeout_s: float,
    connect_timeout_s: float,
) -> Router:
    """A router over the store's own client (see ``make_client`` and
    ``make_cluster_client_factory``): a cluster router for a ``RedisCluster`` or for a URL
    with ``cluster``, else a standalone one. Connects to nothing; ValueError for a client
    that decodes replies or a plain client with ``cluster``."""
    if isinstance(client_or_url, RedisCluster) or (cluster and isinstance(client_or_url, str)):
        connect = make_cluster_client_factory(client_or_url, socket_timeout_s, connect_timeout_s)
        return ClusterRouter(LazyRedisCluster(connect, "the KV tier's seed nodes"))
    if cluster:
        raise ValueError("cluster=True needs a URL or a redis.cluster.RedisCluster client")
    return StandaloneRouter(make_client(client_or_url, socket_timeout_s, connect_timeout_s))
