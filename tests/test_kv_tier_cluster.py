"""The Redis KV tier on a real three-master Redis Cluster: sharded keys on every master,
budget per shard, verification, and failures (a node down, hung, a slot moved)."""

from __future__ import annotations

import functools
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from redis.cluster import RedisCluster
from redis.crc import key_slot

from sessions.redis_connect import connect_redis
from sessions.tiers import RedisKVStore
from sessions.tiers.frame import encode_frame
from tests.kv_tier_helpers import (
    Blocks,
    check_budget_index,
    check_budget_lru_is_per_shard,
    exactly_equal,
    flip_body_byte,
    get_bytes,
    make_blocks,
    num_calls,
)
from tests.redis_cluster_fixture import LocalCluster, redis_cluster  # noqa: F401
from tests.redis_fixture import free_port, require_redis_server

LOGGER = "sessions.tiers"


@pytest.fixture
def namespace() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def raw(redis_cluster: LocalCluster) -> Iterator[RedisCluster]:  # noqa: F811
    client = redis_cluster.client()
    yield client
    client.close()


@pytest.fixture(scope="module")
def spare_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A cluster of this module's own for the tests that stop, pause or reshard it; each of
    them leaves it serving every slot again."""
    require_redis_server()
    cluster = LocalCluster(tmp_path_factory.mktemp("spare-cluster"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def cluster_store(url: str, namespace: str, **kwargs: Any) -> RedisKVStore:
    return RedisKVStore(url, fingerprint="fp-test", namespace=namespace, cluster=True, **kwargs)


def wait_until(condition: Callable[[], bool], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.1)


# -- values and layout ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "inflight_bytes"), [(torch.float32, 8 << 20), (torch.bfloat16, 1)]
)
def test_cluster_round_trip_is_exact(
    redis_cluster: LocalCluster,  # noqa: F811
    namespace: str,
    dtype: torch.dtype,
    inflight_bytes: int,
) -> None:
    """``inflight_bytes=1``: the smallest window, so every node's connection keeps stalling
    the writes while replies from all three are read in command order."""
    store = cluster_store(redis_cluster.url, namespace, inflight_bytes=inflight_bytes)
    blocks = make_blocks(64, dtype)
    assert store.is_cluster and store.keys.num_shards == 16
    assert store.lookup(blocks.hashes) == 0
    assert store.load(blocks.hashes, blocks.token_ids) is None
    store.save(blocks.hashes, blocks.token_ids, blocks.staged)
    assert store.lookup(blocks.hashes) == 64
    assert exactly_equal(store.load(blocks.hashes, blocks.token_ids), blocks.staged)
    tail = blocks.part(40, 64)
    assert exactly_equal(store.load(tail.hashes, tail.token_ids), tail.staged)
    assert store.ping() and store.healthy and store.last_error is None
    assert (store.stats.hits, store.stats.misses, store.stats.errors) == (88, 64, 0)


def test_cluster_seed_list_skips_a_dead_seed(
    redis_cluster: LocalCluster,  # noqa: F811
    namespace: str,
) -> None:
    """Several comma-separated seeds: the first answers nothing, the cluster is found through
    the second, for the KV tier and for the records / leases client alike."""
    seeds = f"redis://127.0.0.1:{free_port()},{redis_cluster.url}"
    store = cluster_store(seeds, namespace)
    blocks = make_blocks(8)
    store.save(blocks.hashes, blocks.token_ids, blocks.staged)
    assert exactly_equal(store.load(blocks.hashes, blocks.token_ids), blocks.staged)
    assert store.healthy
    client = connect_redis(seeds, cluster=True)
    client.set(f"{namespace}:probe", b"1")
    assert client.get(f"{namespace}:probe") == b"1"
    with pytest.raises(ValueError, match="cluster"):
        connect_redis(seeds)  # several URLs without cluster=True


def test_cluster_blocks_and_indexes_spread_over_every_master(
    redis_cluster: LocalCluster,  # noqa: F811
    raw: RedisCluster,
    namespace: str,
) -> None:
    store, blocks = (
        cluster_store(redis_cluster.url, namespace, budget_bytes=1 << 30),
        make_blocks(64),
    )
    store.save(blocks.hashes, blocks.token_ids, blocks.staged)
    per_node = redis_cluster.keys_per_node(f"{namespace}:kv:*")
    assert sum(per_node) == 64 and all(count > 0 for count in per_node), per_node
    assert all(count > 0 for count in redis_cluster.keys_per_node(f"{namespace}:kvindex:*"))
    for block_hash in blocks.hashes:
        keys = (store.block_key(block_hash), *store.index_keys(store.shard_of(block_hash)))
        assert len({key_slot(key.encode()) for key in keys}) == 1
    assert sum(check_budget_index(store, raw)) == store.stats.bytes_used


def test_cluster_store_from_a_client(redis_cluster: LocalCluster, namespace: str) -> None:  # noqa: F811
    client = redis_cluster.client()
    store, blocks = RedisKVStore(client, "fp-test", namespace=namespace), make_blocks(8)
    assert store.is_cluster and store.keys.num_shards == 16
    store.save(blocks.hashes, blocks.token_ids, blocks.staged)
    assert exactly_equal(store.load(blocks.hashes, blocks.token_ids), blocks.staged)
    decoding = RedisCluster.from_url(redis_cluster.url, decode_responses=True)
    with pytest.raises(ValueError, match="decode_responses"):
        RedisKVStore(decoding, "fp-test")


def test_cluster_held_blocks_are_not_resent(
    redis_cluster: LocalCluster,  # noqa: F811
    raw: RedisCluster,
    namespace: str,
) -> None:
    store, blocks = cluster_store(redis_cluster.url, namespace, ttl_s=100), make_blocks(24)
    head = blocks.part(0, 16)
    store.save(head.hashes, head.token_ids, head.staged)
    raw.expire(store.block_key(blocks.hashes[0]), 5)
    nodes = [node.client() for node in redis_cluster.nodes]
    num_sets = num_calls(nodes, "set")
    store.save(blocks.hashes, blocks.token_ids, blocks.staged)
    assert num_calls(nodes, "set") - num_sets == 8  # only the new blocks
    assert raw.ttl(store.block_key(blocks.hashes[0])) > 90  # the held ones were refreshed
    assert exactly_equal(store.load(blocks.hashes, blocks.token_ids), blocks.staged)


# -- budget and verification -------------------------------------------------------------------


def test_cluster_budget_lru_is_per_shard(
    redis_cluster: LocalCluster,  # noqa: F811
    raw: RedisCluster,
    namespace: str,
) -> None:
    check_budget_lru_is_per_shard(
        lambda budget: cluster_store(
            redis_cluster.url, namespace, budget_bytes=budget, index_shards=2
        ),
        raw,
    )


def test_cluster_budget_keeps_each_shard_within_its_share(
    redis_cluster: LocalCluster,  # noqa: F811
    raw: RedisCluster,
    namespace: str,
) -> None:
    """80 blocks into 16 shards of 3 frames each: every shard keeps the prefix of its part of
    the sequence (tails are evicted first) and the total stays within the budget."""
    blocks = make_blocks(80)
    frame_bytes = max(
        len(encode_frame(blocks.staged[:, :, i], blocks.token_ids[i], "fp-test", "LKBTHD"))
        for i in range(80)
    )
    budget_bytes = 16 * int(3.5 * frame_bytes)
    store = cluster_store(redis_cluster.url, namespace, budget_bytes=budget_bytes)
    store.save(blocks.hashes, blocks.token_ids, blocks.staged)
    present = store.contains(blocks.hashes)
    for shard in range(16):
        in_shard = [present[i] for i, h in enumerate(blocks.hashes) if store.shard_of(h) == shard]
        assert in_shard == [True] * min(3, len(in_shard)) + [False] * (len(in_shard) - 3), shard
    counters = check_budget_index(store, raw)
    assert sum(counters) == store.stats.bytes_used <= budget_bytes
    assert store.stats.evictions == 80 - sum(present) > 0
    assert store.lookup(blocks.hashes) >= 1


def test_cluster_corrupted_block_is_discarded(
    redis_cluster: LocalCluster,  # noqa: F811
    raw: RedisCluster,
    namespace: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = cluster_store(redis_cluster.url, namespace, budget_bytes=1 << 30)
    blocks = make_blocks(6)
    store.save(blocks.hashes, blocks.token_ids, blocks.staged)
    bad_key = store.block_key(blocks.hashes[3])
    raw.set(bad_key, flip_body_byte(get_bytes(raw, bad_key)), keepttl=True)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert store.load(blocks.hashes, blocks.token_ids) is None
    assert bad_key in caplog.text and "checksum" in caplog.text
    assert raw.exists(bad_key) == 0
    assert store.contains(blocks.hashes) == [True, True, True, False, True, True]
    assert store.stats.invalid == 1 and store.stats.misses == 6 and store.healthy
    lru_key, _, _ = store.index_keys(store.shard_of(blocks.hashes[3]))
    assert raw.zscore(lru_key, blocks.hashes[3].hex()) is None
    check_budget_index(store, raw)


def test_a_single_redis_store_on_a_cluster_reports_redirections(
    redis_cluster: LocalCluster,  # noqa: F811
    namespace: str,
) -> None:
    """Without ``cluster=True`` the keys of other nodes' slots answer MOVED: the store never
    raises, reports misses and is unhealthy with the reason."""
    store, blocks = RedisKVStore(redis_cluster.url, "fp-test", namespace=namespace), make_blocks(4)
    assert store.ping()  # the node itself answers
    store.save(blocks.hashes, blocks.token_ids, blocks.staged)
    assert store.lookup(blocks.hashes) == 0
    assert store.load(blocks.hashes, blocks.token_ids) is None
    assert not store.healthy and "MovedError" in (store.last_error or "")


# -- failures (the module's own cluster) -------------------------------------------------------


def test_cluster_hung_node_times_out(spare_cluster: LocalCluster, namespace: str) -> None:
    """A given client (default: blocking, retrying) lends its nodes; the store's own times out."""
    store = RedisKVStore(
        spare_cluster.client(), "fp-test", namespace=namespace, socket_timeout_s=0.2
    )
    blocks = make_blocks(32)
    store.save(blocks.hashes, blocks.token_ids, blocks.staged)
    spare_cluster.nodes[1].pause()  # shorter than the cluster's node timeout: no failover
    try:
        start = time.perf_counter()
        assert store.load(blocks.hashes, blocks.token_ids) is None
        assert time.perf_counter() - start < 2.0
        assert not store.healthy and "Timeout" in (store.last_error or "")
    finally:
        spare_cluster.nodes[1].resume()
    assert exactly_equal(store.load(blocks.hashes, blocks.token_ids), blocks.staged)
    assert store.healthy


