"""Abandoned sessions (issue 14 item 8): idle expiry closes them and their python sandboxes,
the pause policy runs periodically (paused sessions are offloaded past the keep TTL), and a
server-wide session cap holds when every bearer token is a tenant of its own (no --api-key).
One in-process server (uvicorn thread, lifespan on) with a short idle timeout and a cap of 4.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from api.server import ServeOptions
from api.state import ServerState
from sessions.session import SessionState
from tests.api_helpers import ProtocolClient, live_server
from tests.scaleout_helpers import wait_for

IDLE_S = 3.0
MAX_SESSIONS = 4


@pytest.fixture(scope="module")
def server(smollm2: Any) -> Iterator[tuple[str, ServerState]]:
    options = ServeOptions(session_idle_timeout_s=IDLE_S, max_sessions=MAX_SESSIONS)
    with live_server(smollm2, options) as (url, state):
        state.maintenance_interval_s = 0.2
        yield url, state


def _session_ids(state: ServerState) -> set[str]:
    return {s.session_id for s in state.sessions.all_sessions()}


def test_server_wide_cap_holds_across_tenants(server: tuple[str, ServerState]) -> None:
    url, state = server
    wait_for(lambda: not state.sessions.all_sessions(), 2 * IDLE_S + 2, "an empty server")
    clients = [ProtocolClient(url, f"tenant-{i}") for i in range(MAX_SESSIONS + 1)]
    try:
        infos = [client.create_session() for client in clients[:MAX_SESSIONS]]
        clients[-1].send({"type": "session.create", "session": {}})
        refused = clients[-1].recv()
        assert refused["type"] == "error", refused
        assert refused["error"]["code"] == "server_session_limit"
        assert len(state.sessions.all_sessions()) == MAX_SESSIONS  # nothing half-created

        clients[0].send({"type": "session.close"})
        assert clients[0].recv()["type"] == "session.closed"
        assert clients[-1].create_session()["id"] not in {i["id"] for i in infos}
    finally:
        for client in clients:
            client.close()


def test_idle_session_expires_with_its_python_sandbox(server: tuple[str, ServerState]) -> None:
    url, state = server
    wait_for(lambda: len(state.sessions.all_sessions()) < MAX_SESSIONS, 2 * IDLE_S + 2, "room")
    client = ProtocolClient(url, "tenant-python")
    try:
        info = client.create_session("Answer briefly.")
        client.user("Say hi.")
        assert client.respond(temperature=0, max_output_tokens=4)[0]
        touched = time.monotonic()  # the turn's end touched it last
        before = set(state.tools.root.iterdir())
        output = asyncio.run(
            state.tools.run_python(info["id"], json.dumps({"code": "print(6 * 7)"}))
        )
        assert "42" in output
        sandbox_dirs = set(state.tools.root.iterdir()) - before
        assert sandbox_dirs  # the session's interpreter has a directory of its own

        wait_for(lambda: info["id"] not in _session_ids(state), IDLE_S + 3, "idle expiry")
        assert time.monotonic() - touched >= IDLE_S - 0.5  # not before it was idle
        gone = lambda: not any(d.exists() for d in sandbox_dirs)  # noqa: E731
        wait_for(gone, 5, "the sandbox closed with it (interpreter and directory)")
        # No Redis: the record is deleted too, so the session is gone like a closed one.
        reply = httpx.get(
            f"{url}/v1/sessions/{info['id']}",
            headers={"Authorization": "Bearer tenant-python"},
        )
        assert reply.status_code == 404
        client.send(  # the connection still bound to it gets a typed error
            {
                "type": "conversation.item.create",
                "item": {
                    "type": "message",
                    "role": "user",
                    "content": [{"type": "input_text", "text": "Still there?"}],
                },
            }
        )
        closed = client.recv()
        assert closed["type"] == "error" and closed["error"]["code"] == "session_closed"
    finally:
        client.close()


def test_paused_sessions_are_offloaded_past_the_keep_ttl(server: tuple[str, ServerState]) -> None:
    url, state = server
    policy = state.sessions.policy
    saved = (policy.turn_pause_s, policy.keep_ttl_s)
    policy.turn_pause_s, policy.keep_ttl_s = 0.5, 1.0  # every turn end pins, for 1 s
    wait_for(lambda: len(state.sessions.all_sessions()) < MAX_SESSIONS, 2 * IDLE_S + 2, "room")
    client = ProtocolClient(url, "tenant-pinned")
    try:
        info = client.create_session("Answer briefly.")
        client.user("Say hi.")
        client.send({"type": "response.create", "response": {"max_output_tokens": 4}})
        events = client.recv_until("session.state")
        assert events[-1]["state"] == "paused"  # pinned on the device
        session = next(s for s in state.sessions.all_sessions() if s.session_id == info["id"])
        engine = state.async_engine.engine
        assert engine.is_pinned(info["id"])
        wait_for(lambda: session.state is SessionState.OFFLOADED, IDLE_S, "the periodic policy")
        wait_for(lambda: not engine.is_pinned(info["id"]), 2, "the pin released")
    finally:
        policy.turn_pause_s, policy.keep_ttl_s = saved
        client.close()


def test_health_integrity_report_after_the_upkeep(server: tuple[str, ServerState]) -> None:
    url, state = server
    wait_for(lambda: not state.sessions.all_sessions(), 2 * IDLE_S + 2, "every session expired")
    body = httpx.get(f"{url}/health", params={"integrity": "1"}, timeout=30).json()
    report = body["integrity"]
    assert report["ok"] and report["error"] is None and report["orphan_pins"] == []
    assert report["num_sessions"] == 0
    pool = report["pool"]
    assert pool["num_pinned_blocks"] == 0 and pool["num_in_use_blocks"] == 0  # nothing leaked
    assert "integrity" not in httpx.get(f"{url}/health").json()  # only when asked
