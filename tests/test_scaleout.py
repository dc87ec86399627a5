"""Scale-out: several instances sharing one Redis or a Redis Cluster, session leases, fenced
record writes, failover and Redis outages.

The failover and outage tests run real ``tarry serve`` processes (embedded model) on loopback;
the race and fencing tests run in-process session managers. Failover and the race run against
both a single Redis and a three-master Redis Cluster.
"""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.cluster import RedisCluster
from redis.crc import key_slot

from api.cli import main as cli_main
from engine.async_engine import AsyncEngine
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from sessions.errors import SessionMovedError
from sessions.manager import SessionManager
from sessions.ownership import SessionOwnership
from sessions.record_store import RedisRecordStore
from sessions.redis_connect import connect_redis
from sessions.redis_keys import session_lease_key, session_record_key
from sessions.session import Session
from tests.api_helpers import ProtocolClient
from tests.redis_cluster_fixture import LocalCluster, redis_cluster  # noqa: F401
from tests.redis_fixture import RedisServer
from tests.scaleout_helpers import TarryProcess, free_port, wait_for

KEY, OTHER_KEY = "key-agent", "key-recompute"
SYSTEM = "You are a concise assistant. Answer in one short sentence."
FIRST = "Name three rivers in Europe and the countries they flow through."
SECOND = "Which of those rivers is the longest?"
GREEDY = {"temperature": 0, "max_output_tokens": 16}
LONG_LEASE_S = 30.0


def _resume(client: ProtocolClient, info: dict[str, Any], migrate: bool) -> dict[str, Any]:
    client.send(
        {
            "type": "session.resume",
            "session_id": info["id"],
            "resume_token": info["resume_token"],
            "migrate": migrate,
        }
    )
    return client.recv()


class SharedRedis:
    """What the instances of a test share: a single Redis or a Redis Cluster."""

    def __init__(self, url: str, cluster: LocalCluster | None, inspect: Any) -> None:
        self.url = url
        self.cluster = cluster
        self.inspect = inspect  # a client (bytes replies) for the test's own look-ups

    @property
    def serve_args(self) -> tuple[str, ...]:
        return ("--redis-cluster",) if self.cluster is not None else ()

    def client(self) -> Any:
        """A client like the one ``tarry serve`` builds for records and leases."""
        return connect_redis(self.url, cluster=self.cluster is not None)


@pytest.fixture(params=["single", "cluster"])
def shared_redis(request: pytest.FixtureRequest, tmp_path: Path) -> SharedRedis:
    """A fresh single Redis (this test's own), or the session's Redis Cluster, flushed."""
    if request.param == "single":
        server: RedisServer = request.getfixturevalue("redis_process")
        return SharedRedis(server.url, None, server.client())
    cluster: LocalCluster = request.getfixturevalue("redis_cluster")
    inspect = cluster.client()
    inspect.flushall(target_nodes=RedisCluster.PRIMARIES)
    return SharedRedis(cluster.url, cluster, inspect)