def test_cluster_slot_move_costs_one_failed_call(
    spare_cluster: LocalCluster, namespace: str
) -> None:
    store, blocks = cluster_store(spare_cluster.url, namespace), make_blocks(32)
    store.save(blocks.hashes, blocks.token_ids, blocks.staged)
    move_slot(spare_cluster, key_slot(store.block_key(blocks.hashes[0]).encode()))
    assert store.load(blocks.hashes, blocks.token_ids) is None  # MOVED: the slot map reloads
    assert not store.healthy and "MovedError" in (store.last_error or "")
    assert exactly_equal(store.load(blocks.hashes, blocks.token_ids), blocks.staged)
    assert store.healthy


def test_cluster_store_created_while_a_node_is_down_recovers(
    spare_cluster: LocalCluster, namespace: str
) -> None:
    """Node 0 (the URL's) stops: a store made before, one made from the URL and one made from
    a client while it is down all degrade without raising, then recover when it is back."""
    blocks = make_blocks(32)
    before = cluster_store(spare_cluster.url, namespace)
    before.save(blocks.hashes, blocks.token_ids, blocks.staged)
    lent = spare_cluster.client()
    spare_cluster.nodes[0].stop()
    try:
        stores = [
            before,
            cluster_store(spare_cluster.url, namespace),  # cannot even load the slot map
            RedisKVStore(lent, "fp-test", namespace=namespace),  # maps via nodes 1 and 2
        ]
        for store in stores:
            assert store.lookup(blocks.hashes) == 0
            assert store.load(blocks.hashes, blocks.token_ids) is None
            store.save(blocks.hashes, blocks.token_ids, blocks.staged)
            assert not store.healthy and store.last_error is not None
            assert not store.ping()
        assert stores[1].stats.misses == 32 and stores[1].stats.errors >= 4
    finally:
        spare_cluster.nodes[0].start()  # same port and nodes.conf: it rejoins, empty
    for store in stores:
        wait_until(functools.partial(_reachable, store, blocks))
        store.save(blocks.hashes, blocks.token_ids, blocks.staged)
        assert exactly_equal(store.load(blocks.hashes, blocks.token_ids), blocks.staged)
        assert store.healthy and store.ping()


def _reachable(store: RedisKVStore, blocks: Blocks) -> bool:
    store.contains(blocks.hashes)
    return store.healthy


def move_slot(cluster: LocalCluster, slot: int) -> None:
    """Migrate ``slot`` and its keys from its master to the next one, as resharding does."""
    clients = [node.client() for node in cluster.nodes]
    node_ids = [client.execute_command("CLUSTER", "MYID") for client in clients]
    owner_port = cluster.client().nodes_manager.get_node_from_slot(slot).port
    src = next(i for i, node in enumerate(cluster.nodes) if node.port == owner_port)
    dst = (src + 1) % len(clients)
    clients[dst].execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", node_ids[src])
    clients[src].execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", node_ids[dst])
    keys = clients[src].execute_command("CLUSTER", "GETKEYSINSLOT", slot, 10_000)
    if keys:
        port = cluster.nodes[dst].port
        clients[src].execute_command("MIGRATE", "127.0.0.1", port, "", 0, 5000, "KEYS", *keys)
    for idx in (dst, src, *(i for i in range(len(clients)) if i not in (src, dst))):
        clients[idx].execute_command("CLUSTER", "SETSLOT", slot, "NODE", node_ids[dst])
    for client in clients:
        client.close()
