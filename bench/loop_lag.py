"""Event-loop lag of a real ``tarry serve``: ``GET /health`` latency while agents generate.

Starts ``tarry serve`` (the code of ``--root``, default this tree: point it at a checkout of
an older commit to compare) on a free port, samples ``/health`` on an idle server, then
again while ``--agents`` clients each stream chat completions back to back (``max_tokens``
with ``ignore_eos``, so every request runs its full length and requests start and finish all
the time). ``/health`` never touches the engine, so its latency is the server's event-loop lag
plus the client's and the machine's own overhead (the idle figure).

The agents run in a child process and the sampler in this one, so the load generator's own
event loop does not delay the measurement.

    python bench/loop_lag.py                       # this tree
    python bench/loop_lag.py --root /tmp/tarry-old # another checkout, same settings
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(root: Path, port: int, log_path: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(root)}
    args = [sys.executable, "-m", "api.cli", "serve", "--port", str(port), "--device", "cpu"]
    args += ["--dtype", "float32"]
    with open(log_path, "wb") as log:
        return subprocess.Popen(args, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)


def wait_ready(url: str, process: subprocess.Popen[bytes], timeout_s: float = 180) -> None:
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


def sample_health(url: str, seconds: float, interval_s: float) -> list[float]:
    """Latencies (ms) of sequential ``GET /health`` calls over ``seconds``."""
    latencies = []
    with httpx.Client(timeout=30) as client:
        client.get(url + "/health")  # connect once; keep-alive afterwards
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            started = time.perf_counter()
            client.get(url + "/health").raise_for_status()
            latencies.append((time.perf_counter() - started) * 1000)
            time.sleep(interval_s)
    return latencies


async def _agent(url: str, idx: int, max_tokens: int, stop: Any, tokens: Any) -> None:
    body = {
        "messages": [{"role": "user", "content": f"Agent {idx}: tell me a long story."}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
    }
    async with httpx.AsyncClient(timeout=300) as client:
        while not stop.is_set():
            async with client.stream("POST", url + "/v1/chat/completions", json=body) as reply:
                async for line in reply.aiter_lines():
                    if line.startswith("data: {"):
                        with tokens.get_lock():
                            tokens.value += 1


def run_agents(url: str, num_agents: int, max_tokens: int, stop: Any, tokens: Any) -> None:
    async def all_agents() -> None:
        await asyncio.gather(*(_agent(url, i, max_tokens, stop, tokens) for i in range(num_agents)))

    asyncio.run(all_agents())


def summary(name: str, latencies: list[float]) -> str:
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    stalls = [ms for ms in ordered if ms > 100]
    return (
        f"{name}: n={len(ordered)} p50={statistics.median(ordered):.1f} ms "
        f"p99={p99:.1f} ms max={ordered[-1]:.1f} ms; {len(stalls)} over 100 ms "
        f"({sum(stalls) / 1000:.1f} s in all)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=ROOT, help="the tarry tree to serve")
    parser.add_argument("--agents", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=30.0, help="loaded sampling time")
    parser.add_argument("--idle-seconds", type=float, default=5.0)
    parser.add_argument("--interval-ms", type=float, default=20.0)
    args = parser.parse_args()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = Path(f"/tmp/loop_lag-{port}.log")
    server = start_server(args.root.resolve(), port, log_path)
    try:
        wait_ready(url, server)
        idle = sample_health(url, args.idle_seconds, args.interval_ms / 1000)
        stop = multiprocessing.Event()
        tokens = multiprocessing.Value("q", 0)
        agents = multiprocessing.Process(
            target=run_agents, args=(url, args.agents, args.max_tokens, stop, tokens)
        )
        agents.start()
        time.sleep(3.0)  # every agent has a request in flight
        start_tokens = tokens.value
        loaded = sample_health(url, args.seconds, args.interval_ms / 1000)
        token_rate = (tokens.value - start_tokens) / args.seconds
        stop.set()
        agents.join(timeout=120)
        if agents.is_alive():
            agents.terminate()
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
    print(
        f"tarry at {args.root.resolve()} ({args.agents} streaming agents, {args.max_tokens} tokens"
    )
    print(f"per request, ignore_eos; /health every {args.interval_ms:.0f} ms)")
    print(summary("idle   /health", idle))
    print(summary("loaded /health", loaded))
    print(f"streamed chunks/s while loaded: {token_rate:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
