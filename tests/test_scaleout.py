"""Scale-out: several instances sharing one Redis, session leases, failover and Redis outages.

The failover and outage tests run real ``tarry serve`` processes (embedded model) on loopback;
the race runs two in-process session managers against one Redis.
"""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path
from typing import Any

import httpx
import redis

from engine.async_engine import AsyncEngine
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from sessions.errors import SessionMovedError
from sessions.manager import SessionManager
from sessions.ownership import SessionOwnership
from sessions.record_store import RedisRecordStore
from sessions.session import Session
from tests.api_helpers import ProtocolClient
from tests.redis_fixture import RedisServer
from tests.scaleout_helpers import TarryProcess, free_port, wait_for

KEY, OTHER_KEY = "key-agent", "key-recompute"
SYSTEM = "You are a concise assistant. Answer in one short sentence."
FIRST = "Name three rivers in Europe and the countries they flow through."
SECOND = "Which of those rivers is the longest?"
GREEDY = {"temperature": 0, "max_output_tokens": 16}


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


def test_failover_to_another_instance_restores_kv_from_redis(
    redis_process: RedisServer, tmp_path: Path
) -> None:
    a = TarryProcess(redis_process.url, tmp_path).start()
    b = TarryProcess(redis_process.url, tmp_path).start()
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

        a.kill()  # mid-session, after the turn: no clean shutdown, the lease just stops renewing
        with contextlib.suppress(Exception):
            on_a.close()
        on_b = ProtocolClient(b.url, KEY)
        refused = _resume(on_b, info, migrate=False)  # the lease (3 s) has not expired yet
        assert refused["type"] == "error", refused
        assert refused["error"]["code"] == "session_moved"
        assert refused["error"]["owner"] == a.url
        resumed = _resume(on_b, info, migrate=True)
        assert resumed["type"] == "session.resumed", resumed
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
        owner = redis_process.client().get(f"tarry:lease:{info['id']}")
        assert owner == b.health()["ownership"]["instance_id"].encode()
        on_b.close()
    finally:
        a.kill()
        b.stop()


def _manager(model: Any, client: redis.Redis, url: str) -> SessionManager:
    ownership = SessionOwnership(client, url, ttl_s=5.0)
    ownership.start()
    runner = AsyncEngine(LLMEngine(model, EngineConfig(num_kv_blocks=64)))
    return SessionManager(runner, RedisRecordStore(client), ownership=ownership)


def test_take_over_race_has_exactly_one_winner(smollm2: Any, redis_server: str) -> None:
    client = redis.Redis.from_url(redis_server)
    managers = [_manager(smollm2, client, f"http://instance-{i}") for i in range(2)]
    try:
        session = Session(owner="key:race", messages=[{"role": "user", "content": "hi"}])
        managers[0].records.save(session.to_record())
        client.set(f"tarry:lease:{session.session_id}", "inst_dead", px=60_000)  # not registered

        barrier = threading.Barrier(2)
        outcomes: list[Any] = [None, None]

        def attempt(i: int) -> None:
            barrier.wait()
            try:
                outcomes[i] = managers[i].get(session.session_id, "key:race")
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
        lease = client.get(f"tarry:lease:{session.session_id}")
        assert lease == managers[winner].ownership.instance_id.encode()  # type: ignore[union-attr]

        # A live owner keeps the session unless the caller migrates; the old owner then learns
        # at its next heartbeat that it lost the lease and redirects to the new one.
        stolen = managers[loser].get(session.session_id, "key:race", migrate=True)
        assert stolen.messages == session.messages
        old_owner = managers[winner].ownership
        assert old_owner is not None
        old_owner.beat()  # (or its heartbeat thread did already)
        assert not old_owner.leases.holds(session.session_id)
        try:
            managers[winner].get(session.session_id, "key:race")
            raise AssertionError("the old owner still served a session it lost")
        except SessionMovedError as exc:
            assert exc.owner_url == f"http://instance-{loser}"
        managers[loser].close(stolen)
        assert client.get(f"tarry:lease:{session.session_id}") is None
    finally:
        for manager in managers:
            manager.ownership.close()  # type: ignore[union-attr]


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
        lease_key = f"tarry:lease:{info['id']}"
        wait_for(lambda: instance.health()["ownership"]["healthy"], 10, "ownership recovery")
        me = instance.health()["ownership"]["instance_id"].encode()
        wait_for(lambda: redis_process.client().get(lease_key) == me, 10, "lease re-taken")
        client.user(SECOND)
        assert client.respond(**GREEDY)[0]
        wait_for(lambda: instance.health()["status"] == "ok", 10, "status ok")

        redis_process.stop()  # mid-run: the local session keeps working, health says degraded
        wait_for(lambda: instance.health()["status"] == "degraded", 10, "degraded status")
        client.user("Thanks. One more word?")
        assert client.respond(**GREEDY)[0]
        redis_process.start()
        wait_for(lambda: instance.health()["ownership"]["healthy"], 10, "second recovery")
        client.close()
    finally:
        instance.stop()


def test_ownership_never_raises_without_redis() -> None:
    client = redis.Redis(port=free_port(), socket_connect_timeout=0.5, socket_timeout=0.5)
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
