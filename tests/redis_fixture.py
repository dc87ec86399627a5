"""A real, throwaway redis-server for tests, plus a latency proxy.

Use the session-wide server from any test module (or conftest) by importing the fixture::

    from tests.redis_fixture import redis_server  # noqa: F401   (yields "redis://127.0.0.1:P/0")

Tests that stop, pause or restart Redis take ``redis_process`` (their own server, a
``RedisServer``) so they never disturb the shared one. Tests fail (never skip) when ``redis-server``
is not installed. Nothing is persisted: ``--save "" --appendonly no``, in a temp dir.
"""

from __future__ import annotations

import contextlib
import heapq
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import redis

REDIS_SERVER = "redis-server"


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """One redis-server subprocess on 127.0.0.1:``port``; ``stop``/``start`` keep the port,
    ``pause``/``resume`` freeze it (SIGSTOP/SIGCONT) to provoke timeouts."""

    def __init__(
        self, workdir: Path, port: int | None = None, extra_args: Sequence[str] = ()
    ) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.extra_args = list(extra_args)  # e.g. --cluster-enabled yes
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> None:
        """Start the server and wait until it answers PING. Raises RuntimeError if it does not."""
        if self._process is not None:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = open(self.workdir / "redis.log", "ab")  # noqa: SIM115  (the child keeps it)
        self._process = subprocess.Popen(
            [
                REDIS_SERVER,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
                *self.extra_args,
            ],  # fmt: skip
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        self._wait_ready(timeout_s)

    def stop(self) -> None:
        """Kill the server (all data is lost) and wait for it to exit."""
        if self._process is None:
            return
        self.resume()
        self._process.kill()
        self._process.wait(timeout=10)
        self._process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def pause(self) -> None:
        if self._process is not None:
            self._process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self._process is not None:
            self._process.send_signal(signal.SIGCONT)

    def client(self) -> redis.Redis:
        """A plain client (bytes replies) for inspecting and tampering in tests."""
        return redis.Redis.from_url(self.url, socket_timeout=5)

    def _wait_ready(self, timeout_s: float) -> None:
        assert self._process is not None
        deadline = time.monotonic() + timeout_s
        probe = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.2)
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"redis-server exited; see {self.workdir / 'redis.log'}")
            with contextlib.suppress(redis.ConnectionError):
                if probe.ping():
                    probe.close()
                    return
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server did not answer PING within {timeout_s} s")


def require_redis_server() -> None:
    """Fail (never skip): the tests' Redis must be real; ./scripts/test.sh installs it."""
    if shutil.which(REDIS_SERVER) is None:
        raise RuntimeError(f"{REDIS_SERVER} is not installed (apt-get install redis-server)")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The URL of a redis-server shared by the whole test session."""
    require_redis_server()
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def redis_process(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test's own, to stop, pause and restart at will."""
    require_redis_server()
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()


class LatencyProxy:
    """A TCP forwarder to ``127.0.0.1:target_port`` that delays every chunk by ``delay_s`` in
    each direction without limiting throughput, so a request/reply pair costs 2 * delay_s and
    pipelined requests share one. ``url`` points at the proxy."""

    def __init__(self, target_port: int, delay_s: float) -> None:
        self.target_port = target_port
        self.delay_s = delay_s
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def close(self) -> None:
        self._closed.set()
        self._listener.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            for sock in (client, upstream):  # no Nagle: latency must come from delay_s only
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        """Read chunks as they come; a second thread sends each one once it is due."""
        due: list[tuple[float, int, bytes]] = []
        ready = threading.Condition()
        sequence = 0

        def send_when_due() -> None:
            while True:
                with ready:
                    while not due:
                        ready.wait()
                    when, _, chunk = due[0]
                    wait_s = when - time.monotonic()
                    if wait_s > 0:
                        ready.wait(wait_s)
                        continue
                    heapq.heappop(due)
                if not chunk:
                    with contextlib.suppress(OSError):
                        sink.shutdown(socket.SHUT_WR)
                    return
                try:
                    sink.sendall(chunk)
                except OSError:
                    return

        threading.Thread(target=send_when_due, daemon=True).start()
        while True:
            try:
                chunk = source.recv(1 << 16)
            except OSError:
                chunk = b""
            with ready:
                heapq.heappush(due, (time.monotonic() + self.delay_s, sequence, chunk))
                sequence += 1
                ready.notify()
            if not chunk:
                return
