"""Bounded soak of a real ``tarry serve --redis-url`` (issue 14): does anything leak or get lost?

Starts a redis-server (append-only file in a temp dir, so a clean restart keeps its data) and
``tarry serve`` on free ports, then runs ``--sessions`` WebSocket agents for ``--duration-s``
(``bench/soak_agent.py``: chat turns, client tool pauses, python calls, disconnects between and
in the middle of responses, resumes). Half-way through, Redis is shut down for
``--redis-outage-s`` and started again on the same port. Meanwhile this process samples
``GET /health`` latency every 0.2 s (the server's event-loop lag plus a small constant) and
the server's RSS every 5 s (``/proc``; python sandbox interpreters are separate processes and
counted apart).

At the end it reports:

* RSS over time (start, per-minute, end, max) and the sandbox processes still alive;
* lost turns: turns acknowledged by ``response.done`` whose tagged user message is missing
  from the session's history, as the server answers it (REST) and as Redis holds it (the
  record, read from Redis after the server reports every dirty record written back);
* leaked blocks: ``GET /health?integrity=1`` (engine ``check_integrity``, orphan pins and the
  device pool counts), once with the sessions open and once after every session is closed:
  then no block may stay pinned or in use, and no sandbox process may remain;
* event-loop lag: p50 / p99 / max of ``/health`` latency over the run;
* the Redis outage: how long ``/health`` stayed ``degraded`` after Redis was back.

    python bench/soak.py --sessions 16 --duration-s 120
    python bench/soak.py --sessions 64 --duration-s 600 --serve-arg=--device=cuda
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import msgpack
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))
from soak_agent import run_agents  # noqa: E402  (bench/ runs as scripts)

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Redis:
    """redis-server with an append-only file: ``restart`` (SHUTDOWN, then start) keeps data."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = [
            "redis-server",
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--dir",
            str(self.workdir),
        ]
        log = open(self.workdir / "redis.log", "ab")  # noqa: SIM115  (the child keeps it)
        self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        probe = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        for _ in range(500):
            try:
                if probe.ping():
                    return
            except redis.ConnectionError:
                time.sleep(0.02)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGTERM)  # SHUTDOWN: the AOF is flushed
            self.process.wait(timeout=30)
            self.process = None

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=10)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (sandbox interpreters and what they started)."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            with open(task / "children") as children:
                for child in children.read().split():
                    found.append(int(child))
                    todo.append(int(child))
    return found


class Sampler(threading.Thread):
    """``/health`` latency every 0.2 s and RSS every 5 s, until ``stop`` is set."""

    def __init__(self, url: str, pid: int) -> None:
        super().__init__(daemon=True)
        self.url, self.pid = url, pid
        self.stop = threading.Event()
        self.started_at = time.monotonic()
        self.latencies_ms: list[float] = []
        self.rss: list[tuple[float, float, int]] = []  # (t, MiB, sandbox processes)
        self.statuses: list[tuple[float, str, int]] = []  # (t, status, dirty records)

    def run(self) -> None:
        next_rss = 0.0
        with httpx.Client(timeout=60) as client:
            while not self.stop.is_set():
                now = time.monotonic() - self.started_at
                t0 = time.perf_counter()
                try:
                    body = client.get(self.url + "/health").json()
                    self.latencies_ms.append((time.perf_counter() - t0) * 1000)
                    self.statuses.append((now, body["status"], body["session_records_dirty"]))
                except httpx.HTTPError:
                    self.statuses.append((now, "unreachable", -1))
                if now >= next_rss:
                    self.rss.append((now, rss_mib(self.pid), len(descendants(self.pid))))
                    next_rss = now + 5.0
                self.stop.wait(0.2)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def start_server(args: argparse.Namespace, redis_url: str, port: int, log: Path) -> Any:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [
        sys.executable,
        "-m",
        "api.cli",
        "serve",
        "--port",
        str(port),
        "--redis-url",
        redis_url,
        *args.serve_arg,
    ]
    with open(log, "wb") as out:
        return subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


