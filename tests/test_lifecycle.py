"""Request lifecycle against real ``tarry serve`` processes: a client that goes away stops
costing the engine (on every surface), and SIGTERM drains within ``--shutdown-timeout-s``."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from websockets.sync.client import connect

from tests.api_helpers import ProtocolClient
from tests.redis_fixture import RedisServer
from tests.scaleout_helpers import TarryProcess, wait_for

API_KEY = "lifecycle-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
LONG_STORY = "Write a very long story about a dragon who learns to cook."
# Greedy, 4096 tokens, EOS ignored: minutes of decoding on this CPU, so the request is
# certainly still running when the client leaves or the server is told to stop.
LONG_CHAT = {
    "model": "tarry",
    "messages": [{"role": "user", "content": LONG_STORY}],
    "max_tokens": 4096,
    "ignore_eos": True,
    "temperature": 0,
}


def engine_gauges(url: str) -> dict[str, float]:
    """``tarry_requests_running`` / ``_waiting`` and the KV pool usage from ``/metrics``."""
    text = httpx.get(url + "/metrics", timeout=5).text
    wanted = (
        "tarry_requests_running",
        "tarry_requests_waiting",
        "tarry_kv_pool_usage",
        "tarry_engine_steps",
    )
    gauges = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in wanted:
            gauges[name.removeprefix("tarry_")] = float(value)
    return gauges


def wait_busy(url: str, count: int, timeout_s: float = 60.0) -> None:
    """Wait until ``count`` requests are in the engine (running or waiting)."""

    def busy() -> bool:
        gauges = engine_gauges(url)
        return gauges["requests_running"] + gauges["requests_waiting"] == count

    wait_for(busy, timeout_s, f"{count} request(s) in the engine")


# The engine drops an abandoned request before its next step (milliseconds); what the test
# measures also holds the client's close and each /metrics round trip, which take 0.3-0.5 s
# apiece on a saturated 2-core machine. Hence "about a second", with room for such load.
IDLE_BOUND_S = 2.5


def assert_idle_soon(url: str, blocks_freed: bool = True) -> None:
    """The engine has no running or waiting request within IDLE_BOUND_S, then stops stepping
    (nothing consumes it any more) and, with ``blocks_freed``, no KV block is in use."""
    started = time.monotonic()
    while True:
        gauges = engine_gauges(url)
        if gauges["requests_running"] == 0 and gauges["requests_waiting"] == 0:
            break
        assert time.monotonic() - started < 10, f"engine still busy: {gauges}"
        time.sleep(0.05)
    elapsed = time.monotonic() - started
    print(f"engine idle {elapsed:.2f} s after the client left")
    assert elapsed < IDLE_BOUND_S
    time.sleep(0.5)
    later = engine_gauges(url)
    assert later["engine_steps"] == gauges["engine_steps"]
    if blocks_freed:
        assert later["kv_pool_usage"] == 0.0


@contextmanager
def tarry_serve(redis_url: str, log_dir: Path, grace_s: float) -> Iterator[TarryProcess]:
    """A ready ``tarry serve`` with an API key, Redis and ``--shutdown-timeout-s grace_s``."""
    process = TarryProcess(
        redis_url, log_dir, 3.0, "--api-key", API_KEY, "--shutdown-timeout-s", str(grace_s)
    )
    process.start()
    try:
        process.wait_ready()
        yield process
    finally:
        process.stop()


@pytest.fixture
def server(redis_process: RedisServer, tmp_path: Path) -> Iterator[TarryProcess]:
    with tarry_serve(redis_process.url, tmp_path, 2.0) as process:
        yield process


def test_abandoned_requests_stop_within_a_step_on_every_surface(server: TarryProcess) -> None:
    url = server.url

    # 1. Non-streaming chat, abandoned by the client after 1 s (while it is generating).
    timed_out: list[bool] = []

    def abandon() -> None:
        try:
            httpx.post(url + "/v1/chat/completions", json=LONG_CHAT, headers=AUTH, timeout=1.0)
        except httpx.ReadTimeout:
            timed_out.append(True)

    caller = threading.Thread(target=abandon)
    caller.start()
    wait_busy(url, 1)
    caller.join()
    assert timed_out == [True]
    assert_idle_soon(url)
    metrics = httpx.get(url + "/metrics", timeout=5).text
    assert 'tarry_requests_total{endpoint="chat",status="499"} 1.0' in metrics

    # 2. Streaming completion: read two chunks, then hang up.
    body = {**LONG_CHAT, "prompt": LONG_STORY, "stream": True}
    del body["messages"]
    chunks: list[dict[str, Any]] = []
    with httpx.stream("POST", url + "/v1/completions", json=body, headers=AUTH, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                chunks.append(json.loads(line[6:]))
            if len(chunks) == 2:
                break
    assert all(chunk["choices"][0]["finish_reason"] is None for chunk in chunks)
    assert_idle_soon(url)

    # 3. Responses API over WebSocket: close the socket after the first text delta.
    with connect(url.replace("http", "ws") + "/v1/responses", additional_headers=AUTH) as ws:
        request = {"type": "response.create", "input": LONG_STORY, "max_output_tokens": 4096}
        ws.send(json.dumps(request))
        while json.loads(ws.recv(timeout=60))["type"] != "response.output_text.delta":
            pass
    assert_idle_soon(url)

    # 4. The session protocol: a dropped connection ends the running response; the session
    #    stays (paused, without the cancelled turn) for a later resume.
    client = ProtocolClient(url, API_KEY)
    session_id = client.create_session()["id"]
    client.user(LONG_STORY)
    client.send({"type": "response.create", "response": {"max_output_tokens": 4096}})
    while client.recv()["type"] != "response.output_text.delta":
        pass
    client.ws.close()
    assert_idle_soon(url, blocks_freed=False)  # the paused session keeps its KV pinned
    session = httpx.get(url + f"/v1/sessions/{session_id}", headers=AUTH, timeout=5).json()
    assert session["state"] in ("paused", "offloaded"), session
    assert session["num_turns"] == 0
    assert [item["role"] for item in session["items"]] == ["user"]

    # 5. Responses API over HTTP, streamed: hang up after the first text delta. The stored
    #    response's session is not left behind.
    body = {"input": LONG_STORY, "max_output_tokens": 4096, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", url + "/v1/responses", json=body, headers=AUTH, timeout=60) as r:
        for line in r.iter_lines():
            if line == "event: response.output_text.delta":
                break
    assert_idle_soon(url, blocks_freed=False)
    sessions = httpx.get(url + "/v1/sessions", headers=AUTH, timeout=5).json()["data"]
    assert [s["id"] for s in sessions] == [session_id]


def _lease_keys(redis_url: str) -> list[Any]:
    return list(redis.Redis.from_url(redis_url).scan_iter(match="*:lease:*"))


def test_sigterm_cancels_a_long_request_after_the_grace_period(
    server: TarryProcess, redis_process: RedisServer
) -> None:
    url = server.url
    # A session (its lease is in Redis) generating a long turn over HTTP.
    client = ProtocolClient(url, API_KEY)
    session_id = client.create_session()["id"]
    client.close()
    assert _lease_keys(redis_process.url)
    replies: list[BaseException | httpx.Response] = []

    def long_turn() -> None:
        headers = {**AUTH, "x-tarry-session-id": session_id}
        try:
            replies.append(
                httpx.post(
                    url + "/v1/chat/completions", json=LONG_CHAT, headers=headers, timeout=60
                )
            )
        except httpx.HTTPError as exc:
            replies.append(exc)

    caller = threading.Thread(target=long_turn)
    caller.start()
    wait_busy(url, 1)
    assert server.process is not None
    signalled = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    code = server.process.wait(timeout=30)
    elapsed = time.monotonic() - signalled
    caller.join(timeout=10)
    log = server.log_path.read_text()
    print(f"SIGTERM -> exit in {elapsed:.2f} s (grace 2 s)")
    assert code == 0, log[-3000:]
    assert 2.0 <= elapsed < 2.0 + 3.0, log[-3000:]  # grace + one step + process teardown
    assert "grace period over: stopping 1 request(s)" in log
    reply = replies[0]
    assert isinstance(reply, httpx.Response), reply
    assert reply.status_code == 503
    assert reply.json()["error"]["code"] == "server_shutting_down"
    assert _lease_keys(redis_process.url) == []
    record_keys = list(redis.Redis.from_url(redis_process.url).scan_iter(match="*:session:*"))
    assert len(record_keys) == 1  # the session itself survives, for another instance


def test_sigterm_lets_a_short_request_finish(redis_process: RedisServer, tmp_path: Path) -> None:
    replies: list[httpx.Response] = []
    short = {**LONG_CHAT, "max_tokens": 64}
    with tarry_serve(redis_process.url, tmp_path, 60.0) as server:
        url = server.url

        def short_request() -> None:
            replies.append(
                httpx.post(url + "/v1/chat/completions", json=short, headers=AUTH, timeout=60)
            )

        caller = threading.Thread(target=short_request)
        caller.start()
        wait_busy(url, 1)
        assert server.process is not None
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=60) == 0
        elapsed = time.monotonic() - signalled
        caller.join(timeout=10)
    print(f"SIGTERM with a 64-token request running -> exit in {elapsed:.2f} s (grace 60 s)")
    assert replies and replies[0].status_code == 200
    assert replies[0].json()["usage"]["completion_tokens"] == 64
    assert elapsed < 30  # it exits once the request is done, not at the end of the grace
    with pytest.raises(httpx.ConnectError):  # no longer accepting
        httpx.get(url + "/health", timeout=2)
