"""Helpers for scale-out tests and benchmarks: real ``tarry serve`` processes on free ports."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
TARRY = ROOT / ".venv" / "bin" / "tarry"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class TarryProcess:
    """``tarry serve`` (embedded model, CPU, float32) sharing ``redis_url``, logging to a file.

    ``start`` returns at once; ``wait_ready`` polls ``/health``. ``kill`` is SIGKILL (no clean
    shutdown: its leases and registration expire on their own), ``stop`` is SIGTERM.
    """

    def __init__(
        self, redis_url: str, log_dir: Path, lease_ttl_s: float = 3.0, *extra: str
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"tarry-{self.port}.log"
        self.args = [
            str(TARRY),
            "serve",
            "--port",
            str(self.port),
            "--redis-url",
            redis_url,
            "--lease-ttl-s",
            str(lease_ttl_s),
            "--device",
            "cpu",
            "--dtype",
            "float32",
            *extra,
        ]
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> TarryProcess:
        log = open(self.log_path, "ab")  # noqa: SIM115  (the child keeps it)
        self.process = subprocess.Popen(
            self.args, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=dict(os.environ)
        )
        log.close()
        return self

    def wait_ready(self, timeout_s: float = 90.0) -> dict[str, Any]:
        """The first ``/health`` body; raises RuntimeError (with the log) if it never answers."""
        assert self.process is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"tarry exited:\n{self.log_path.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                return self.health()
            time.sleep(0.2)
        raise RuntimeError(f"tarry did not answer /health:\n{self.log_path.read_text()[-3000:]}")

    def health(self) -> dict[str, Any]:
        reply = httpx.get(self.url + "/health", timeout=5)
        reply.raise_for_status()
        body: dict[str, Any] = reply.json()
        return body

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.kill()


def wait_for(predicate: Any, timeout_s: float, what: str) -> Any:
    """Poll ``predicate()`` until it returns something truthy; AssertionError on timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)