def wait_ready(url: str, process: Any, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError("tarry serve exited during start-up")
        try:
            httpx.get(url + "/health", timeout=2).raise_for_status()
            return
        except httpx.HTTPError:
            time.sleep(0.5)
    raise RuntimeError("tarry serve did not answer /health")


def outage(redis_server: Redis, sampler: Sampler, outage_s: float) -> dict[str, float]:
    """Shut Redis down for ``outage_s``, start it again; seconds until /health is ok."""
    redis_server.stop()
    down_at = time.monotonic() - sampler.started_at
    time.sleep(outage_s)
    redis_server.start()
    back_at = time.monotonic() - sampler.started_at
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        recent = [s for s in sampler.statuses if s[0] > back_at]
        if recent and recent[-1][1] == "ok":
            return {
                "down_at_s": down_at,
                "back_at_s": back_at,
                "ok_after_s": recent[-1][0] - back_at,
            }
        time.sleep(0.1)
    return {"down_at_s": down_at, "back_at_s": back_at, "ok_after_s": float("inf")}


def lost_turns(url: str, redis_server: Redis, stats: list[dict[str, Any]]) -> dict[str, int]:
    """Acknowledged turns missing from the history the server serves, and from Redis."""
    acked = lost_server = lost_redis = 0
    store = redis_server.client()
    for agent in stats:
        if not agent["session_id"]:
            continue
        auth = {"Authorization": f"Bearer {agent['key']}"}
        reply = httpx.get(f"{url}/v1/sessions/{agent['session_id']}", headers=auth, timeout=60)
        served = json.dumps(reply.json().get("items", [])) if reply.status_code == 200 else ""
        raw = store.get(f"tarry:session:{{{agent['session_id']}}}")
        stored = json.dumps(msgpack.unpackb(raw)["messages"]) if raw else ""
        for tag in agent["acked_tags"]:
            acked += 1
            lost_server += tag not in served
            lost_redis += tag not in stored
    return {"acked": acked, "lost_server": lost_server, "lost_redis": lost_redis}


def close_all(url: str, stats: list[dict[str, Any]]) -> int:
    closed = 0
    for agent in stats:
        if agent["session_id"]:
            auth = {"Authorization": f"Bearer {agent['key']}"}
            reply = httpx.delete(f"{url}/v1/sessions/{agent['session_id']}", headers=auth)
            closed += reply.status_code == 200
    return closed


def integrity(url: str) -> dict[str, Any]:
    report: dict[str, Any] = httpx.get(
        url + "/health", params={"integrity": "1"}, timeout=120
    ).json()["integrity"]
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=64)
    parser.add_argument("--duration-s", type=float, default=600.0)
    parser.add_argument("--redis-outage-s", type=float, default=3.0)
    parser.add_argument("--max-tokens", type=int, default=24, help="per response")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--serve-arg", action="append", default=[], help="extra tarry serve flag")
    parser.add_argument("--json", type=Path, default=None, help="write the report here too")
    args = parser.parse_args()
    if not args.serve_arg:
        args.serve_arg = ["--device", "cpu", "--dtype", "float32"]

    with tempfile.TemporaryDirectory(prefix="tarry-soak-") as tmp:
        workdir = Path(tmp)
        redis_server = Redis(workdir)
        redis_server.start()
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = start_server(args, redis_server.url, port, workdir / "tarry.log")
        try:
            wait_ready(url, server)
            report = soak(args, url, server.pid, redis_server, workdir)
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)
            redis_server.stop()
    print(json.dumps(report, indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


def soak(
    args: argparse.Namespace, url: str, pid: int, redis_server: Redis, workdir: Path
) -> dict[str, Any]:
    sampler = Sampler(url, pid)
    sampler.start()
    out_path = workdir / "agents.json"
    agents = multiprocessing.get_context("spawn").Process(
        target=run_agents,
        args=(url, args.sessions, args.duration_s, args.max_tokens, args.seed, str(out_path)),
    )
    agents.start()
    time.sleep(args.duration_s / 2)
    redis_outage = outage(redis_server, sampler, args.redis_outage_s)
    agents.join(timeout=args.duration_s + 900)
    stats: list[dict[str, Any]] = json.loads(out_path.read_text())
    settle_deadline = time.monotonic() + 60  # every dirty record written back
    while time.monotonic() < settle_deadline and sampler.statuses[-1][1:] != ("ok", 0):
        time.sleep(0.2)
    sampler.stop.set()
    sampler.join()
    open_report = integrity(url)
    lost = lost_turns(url, redis_server, stats)
    closed = close_all(url, stats)
    time.sleep(2.0)  # sandboxes are closed off the event loop
    closed_report = integrity(url)
    leaked_pool = closed_report["pool"]
    latencies = sampler.latencies_ms
    actions: dict[str, int] = {}
    errors: dict[str, int] = {}
    for agent in stats:
        for name, count in agent["actions"].items():
            actions[name] = actions.get(name, 0) + count
        for name, count in agent["errors"].items():
            errors[name] = errors.get(name, 0) + count
    turn_s = [s for agent in stats for s in agent["turn_latencies_s"]]
    per_minute, next_minute = [], 0.0
    for sample in sampler.rss:  # the first sample of each minute, and the last one
        if sample[0] >= next_minute or sample is sampler.rss[-1]:
            per_minute.append(sample)
            next_minute = (sample[0] // 60 + 1) * 60
    return {
        "sessions": args.sessions,
        "duration_s": args.duration_s,
        "serve_args": args.serve_arg,
        "actions": actions,
        "errors": errors,
        "reconnects": sum(agent["reconnects"] for agent in stats),
        "turns": lost,
        "turn_latency_s": {
            "p50": statistics.median(turn_s) if turn_s else None,
            "p99": percentile(turn_s, 0.99),
        },
        "health_latency_ms": {
            "n": len(latencies),
            "p50": statistics.median(latencies),
            "p99": percentile(latencies, 0.99),
            "max": max(latencies),
        },
        "rss_mib": {
            "start": sampler.rss[0][1],
            "end": sampler.rss[-1][1],
            "max": max(r[1] for r in sampler.rss),
            "per_minute": [(round(t), round(m, 1), n) for t, m, n in per_minute],
        },
        "redis_outage": redis_outage,
        "integrity_open": {
            k: open_report[k] for k in ("ok", "error", "orphan_pins", "num_sessions")
        },
        "pool_open": open_report["pool"],
        "closed_sessions": closed,
        "integrity_closed": {
            k: closed_report[k] for k in ("ok", "error", "orphan_pins", "num_sessions")
        },
        "leaked_blocks": leaked_pool["num_pinned_blocks"] + leaked_pool["num_in_use_blocks"],
        "sandbox_processes_left": len(descendants(pid)),
    }


if __name__ == "__main__":
    sys.exit(main())
