"""A throw-away redis-server for the benchmarks (``from local_redis import local_redis``;
the benchmarks run as ``python bench/<name>.py``, so this folder is on ``sys.path``)."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator

import redis


@contextlib.contextmanager
def local_redis() -> Iterator[str]:
    """A redis-server on a free loopback port, without persistence; yields its URL."""
    if shutil.which("redis-server") is None:
        raise SystemExit("redis-server is not installed")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as workdir:
        args = ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        server = subprocess.Popen(
            ["redis-server", *args, "--dir", workdir], stdout=subprocess.DEVNULL
        )
        try:
            probe = redis.Redis(port=port)
            for _ in range(500):
                with contextlib.suppress(redis.ConnectionError):
                    if probe.ping():
                        break
                time.sleep(0.01)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            server.kill()
            server.wait()