def test_failover_to_another_instance_restores_kv_from_redis(
    shared_redis: SharedRedis, tmp_path: Path
) -> None:
    extra = shared_redis.serve_args
    # A lease TTL far longer than the test waits: failover must not wait for it to expire.
    a = TarryProcess(shared_redis.url, tmp_path, LONG_LEASE_S, *extra).start()
    b = TarryProcess(shared_redis.url, tmp_path, LONG_LEASE_S, *extra).start()
    try:
        assert a.wait_ready()["ownership"]["healthy"]
        assert b.wait_ready()["ownership"]["url"] == b.url
        on_a = ProtocolClient(a.url, KEY)
        info = on_a.create_session(SYSTEM)
        on_a.user(FIRST)
        first_text, _ = on_a.respond(**GREEDY)
        assert first_text

        auth = {"Authorization": f"Bearer {KEY}"}
        for method in ("GET", "DELETE"):  # B knows who owns it and redirects there
            moved = httpx.request(method, f"{b.url}/v1/sessions/{info['id']}", headers=auth)
            assert moved.status_code == 307
            assert moved.headers["location"] == f"{a.url}/v1/sessions/{info['id']}"
            assert moved.json()["error"]["code"] == "session_moved"
        moved = httpx.post(  # chat bound to the session: 307 keeps the method and the body
            f"{b.url}/v1/chat/completions",
            headers={**auth, "X-Tarry-Session-Id": info["id"]},
            json={"model": "tarry", "messages": [{"role": "user", "content": "hi"}]},
        )
        assert moved.status_code == 307
        assert moved.headers["location"] == f"{a.url}/v1/chat/completions"

        a.kill()  # mid-session, after the turn: no clean shutdown, the lease just stops renewing
        with contextlib.suppress(Exception):
            on_a.close()
        killed_at = time.monotonic()
        on_b = ProtocolClient(b.url, KEY)
        # A's lease (30 s) and registration have not expired, but A refuses connections: B
        # takes the session over at once, without the client asking to migrate.
        resumed = _resume(on_b, info, migrate=False)
        assert resumed["type"] == "session.resumed", resumed
        assert time.monotonic() - killed_at < LONG_LEASE_S / 3
        assert resumed["session"]["num_items"] == 3  # system, user, assistant: nothing lost

        on_b.user(SECOND)
        second_text, done = on_b.respond(**GREEDY)
        details = done["usage"]["input_token_details"]
        # B never computed this history: every cached token was restored from Redis.
        assert details["cached_tokens"] >= 32
        assert details["restored_tokens"] == details["cached_tokens"]

        items = httpx.get(f"{b.url}/v1/sessions/{info['id']}", headers=auth).json()["items"]
        assert [m["role"] for m in items] == ["system", "user", "assistant", "user", "assistant"]
        assert items[2]["content"] == first_text and items[4]["content"] == second_text
        fresh = httpx.post(  # another key: another cache salt, so nothing is reused
            f"{b.url}/v1/chat/completions",
            headers={"Authorization": f"Bearer {OTHER_KEY}"},
            json={"model": "tarry", "messages": items[:4], "temperature": 0, "max_tokens": 16},
            timeout=120,
        ).json()
        assert fresh["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        assert fresh["choices"][0]["message"]["content"] == second_text
        owner = shared_redis.inspect.get(session_lease_key("tarry", info["id"]))
        assert owner == b.health()["ownership"]["instance_id"].encode()
        metrics = httpx.get(f"{b.url}/metrics", timeout=5).text
        assert "tarry_session_leases_held 1.0" in metrics
        assert "tarry_session_record_writes_fenced 0.0" in metrics
        if shared_redis.cluster is not None:  # (spread over the masters: test_kv_tier_cluster)
            assert sum(shared_redis.cluster.keys_per_node("tarry:kv:*")) > 0
        on_b.close()
    finally:
        a.kill()
        b.stop()


def _manager(model: Any, client: Any, url: str) -> SessionManager:
    ownership = SessionOwnership(client, url, ttl_s=5.0)
    ownership.start()
    async_engine = AsyncEngine(LLMEngine(model, EngineConfig(num_kv_blocks=64)))
    records = RedisRecordStore(client, instance_id=ownership.instance_id)
    return SessionManager(async_engine, records, ownership=ownership)


def test_take_over_race_has_exactly_one_winner_and_fences_the_loser(
    smollm2: Any, shared_redis: SharedRedis
) -> None:
    client = shared_redis.client()
    managers = [_manager(smollm2, client, f"http://instance-{i}") for i in range(2)]
    try:
        session = Session(owner="tenant:race", messages=[{"role": "user", "content": "hi"}])
        managers[0].records.save(session.to_record())
        lease_key = session_lease_key("tarry", session.session_id)
        client.set(lease_key, "inst_dead", px=60_000)  # an instance that is not registered

        barrier = threading.Barrier(2)
        outcomes: list[Any] = [None, None]

        def attempt(i: int) -> None:
            barrier.wait()
            try:
                outcomes[i] = managers[i].get(session.session_id, "tenant:race")
            except SessionMovedError as exc:
                outcomes[i] = exc

        threads = [threading.Thread(target=attempt, args=(i,)) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        winners = [i for i, o in enumerate(outcomes) if isinstance(o, Session)]
        assert len(winners) == 1, outcomes
        winner, loser = winners[0], 1 - winners[0]
        moved = outcomes[loser]
        assert isinstance(moved, SessionMovedError) and moved.code == "session_moved"
        assert moved.owner_url == f"http://instance-{winner}"
        lease = client.get(lease_key)
        assert lease == managers[winner].ownership.instance_id.encode()  # type: ignore[union-attr]

        # A live owner keeps the session unless the caller migrates; the old owner then learns
        # at its next heartbeat that it lost the lease and redirects to the new one.
        stolen = managers[loser].get(session.session_id, "tenant:race", migrate=True)
        assert stolen.messages == session.messages
        stolen.messages.append({"role": "user", "content": "written by the new owner"})
        assert managers[loser].records.save(stolen.to_record())

        # The old owner's late write (say, the end of a turn it was still running) is fenced
        # by the lease: the new owner's record stays as it is.
        stale = outcomes[winner]
        stale.messages.append({"role": "user", "content": "written by the old owner"})
        old_records = managers[winner].records
        assert isinstance(old_records, RedisRecordStore)
        assert not old_records.save(stale.to_record())
        assert old_records.fenced_writes == 1 and old_records.healthy
        old_records.delete(session.session_id)  # fenced too
        assert managers[loser].records.load(session.session_id) == stolen.to_record()

        # Before its next heartbeat, the old owner refuses changes to the session it lost:
        # every change checks the lease first.
        try:
            managers[winner].append(stale, [{"role": "user", "content": "late"}])
            raise AssertionError("the old owner changed a session it lost")
        except SessionMovedError as exc:
            assert exc.owner_url == f"http://instance-{loser}"
        old_owner = managers[winner].ownership
        assert old_owner is not None
        assert not old_owner.leases.holds(session.session_id)
        old_owner.beat()  # (or its heartbeat thread did already)
        try:
            managers[winner].get(session.session_id, "tenant:race")
            raise AssertionError("the old owner still served a session it lost")
        except SessionMovedError as exc:
            assert exc.owner_url == f"http://instance-{loser}"
        managers[loser].close(stolen)
        assert client.get(lease_key) is None
        assert client.get(session_record_key("tarry", session.session_id)) is None
    finally:
        for manager in managers:
            manager.ownership.close()  # type: ignore[union-attr]


def test_session_record_and_lease_share_a_cluster_slot() -> None:
    record = session_record_key("tarry", "sess_abc")
    lease = session_lease_key("tarry", "sess_abc")
    assert key_slot(record.encode()) == key_slot(lease.encode())
    assert key_slot(b"tarry:session:{sess_abd}") != key_slot(record.encode())
    with pytest.raises(ValueError, match="braces"):
        session_record_key("tarry", "sess_{x}")


def test_redis_outage_keeps_local_sessions_and_recovers(
    redis_process: RedisServer, tmp_path: Path
) -> None:
    redis_process.stop()  # unavailable at start-up
    instance = TarryProcess(redis_process.url, tmp_path, 1.5).start()
    try:
        health = instance.wait_ready()
        assert health["status"] == "degraded" and not health["ownership"]["healthy"]
        client = ProtocolClient(instance.url, KEY)
        info = client.create_session(SYSTEM)
        client.user(FIRST)
        assert client.respond(**GREEDY)[0]

        redis_process.start()  # recovers: re-registers and re-takes the session's lease
        lease_key = session_lease_key("tarry", info["id"])
        wait_for(lambda: instance.health()["ownership"]["healthy"], 10, "ownership recovery")
        me = instance.health()["ownership"]["instance_id"].encode()
        wait_for(lambda: redis_process.client().get(lease_key) == me, 10, "lease re-taken")
        client.user(SECOND)
        assert client.respond(**GREEDY)[0]
        wait_for(lambda: instance.health()["status"] == "ok", 10, "status ok")

        redis_process.stop()  # mid-run: the local session keeps working, health says degraded
        wait_for(lambda: instance.health()["status"] == "degraded", 10, "degraded status")
        metrics = httpx.get(f"{instance.url}/metrics", timeout=5).text
        assert 'tarry_tier_up{tier="ownership"} 0.0' in metrics
        client.user("Thanks. One more word?")
        assert client.respond(**GREEDY)[0]
        redis_process.start()
        wait_for(lambda: instance.health()["ownership"]["healthy"], 10, "second recovery")
        client.close()
    finally:
        instance.stop()


def test_ownership_never_raises_without_redis() -> None:
    client = connect_redis(f"redis://127.0.0.1:{free_port()}")
    ownership = SessionOwnership(client, "http://nowhere", ttl_s=1.0)
    ownership.start()
    try:
        assert ownership.leases.acquire("sess_local")  # served locally, re-taken on recovery
        assert ownership.leases.holds("sess_local")
        assert ownership.leases.owner_of("sess_local") is None
        assert not ownership.leases.take_over("sess_local", "inst_other")
        assert ownership.beat() == [] and not ownership.healthy
        assert ownership.health()["sessions_held"] == 1
    finally:
        ownership.close()


def test_cluster_down_at_start_up_degrades_then_recovers(tmp_path: Path) -> None:
    """Ownership and session records built while no cluster node answers (the cluster client
    cannot even be built yet) keep serving locally and catch up once the cluster is back."""
    cluster = LocalCluster(tmp_path)
    cluster.start()
    try:
        cluster.stop()
        client = connect_redis(cluster.url, cluster=True)
        ownership = SessionOwnership(client, "http://me", ttl_s=2.0)
        records = RedisRecordStore(client, instance_id=ownership.instance_id)
        ownership.start()
        session = Session(owner="tenant:local", messages=[{"role": "user", "content": "hi"}])
        assert ownership.leases.acquire(session.session_id)  # held locally meanwhile
        assert not records.save(session.to_record()) and not records.healthy
        # Not written yet: kept dirty, and served from memory (it is newer than Redis's).
        assert records.num_dirty == 1
        assert records.load(session.session_id) == session.to_record()
        assert not ownership.healthy

        for node in cluster.nodes:  # same ports and nodes.conf: the cluster re-forms
            node.start()
        wait_for(lambda: ownership.beat() == [] and ownership.healthy, 20, "ownership recovery")
        assert client.get(session_lease_key("tarry", session.session_id)) == (
            ownership.instance_id.encode()
        )
        wait_for(lambda: records.healthy, 10, "the dirty record written back")
        assert client.get(session_record_key("tarry", session.session_id)) is not None
        assert records.save(session.to_record()) and records.healthy
        assert records.load(session.session_id) == session.to_record()
        ownership.close()
        records.close()
    finally:
        cluster.stop()


def test_cli_rejects_inconsistent_redis_flags(capsys: pytest.CaptureFixture[str]) -> None:
    """Checked before the model loads: nothing starts."""
    assert cli_main(["serve", "--redis-cluster"]) == 2
    assert "--redis-cluster needs --redis-url" in capsys.readouterr().err
    assert cli_main(["serve", "--redis-url", "redis://a:1,redis://b:2"]) == 2
    assert "add --redis-cluster" in capsys.readouterr().err
    bad_seeds = ["serve", "--redis-cluster", "--redis-url", "redis://a:1,http://b:2"]
    assert cli_main([*bad_seeds, "--model", "/no/such/model"]) == 2
    assert "schemes" in capsys.readouterr().err
