"""Clients for the session records and ownership keys: one Redis, or a Redis Cluster.

A cluster is named by one or more comma-separated node URLs (``redis://h1:7000,redis://h2:7000``):
the seeds it is discovered from, so one seed being down does not keep an instance from it.
Credentials and TLS come from the first URL.

``connect_redis`` returns an object with redis-py's command methods (``get``, ``set``,
``eval``, ...). For a cluster it is a ``LazyRedisCluster``: redis-py's ``RedisCluster`` asks a
node for the slot map when it is built, so building one while the cluster is down would fail
the server's start-up; the lazy client builds it on first use instead and tries again on later
calls, raising ``redis.ConnectionError`` meanwhile (which the record store and the ownership
code report as "Redis unavailable"). The KV tier builds its own clients
(``sessions.tiers.redis_wire``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.connection import parse_url
from redis.exceptions import RedisClusterException
from redis.retry import Retry


def cluster_seed_urls(urls: str) -> list[str]:
    """The node URLs of a comma-separated list; ValueError if there is none or one is not a
    ``redis://`` / ``rediss://`` URL with a host."""
    seeds = [url.strip() for url in urls.split(",") if url.strip()]
    if not seeds:
        raise ValueError(f"no Redis Cluster node URL in {urls!r}")
    for url in seeds:
        if "host" not in parse_url(url):  # parse_url raises ValueError for bad schemes/ports
            raise ValueError(f"Redis Cluster node URL without a host: {url!r}")
    return seeds


def check_redis_url(url: str, cluster: bool) -> None:
    """ValueError unless ``url`` is a Redis URL (with ``cluster``: a list of node URLs)."""
    if cluster:
        cluster_seed_urls(url)
    elif "," in url:
        raise ValueError(
            "several Redis URLs name the nodes of a Redis Cluster: add --redis-cluster "
            "(cluster=True)"
        )
    else:
        parse_url(url)


def build_cluster_client(urls: str, **options: Any) -> RedisCluster:
    """A ``RedisCluster`` discovered from the nodes of ``urls`` (comma-separated; options such
    as credentials from the first). Raises like ``RedisCluster`` while no seed answers."""
    first, *others = cluster_seed_urls(urls)
    seeds = []
    for url in others:
        parsed = parse_url(url)
        seeds.append(ClusterNode(parsed["host"], parsed.get("port", 6379)))
    return RedisCluster(url=first, startup_nodes=seeds, **options)


class LazyRedisCluster:
    """A ``RedisCluster`` made by ``build`` on first use (building one asks a node for the
    slot map, so it fails while the cluster is down), and again on later calls until that
    works. ``what`` names the cluster in errors.

    Attribute access is forwarded to the built client, so it is used exactly like one; while
    no node answers, every command raises ``redis.ConnectionError``.
    """

    def __init__(self, build: Callable[[], RedisCluster], what: str) -> None:
        self._build = build
        self.what = what
        self._client: RedisCluster | None = None
        self._lock = threading.Lock()

    @property
    def built(self) -> RedisCluster | None:
        """The client if it was built already (nothing is attempted)."""
        return self._client

    def client(self) -> RedisCluster:
        """The cluster client; raises ``redis.ConnectionError`` if it cannot be built now."""
        client = self._client
        if client is not None:
            return client
        with self._lock:
            if self._client is None:
                try:
                    self._client = self._build()
                except (RedisClusterException, redis.RedisError, OSError) as exc:
                    raise redis.ConnectionError(f"Redis Cluster at {self.what}: {exc}") from exc
            return self._client

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client(), name)


def connect_redis(
    url: str,
    *,
    cluster: bool = False,
    socket_timeout_s: float = 2.0,
    connect_timeout_s: float = 1.0,
) -> redis.Redis | LazyRedisCluster:
    """A client for ``url``: ``redis.Redis``, or with ``cluster`` a ``LazyRedisCluster``
    whose URL names one or more nodes of the cluster (comma-separated). Connects lazily in
    both cases: no Redis needs to answer yet. Replies are bytes.

    A failing command is retried once, at once (a pooled connection may have died with a
    restarted Redis), then raises: redis-py's default of 10 retries with back-off would hold
    every session request for seconds while Redis is down, and the callers already treat an
    error as "Redis unavailable".
    """
    options: dict[str, Any] = {
        "socket_timeout": socket_timeout_s,
        "socket_connect_timeout": connect_timeout_s,
        "retry": Retry(NoBackoff(), 1),
    }
    check_redis_url(url, cluster)  # a bad URL fails now, not as an outage on every call
    if cluster:
        return LazyRedisCluster(lambda: build_cluster_client(url, **options), url)
    return redis.Redis.from_url(url, **options)
