"""Failover cost: an owner's SIGKILL to the first token on another instance, vs recompute.

    .venv/bin/python -m bench.scaleout_bench [--context-tokens 4000] [--lease-ttl-s 2] [--cluster]

Starts a throw-away redis-server (with ``--cluster``: a three-master Redis Cluster on loopback
ports) and two ``tarry serve`` processes (embedded SmolLM2, CPU, float32) sharing it. A
~N-token session is built on A (one turn), A is SIGKILLed, and the client resumes on B with
``migrate: true`` and asks for the next turn: *takeover* is the time from the kill to that
turn's first streamed token (WebSocket connect, resume, lease take-over, record load, KV
restore from Redis, prefill of the new message). *Recompute* is the first token of the same
history sent to B's ``/v1/chat/completions`` under another API key (another cache salt: no KV
reused, the whole context is prefilled). Both run on the same B process.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from tests.api_helpers import ProtocolClient
from tests.redis_cluster_fixture import LocalCluster
from tests.redis_fixture import RedisServer
from tests.scaleout_helpers import TarryProcess

KEY, OTHER_KEY = "key-bench", "key-bench-recompute"
SYSTEM = "You are a careful assistant. Answer in one short sentence."
QUESTION = "Which item number mentions the colour blue first?"


def long_document(approx_tokens: int) -> str:
    """Numbered filler lines, about 21 tokens each, with varied words."""
    colours = ["red", "green", "amber", "violet", "grey", "blue", "white", "black"]
    lines = [
        f"Item {i}: the {colours[i % 8]} crate holds {i * 7 % 97} parts for station {i % 13}."
        for i in range(approx_tokens // 21)
    ]
    return "Inventory list:\n" + "\n".join(lines) + "\nRead it; I will ask questions."


def first_token_ws(client: ProtocolClient, started: float) -> tuple[float, dict[str, Any]]:
    """Seconds from ``started`` to the first text delta, and the response.done usage."""
    client.send({"type": "response.create", "response": {"temperature": 0, "max_output_tokens": 8}})
    first = None
    while True:
        event = client.recv(timeout=600)
        if event["type"] == "response.output_text.delta" and first is None:
            first = time.perf_counter() - started
        if event["type"] == "response.done":
            usage: dict[str, Any] = event["response"]["usage"]
            client.recv()  # session.state
            assert first is not None, "no token was streamed"
            return first, usage


def first_token_http(base_url: str, messages: list[dict[str, Any]]) -> float:
    """Seconds to the first streamed content chunk of a fresh chat completion."""
    body = {"model": "tarry", "messages": messages, "temperature": 0, "max_tokens": 8}
    started = time.perf_counter()
    with httpx.stream(
        "POST",
        base_url + "/v1/chat/completions",
        json={**body, "stream": True},
        headers={"Authorization": f"Bearer {OTHER_KEY}"},
        timeout=600,
    ) as reply:
        for line in reply.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                return time.perf_counter() - started
    raise RuntimeError("no content was streamed")


def run(context_tokens: int, lease_ttl_s: float, workdir: Path, cluster: bool) -> dict[str, Any]:
    redis_server: RedisServer | LocalCluster
    redis_server = LocalCluster(workdir / "cluster") if cluster else RedisServer(workdir / "redis")
    redis_server.start()
    url = redis_server.url
    extra = ("--redis-cluster",) if cluster else ()
    a = TarryProcess(url, workdir, lease_ttl_s, *extra).start()
    b = TarryProcess(url, workdir, lease_ttl_s, *extra).start()
    try:
        a.wait_ready(180)
        b.wait_ready(180)
        on_a = ProtocolClient(a.url, KEY)
        info = on_a.create_session(SYSTEM)
        on_a.user(long_document(context_tokens))
        _, built = on_a.respond(temperature=0, max_output_tokens=8)
        context = built["usage"]["total_tokens"]

        started = time.perf_counter()
        a.kill()
        on_b = ProtocolClient(b.url, KEY)
        on_b.send(
            {
                "type": "session.resume",
                "session_id": info["id"],
                "resume_token": info["resume_token"],
                "migrate": True,
            }
        )
        resumed = on_b.recv()
        assert resumed["type"] == "session.resumed", resumed
        on_b.user(QUESTION)
        takeover_s, usage = first_token_ws(on_b, started)
        items = httpx.get(
            f"{b.url}/v1/sessions/{info['id']}", headers={"Authorization": f"Bearer {KEY}"}
        ).json()["items"]
        recompute_s = first_token_http(b.url, items[:4])
        on_b.close()
        return {
            "redis": "cluster of 3 masters" if cluster else "single",
            "context_tokens": context,
            "prompt_tokens": usage["input_tokens"],
            "cached_tokens": usage["input_token_details"]["cached_tokens"],
            "restored_tokens": usage["input_token_details"]["restored_tokens"],
            "takeover_first_token_s": round(takeover_s, 3),
            "recompute_first_token_s": round(recompute_s, 3),
            "speedup": round(recompute_s / takeover_s, 2),
        }
    finally:
        a.kill()
        b.stop()
        redis_server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--context-tokens", type=int, default=4000)
    parser.add_argument("--lease-ttl-s", type=float, default=2.0)
    parser.add_argument("--cluster", action="store_true", help="a three-master Redis Cluster")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tarry-scaleout-bench-") as tmp:
        result = run(args.context_tokens, args.lease_ttl_s, Path(tmp), args.cluster)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
