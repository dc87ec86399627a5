"""No acknowledged turn is lost to a Redis outage (issue 14 item 7), and idle sessions are
evicted by a real ``tarry serve`` while their records stay resumable (item 8).

Real processes throughout: a redis-server that is killed (losing every key: it persists
nothing) and started again on the same port, and ``tarry serve --redis-url`` processes.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import msgpack

from sessions.redis_keys import session_record_key
from tests.api_helpers import ProtocolClient
from tests.redis_fixture import RedisServer
from tests.scaleout_helpers import TarryProcess, wait_for

KEY = "key-durable"
AUTH = {"Authorization": f"Bearer {KEY}"}
SYSTEM = "You are a concise assistant. Answer in one short sentence."
GREEDY = {"temperature": 0, "max_output_tokens": 12}
IDLE_S = 3.0


def _record_roles(redis_process: RedisServer, session_id: str) -> list[str]:
    raw = redis_process.client().get(session_record_key("tarry", session_id))
    return [] if raw is None else [m["role"] for m in msgpack.unpackb(raw)["messages"]]


def _resume(client: ProtocolClient, session_id: str, token: str) -> dict[str, object]:
    client.send({"type": "session.resume", "session_id": session_id, "resume_token": token})
    event = client.recv()
    assert event["type"] == "session.resumed", event
    return event["session"]  # type: ignore[no-any-return]


def test_turns_acknowledged_during_a_redis_outage_survive_it(
    redis_process: RedisServer, tmp_path: Path
) -> None:
    first = TarryProcess(redis_process.url, tmp_path, 3.0).start()
    try:
        assert first.wait_ready()["status"] == "ok"
        client = ProtocolClient(first.url, KEY)
        info = client.create_session(SYSTEM)
        client.user("Name a river in Europe.")
        assert client.respond(**GREEDY)[0]

        redis_process.stop()  # every key is lost: it persists nothing
        client.user("Which country is it in?")
        during, done = client.respond(**GREEDY)  # acknowledged by response.done
        assert during and done["status"] in ("completed", "incomplete")  # (max tokens)
        health = first.health()
        assert health["status"] == "degraded" and health["session_records_dirty"] == 1

        redis_process.start()
        back = time.monotonic()
        wait_for(lambda: first.health()["status"] == "ok", 10, "health ok after the outage")
        assert time.monotonic() - back < 3.0  # recovery is reported promptly
        assert first.health()["session_records_dirty"] == 0
        roles = ["system", "user", "assistant", "user", "assistant"]
        assert _record_roles(redis_process, info["id"]) == roles  # written back
        client.close()
    finally:
        first.kill()  # no clean shutdown: nothing more is written

    # A new process (idle expiry 3 s) loads the session with the turn from the outage.
    second = TarryProcess(
        redis_process.url, tmp_path, 3.0, "--session-idle-timeout-s", str(IDLE_S)
    ).start()
    try:
        second.wait_ready()
        client = ProtocolClient(second.url, KEY)
        resumed = _resume(client, info["id"], info["resume_token"])
        assert resumed["num_items"] == 5
        items = httpx.get(f"{second.url}/v1/sessions/{info['id']}", headers=AUTH).json()["items"]
        assert items[4]["content"] == during
        client.close()

        # Abandoned: evicted from memory (lease released), the record stays resumable.
        listed = lambda: httpx.get(f"{second.url}/v1/sessions", headers=AUTH).json()["data"]  # noqa: E731
        wait_for(lambda: not listed(), IDLE_S + 5, "idle eviction")
        assert second.health()["ownership"]["sessions_held"] == 0
        assert _record_roles(redis_process, info["id"]) == roles
        client = ProtocolClient(second.url, KEY)
        assert _resume(client, info["id"], info["resume_token"])["num_items"] == 5
        client.close()
    finally:
        second.stop()
