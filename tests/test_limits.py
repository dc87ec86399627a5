"""Limits and idle timeouts of a real ``tarry serve`` process (issue 14, items 1, 3 and 11).

Each test reproduces an attack that used to hurt the server: unbounded session history (OOM,
a frozen event loop), bodies and frames buffered whole before the size check, connections
that send nothing held forever, the WebSocket auth close code, API keys in clear in Redis.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import msgpack
import pytest
import redis
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from sessions.redis_keys import session_record_key
from sessions.session import Session
from tests.api_helpers import ProtocolClient
from tests.scaleout_helpers import TarryProcess

KEY_A, KEY_B = "limits-key-a", "limits-key-b"
FRANCE = "What is the capital of France? Answer in one sentence."
LOREM = "lorem ipsum dolor sit amet "  # 2.7 bytes per token
FOX = "The quick brown fox jumps over the lazy dog. "  # 10 tokens


@pytest.fixture(scope="module")
def tarry(redis_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TarryProcess]:
    process = TarryProcess(
        redis_server,
        tmp_path_factory.mktemp("limits"),
        10.0,
        *("--api-key", KEY_A, "--api-key", KEY_B),
        *("--header-timeout-s", "1", "--first-event-timeout-s", "2"),
    ).start()
    try:
        process.wait_ready(timeout_s=180)
        yield process
    finally:
        process.stop()


def rss_bytes(process: TarryProcess) -> int:
    assert process.process is not None
    status = Path(f"/proc/{process.process.pid}/status").read_text()
    line = next(line for line in status.splitlines() if line.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


def user_item(text: str) -> dict[str, object]:
    return {
        "type": "conversation.item.create",
        "item": {
            "type": "message",
            "role": "user",
            "content": [{"type": "input_text", "text": text}],
        },
    }


class HealthProbe:
    """Polls ``/health`` in a thread; ``worst_s`` is the slowest answer (event-loop stalls)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.worst_s = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=60) as client:
            while not self._stop.is_set():
                started = time.perf_counter()
                client.get(self.url + "/health")
                self.worst_s = max(self.worst_s, time.perf_counter() - started)
                time.sleep(0.05)

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)


