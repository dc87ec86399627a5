"""A real three-master Redis Cluster on loopback ports, for tests.

    from tests.redis_cluster_fixture import redis_cluster  # noqa: F401  (a ``LocalCluster``)

Three ``redis-server --cluster-enabled yes`` processes (no replicas, nothing persisted) joined
with ``redis-cli --cluster create``; the fixture waits until every node reports
``cluster_state:ok``. It fails (never skips) when ``redis-server`` or ``redis-cli`` is missing.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.cluster import RedisCluster

from tests.redis_fixture import RedisServer, free_port, require_redis_server

REDIS_CLI = "redis-cli"


def _cluster_node_args() -> list[str]:
    """redis-server flags of one cluster node. The bus port is chosen too: by default it is the
    client port + 10000, which fails for the high ports that ``free_port`` hands out."""
    return [
        "--cluster-enabled", "yes",
        "--cluster-config-file", "nodes.conf",
        "--cluster-node-timeout", "2000",
        "--cluster-port", str(free_port()),
    ]  # fmt: skip


class LocalCluster:
    """``num_masters`` cluster nodes on 127.0.0.1; ``url`` names the first (a cluster client
    discovers the others from it)."""

    def __init__(self, workdir: Path, num_masters: int = 3) -> None:
        self.nodes = [
            RedisServer(workdir / f"node{idx}", extra_args=_cluster_node_args())
            for idx in range(num_masters)
        ]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.nodes[0].port}"

    def start(self, timeout_s: float = 20.0) -> None:
        """Start the nodes, assign all 16384 slots across them and wait for ``cluster_state:ok``.
        Raises RuntimeError if the cluster does not form in time."""
        for node in self.nodes:
            node.start()
        addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
        subprocess.run(
            [REDIS_CLI, "--cluster", "create", *addresses, "--cluster-replicas", "0",
             "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=timeout_s,
        )  # fmt: skip
        deadline = time.monotonic() + timeout_s
        while not all(self._node_ok(node) for node in self.nodes):
            if time.monotonic() > deadline:
                raise RuntimeError(f"Redis Cluster {addresses} did not reach cluster_state:ok")
            time.sleep(0.05)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def client(self) -> RedisCluster:
        """A cluster client (bytes replies) for inspecting and tampering in tests."""
        return RedisCluster.from_url(self.url, socket_timeout=5)

    def keys_per_node(self, pattern: str) -> list[int]:
        """How many keys matching ``pattern`` each master holds, in node order."""
        counts = []
        for node in self.nodes:
            plain = node.client()
            counts.append(sum(1 for _ in plain.scan_iter(match=pattern, count=1000)))
            plain.close()
        return counts

    @staticmethod
    def _node_ok(node: RedisServer) -> bool:
        plain = node.client()
        try:
            info = plain.execute_command("CLUSTER", "INFO")
        except redis.RedisError:
            return False
        finally:
            plain.close()
        text = info.decode() if isinstance(info, bytes) else str(info)
        return "cluster_state:ok" in text


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A three-master Redis Cluster shared by the whole test session."""
    require_redis_server()
    if shutil.which(REDIS_CLI) is None:
        raise RuntimeError(f"{REDIS_CLI} is not installed (apt-get install redis-server)")
    cluster = LocalCluster(tmp_path_factory.mktemp("redis-cluster"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
