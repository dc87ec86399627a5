"""Failover without waiting for the lease TTL (issue 14 item 6), with in-process managers
sharing a real Redis. The owners probed are real sockets: a port nobody listens on, a listener
that accepts and never answers (a frozen process), and a small HTTP server answering /health.
(The SIGKILLed ``tarry serve`` case is ``test_scaleout.test_failover_to_another_instance_...``.)
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from engine.async_engine import AsyncEngine
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from sessions.errors import SessionMovedError
from sessions.manager import SessionManager
from sessions.ownership import SessionOwnership
from sessions.record_store import RedisRecordStore
from sessions.redis_connect import connect_redis
from sessions.redis_keys import instance_key, session_lease_key
from sessions.session import Session
from tests.redis_fixture import free_port

OWNER = "tenant:failover"
ME = "http://127.0.0.1:1"  # never probed: this manager's own advertised URL
PROBE_S = 0.3


class _Health(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802  (http.server's name)
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def manager(smollm2: Any, redis_server: str) -> Iterator[SessionManager]:
    client = connect_redis(redis_server)
    ownership = SessionOwnership(client, ME, ttl_s=30.0, probe_timeout_s=PROBE_S)
    ownership.start()
    engine = AsyncEngine(LLMEngine(smollm2, EngineConfig(num_kv_blocks=32)))
    records = RedisRecordStore(client, instance_id=ownership.instance_id)
    yield SessionManager(engine, records, ownership=ownership)
    ownership.close()
    records.close()


def _owned_elsewhere(manager: SessionManager, owner_url: str) -> Session:
    """A session whose record is in Redis and whose lease a registered (alive by its key)
    instance at ``owner_url`` holds for 30 s."""
    session = Session(owner=OWNER, messages=[{"role": "user", "content": "hi"}])
    assert manager.records.save(session.to_record())  # before the lease: not fenced
    client = manager.records.client  # type: ignore[attr-defined]
    other = f"inst_other{time.monotonic_ns()}"
    client.set(instance_key("tarry", other), owner_url, px=30_000)
    client.set(session_lease_key("tarry", session.session_id), other, px=30_000)
    return session


def _resume(manager: SessionManager, session_id: str) -> Session:
    return asyncio.run(manager.resume(session_id, OWNER))


def test_owner_refusing_connections_is_taken_over_at_once(manager: SessionManager) -> None:
    session = _owned_elsewhere(manager, f"http://127.0.0.1:{free_port()}")  # nobody listens
    with pytest.raises(SessionMovedError):  # plain get: the lease is alive, so it redirects
        manager.get(session.session_id, OWNER)
    started = time.monotonic()
    resumed = _resume(manager, session.session_id)
    assert time.monotonic() - started < 2.0  # not the 30 s lease
    assert resumed.messages == session.messages
    assert manager.ownership is not None and manager.ownership.leases.holds(session.session_id)
    lease = manager.records.client.get(session_lease_key("tarry", session.session_id))  # type: ignore[attr-defined]
    assert lease == manager.ownership.instance_id.encode()


def test_frozen_owner_is_taken_over_after_the_probe_timeout(manager: SessionManager) -> None:
    listener = socket.create_server(("127.0.0.1", 0))  # accepts (backlog), never answers
    try:
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        session = _owned_elsewhere(manager, url)
        started = time.monotonic()
        resumed = _resume(manager, session.session_id)
        elapsed = time.monotonic() - started
        assert PROBE_S * 0.9 <= elapsed < PROBE_S + 2.0, elapsed
        assert resumed.session_id == session.session_id
    finally:
        listener.close()


def test_answering_owner_keeps_its_session(manager: SessionManager) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        session = _owned_elsewhere(manager, url)
        with pytest.raises(SessionMovedError) as moved:
            _resume(manager, session.session_id)
        assert moved.value.owner_url == url
        assert manager.ownership is not None
        assert not manager.ownership.leases.holds(session.session_id)
    finally:
        server.shutdown()
        server.server_close()


def test_a_previous_process_on_our_own_address_is_never_a_redirect(
    manager: SessionManager,
) -> None:
    """Restarted on the same address after a crash: the old process's key still names our
    URL. We must take the session, not send the client to ourselves (no probe needed)."""
    session = _owned_elsewhere(manager, ME)
    resumed = manager.get(session.session_id, OWNER)  # the plain get takes it already
    assert resumed.messages == session.messages
    assert manager.ownership is not None and manager.ownership.leases.holds(session.session_id)