def test_history_is_bounded_when_items_arrive(tarry: TarryProcess) -> None:
    """Was: 300 items of 1 MiB were all accepted, and the next response.create tokenized them
    on the event loop until the kernel killed the server (every session lost)."""
    ws = ProtocolClient(tarry.url, KEY_A)
    try:
        info = ws.create_session()
        huge = (LOREM * (1000 * 1024 // len(LOREM)))[: 1000 * 1024]  # just under 1 MiB
        rss_before = rss_bytes(tarry)
        with HealthProbe(tarry.url) as probe:
            for _ in range(40):  # 40 MB offered: every item refused at once, nothing kept
                ws.send(user_item(huge))
                error = ws.recv()
                assert error["type"] == "error", error
                assert error["error"]["code"] == "context_length_exceeded"
            # ~30k tokens in 100 KB: under the byte bound, refused once tokenized (off the loop)
            ws.send(user_item(LOREM * 3800))
            error = ws.recv()
            assert error["error"]["code"] == "context_length_exceeded", error
        assert probe.worst_s < 5.0, f"/health waited {probe.worst_s:.1f}s"
        assert rss_bytes(tarry) - rss_before < 100 << 20
        # The bound is cumulative: items of 2,000 tokens (+ template) fit until the context of
        # 8,192 tokens is full.
        accepted = 0
        while True:
            ws.send(user_item(FOX * 200))
            event = ws.recv()
            if event["type"] == "error":
                assert event["error"]["code"] == "context_length_exceeded", event
                break
            accepted += 1
        assert accepted == 4
        ws.send({"type": "conversation.item.truncate", "count": accepted})
        assert ws.recv()["type"] == "conversation.item.truncated"
        ws.user(FRANCE)  # the session is intact and answers
        text, done = ws.respond(temperature=0, max_output_tokens=20)
        assert "Paris" in text and done["status"] == "completed"
        assert info["id"]
    finally:
        ws.close()


def test_http_chat_messages_have_the_same_bound(tarry: TarryProcess) -> None:
    headers = {"Authorization": f"Bearer {KEY_A}"}
    body = {"model": "tarry", "messages": [{"role": "user", "content": LOREM * 3800}]}
    reply = httpx.post(tarry.url + "/v1/chat/completions", json=body, headers=headers, timeout=60)
    assert reply.status_code == 400
    assert reply.json()["error"]["code"] == "context_length_exceeded"
    body["messages"] = [{"role": "user", "content": LOREM * 12000}]  # over the byte bound
    reply = httpx.post(tarry.url + "/v1/chat/completions", json=body, headers=headers, timeout=60)
    assert reply.status_code == 400
    assert reply.json()["error"]["code"] == "context_length_exceeded"


def _read_reply(sock: socket.socket, timeout_s: float) -> bytes:
    """Everything the server sends until it closes (or ``timeout_s`` passes)."""
    sock.settimeout(timeout_s)
    data = b""
    with contextlib.suppress(TimeoutError, ConnectionResetError):
        while chunk := sock.recv(65536):
            data += chunk
    return data


def _post_head(port: int, extra: str) -> bytes:
    return (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Authorization: Bearer {KEY_A}\r\nContent-Type: application/json\r\n{extra}\r\n"
    ).encode()


def test_request_body_limit_applies_while_reading(tarry: TarryProcess) -> None:
    """Was: a 1 GiB POST was read whole (the server grew by 1.9 GiB) before its 413."""
    with socket.create_connection(("127.0.0.1", tarry.port)) as sock:
        sock.sendall(_post_head(tarry.port, "Content-Length: 1073741824\r\n") + b"{")
        reply = _read_reply(sock, 20)  # the body is never sent: the answer must not wait
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert b"request_too_large" in reply
    # Chunked (no length up front): refused once 1 MiB has arrived, without the terminator.
    with socket.create_connection(("127.0.0.1", tarry.port)) as sock:
        sock.sendall(_post_head(tarry.port, "Transfer-Encoding: chunked\r\n"))
        chunk = b" " * 65536
        for _ in range(17):  # 1.06 MiB, then the client stalls
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        reply = _read_reply(sock, 20)
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_too_large"


def test_websocket_frames_over_the_protocol_limit_are_refused(tarry: TarryProcess) -> None:
    """Was: uvicorn's 16 MiB message limit while the protocol promises 1 MiB frames."""
    ws = ProtocolClient(tarry.url, KEY_A)
    ws.create_session()
    ws.send_raw("x" * (2 << 20))
    with pytest.raises(ConnectionClosed) as closed:
        ws.recv(timeout=30)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009  # message too big
    ws.close()


def test_connections_that_send_nothing_are_closed(tarry: TarryProcess) -> None:
    """Was: a connection that never finished its request headers was held forever."""
    silent = socket.create_connection(("127.0.0.1", tarry.port))
    partial = socket.create_connection(("127.0.0.1", tarry.port))
    partial.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # headers never end
    started = time.monotonic()
    for sock in (silent, partial):
        with sock:
            assert _read_reply(sock, 15) == b""  # closed by the server (header timeout 1 s)
    assert time.monotonic() - started < 10
    url = tarry.url.replace("http://", "ws://") + "/v1/sessions"
    headers = {"Authorization": f"Bearer {KEY_A}"}
    # A WebSocket that sends no event:
    with connect(url, additional_headers=headers) as ws, pytest.raises(ConnectionClosed) as closed:
        ws.recv(timeout=15)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4000


def test_websocket_auth_failure_closes_with_4001(tarry: TarryProcess) -> None:
    """Was: HTTP 403 at the handshake where PROTOCOL.md promises close code 4001."""
    url = tarry.url.replace("http://", "ws://")
    for path in ("/v1/sessions", "/v1/responses"):
        wrong = {"Authorization": "Bearer wrong"}
        with (
            connect(url + path, additional_headers=wrong) as ws,
            pytest.raises(ConnectionClosed) as closed,
        ):
            ws.recv(timeout=15)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4001


def test_records_keep_a_hash_of_the_api_key_and_old_records_still_load(
    tarry: TarryProcess, redis_server: str
) -> None:
    """Was: every session record held its owner's API key in clear (``owner: "key:k2"``)."""
    client = redis.Redis.from_url(redis_server)
    ws = ProtocolClient(tarry.url, KEY_A)
    try:
        session_id = ws.create_session("Be terse.")["id"]
    finally:
        ws.close()
    raw = client.get(session_record_key("tarry", session_id))
    assert raw is not None and KEY_A.encode() not in raw
    assert msgpack.unpackb(raw)["owner"].startswith("sha256:")

    # A record written by older code (key in clear) resumes for its key, and only for it.
    token = "legacy-resume-token"
    legacy = Session(owner="key:" + KEY_A, messages=[{"role": "user", "content": FRANCE}])
    legacy.settings["resume_token_sha256"] = hashlib.sha256(token.encode()).hexdigest()
    key = session_record_key("tarry", legacy.session_id)
    client.set(key, msgpack.packb(legacy.to_record()))
    resume = {"type": "session.resume", "session_id": legacy.session_id, "resume_token": token}
    other = ProtocolClient(tarry.url, KEY_B)
    try:
        other.send(resume)
        assert other.recv()["error"]["code"] == "session_not_found"
    finally:
        other.close()
    ws = ProtocolClient(tarry.url, KEY_A)
    try:
        ws.send(resume)
        assert ws.recv()["type"] == "session.resumed"
        text, _ = ws.respond(temperature=0, max_output_tokens=20)
        assert "Paris" in text
    finally:
        ws.close()
    stored = client.get(key)
    assert stored is not None and KEY_A.encode() not in stored  # rewritten in the new form
