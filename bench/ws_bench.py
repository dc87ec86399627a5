"""Agents over the WebSocket session protocol vs the same agents as fresh HTTP calls.

    python bench/ws_bench.py [--agents 4] [--turns 8] [--max-tokens 24]

N agents run concurrently, each for ``--turns`` turns. Turn 1 is a user question; later turns
alternate a fake tool result ("Tool result: 18 degrees", sent as a user message) and a user
follow-up. Every turn asks for ``--max-tokens`` tokens at temperature 0.

- ``session`` mode: one ``/v1/sessions`` WebSocket per agent; each turn sends only the new item
  and ``response.create``. TTFT = send of ``response.create`` -> first
  ``response.output_text.delta``; tokens from ``response.done`` usage.
- ``http`` mode: each turn is a fresh streaming ``/v1/chat/completions`` call (official
  ``openai`` client) carrying the whole history. TTFT = call -> first chunk with content;
  tokens from ``stream_options.include_usage``.

Each mode gets its own fresh engine and server (warmed up, then the prefix cache reset), so HTTP
cannot reuse KV that the session mode computed. HTTP still reuses the prefix cache of its own
earlier turns, which is what a good stateless server does; the comparison is against that.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import openai
from websockets.sync.client import ClientConnection, connect

from api.server import BackgroundServer, ServeOptions, build_state
from engine.llm_engine import LLMEngine
from engine.model_loader import LoadedModel, load_model

API_KEY = "bench"
INSTRUCTIONS = (
    "You are a helpful assistant that can check the weather with a tool. "
    "Answer briefly and use the tool results you are given."
)
CITIES = ["Paris", "Berlin", "Madrid", "Rome", "Vienna", "Oslo", "Lisbon", "Prague"]
FOLLOW_UPS = [
    "Should I take an umbrella?",
    "What about tomorrow morning?",
    "Is it warmer than yesterday?",
    "Summarise the forecast in one sentence.",
]


@dataclass
class Workload:
    agents: int
    turns: int
    max_tokens: int


@dataclass
class TurnRecord:
    """One turn of one agent, as the client saw it."""

    agent: int
    turn: int
    ttft_s: float | None  # None when the response had no text at all
    input_tokens: int
    output_tokens: int
    cached_tokens: int
    restored_tokens: int
    text: str


@dataclass
class ModeResult:
    name: str
    records: list[TurnRecord]
    wall_s: float

    @property
    def output_tokens(self) -> int:
        return sum(r.output_tokens for r in self.records)

    @property
    def throughput(self) -> float:
        return self.output_tokens / self.wall_s


def turn_text(agent: int, turn: int) -> str:
    """The user-side text an agent adds at ``turn`` (0-based)."""
    city = CITIES[agent % len(CITIES)]
    if turn == 0:
        return f"What is the weather in {city} right now? Use the weather tool."
    if turn % 2 == 1:
        degrees = 12 + (agent * 3 + turn) % 15
        return f"Tool result: {degrees} degrees, light wind, {60 + turn} % humidity in {city}."
    return FOLLOW_UPS[(turn // 2 - 1) % len(FOLLOW_UPS)]


# -- session protocol -------------------------------------------------------------------------


def ws_send(ws: ClientConnection, event: dict[str, Any]) -> None:
    """Send one client event as a JSON text frame."""
    ws.send(json.dumps(event))


def ws_recv(ws: ClientConnection) -> dict[str, Any]:
    """The next event; raises on a protocol ``error`` event."""
    frame = ws.recv(timeout=300)
    event: dict[str, Any] = json.loads(frame)
    if event["type"] == "error":
        raise RuntimeError(f"protocol error: {event['error']}")
    return event


def ws_turn(ws: ClientConnection, agent: int, turn: int, workload: Workload) -> TurnRecord:
    """Append this turn's item, then time one ``response.create`` until ``session.state``."""
    item = {
        "type": "message",
        "role": "user",
        "content": [{"type": "input_text", "text": turn_text(agent, turn)}],
    }
    ws_send(ws, {"type": "conversation.item.create", "item": item})
    assert ws_recv(ws)["type"] == "conversation.item.added"
    overrides = {"max_output_tokens": workload.max_tokens, "temperature": 0}
    start = time.perf_counter()
    ws_send(ws, {"type": "response.create", "response": overrides})
    ttft, pieces = None, []
    while (event := ws_recv(ws))["type"] != "response.done":
        if event["type"] == "response.output_text.delta" and event["delta"]:
            ttft = time.perf_counter() - start if ttft is None else ttft
            pieces.append(event["delta"])
    usage = event["response"]["usage"]
    assert ws_recv(ws)["type"] == "session.state"
    details = usage["input_token_details"]
    return TurnRecord(
        agent,
        turn,
        ttft,
        usage["input_tokens"],
        usage["output_tokens"],
        details["cached_tokens"],
        details["restored_tokens"],
        "".join(pieces),
    )


def ws_agent(
    base_url: str, agent: int, workload: Workload, barrier: threading.Barrier
) -> list[TurnRecord]:
    """One agent: a WebSocket session kept open for all its turns."""
    url = base_url.replace("http://", "ws://") + "/v1/sessions"
    ws = connect(url, additional_headers={"Authorization": f"Bearer {API_KEY}"})
    with ws:
        ws_send(ws, {"type": "session.create", "session": {"instructions": INSTRUCTIONS}})
        assert ws_recv(ws)["type"] == "session.created"
        barrier.wait()
        records = [ws_turn(ws, agent, turn, workload) for turn in range(workload.turns)]
        ws_send(ws, {"type": "session.close"})
        assert ws_recv(ws)["type"] == "session.closed"
    return records


# -- fresh HTTP calls -------------------------------------------------------------------------


def http_turn(
    client: openai.OpenAI, messages: list[Any], agent: int, turn: int, workload: Workload
) -> TurnRecord:
    """One streaming chat completion over the whole history; appends the reply to it."""
    start = time.perf_counter()
    stream = client.chat.completions.create(
        model="tarry",
        messages=messages,
        max_tokens=workload.max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    ttft, pieces, usage = None, [], None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            ttft = time.perf_counter() - start if ttft is None else ttft
            pieces.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            usage = chunk.usage
    assert usage is not None, "the stream ended without usage"
    text = "".join(pieces)
    messages.append({"role": "assistant", "content": text})
    details = usage.prompt_tokens_details
    cached = (details.cached_tokens or 0) if details else 0
    return TurnRecord(
        agent, turn, ttft, usage.prompt_tokens, usage.completion_tokens, cached, 0, text
    )


def http_agent(
    base_url: str, agent: int, workload: Workload, barrier: threading.Barrier
) -> list[TurnRecord]:
    """One agent: every turn a new request carrying the full conversation."""
    client = openai.OpenAI(base_url=base_url + "/v1", api_key=API_KEY, max_retries=0)
    messages: list[Any] = [{"role": "system", "content": INSTRUCTIONS}]
    barrier.wait()
    records = []
    for turn in range(workload.turns):
        messages.append({"role": "user", "content": turn_text(agent, turn)})
        records.append(http_turn(client, messages, agent, turn, workload))
    client.close()
    return records


# -- running a mode ---------------------------------------------------------------------------


AgentFn = Callable[[str, int, Workload, threading.Barrier], list[TurnRecord]]


def warm_up(base_url: str) -> None:
    """One short request so that the measured turns do not pay first-call costs."""
    client = openai.OpenAI(base_url=base_url + "/v1", api_key="warm-up", max_retries=0)
    client.chat.completions.create(
        model="tarry",
        messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=8,
        temperature=0,
    )
    client.close()


def run_mode(loaded: LoadedModel, name: str, agent_fn: AgentFn, workload: Workload) -> ModeResult:
    """A fresh engine and server, warmed up, prefix cache emptied, then all agents at once."""
    state = build_state(LLMEngine(loaded), ServeOptions(port=0))
    server = BackgroundServer(state)
    base_url = server.start()
    try:
        warm_up(base_url)
        state.async_engine.run_exclusive(state.async_engine.engine.reset_prefix_cache)
        barrier = threading.Barrier(workload.agents + 1)
        with ThreadPoolExecutor(workload.agents) as pool:
            futures = [
                pool.submit(agent_fn, base_url, agent, workload, barrier)
                for agent in range(workload.agents)
            ]
            barrier.wait()
            start = time.perf_counter()
            records = [r for future in futures for r in future.result()]
            wall = time.perf_counter() - start
    finally:
        server.stop()
    return ModeResult(name, records, wall)


# -- report -----------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (``q`` in [0, 100]) of a non-empty list."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def ttfts(result: ModeResult, turn: int | None = None) -> list[float]:
    """TTFTs in ms of ``turn`` (all turns if None), skipping responses without text."""
    return [
        r.ttft_s * 1000
        for r in result.records
        if r.ttft_s is not None and (turn is None or r.turn == turn)
    ]


def turn_stats(result: ModeResult, turn: int | None) -> dict[str, float]:
    """Mean/p50/p90 TTFT, mean input and cached tokens for one turn index (or all turns)."""
    times = ttfts(result, turn)
    rows = [r for r in result.records if turn is None or r.turn == turn]
    return {
        "mean": statistics.fmean(times) if times else float("nan"),
        "p50": percentile(times, 50) if times else float("nan"),
        "p90": percentile(times, 90) if times else float("nan"),
        "input": statistics.fmean(r.input_tokens for r in rows),
        "cached": statistics.fmean(r.cached_tokens for r in rows),
        "restored": statistics.fmean(r.restored_tokens for r in rows),
    }


def print_mode(result: ModeResult, turns: int) -> None:
    """Per-turn table for one mode, then its totals."""
    print(f"\n[{result.name}]")
    print("turn | TTFT mean | p50     | p90     | input tok | cached tok | restored tok")
    for turn in [*range(turns), None]:
        s = turn_stats(result, turn)
        label = f"{turn + 1:>4}" if turn is not None else " all"
        print(
            f"{label} | {s['mean']:7.0f}ms | {s['p50']:5.0f}ms | {s['p90']:5.0f}ms |"
            f" {s['input']:9.1f} | {s['cached']:10.1f} | {s['restored']:12.1f}"
        )
    missing = sum(r.ttft_s is None for r in result.records)
    print(
        f"output tokens {result.output_tokens} in {result.wall_s:.1f}s wall:"
        f" {result.throughput:.1f} tok/s" + (f"; {missing} turns without text" if missing else "")
    )


def print_comparison(session: ModeResult, http: ModeResult, turns: int) -> None:
    """Session protocol TTFT relative to fresh HTTP, per turn and overall."""
    print("\n[session protocol vs fresh HTTP, same workload, separate fresh servers]")
    print("turn | session TTFT mean | HTTP TTFT mean | session/HTTP")
    for turn in [*range(turns), None]:
        s, h = turn_stats(session, turn)["mean"], turn_stats(http, turn)["mean"]
        label = f"{turn + 1:>4}" if turn is not None else " all"
        print(f"{label} | {s:14.0f}ms | {h:12.0f}ms | {s / h:11.2f}x")
    print(
        f"throughput: session {session.throughput:.1f} tok/s, HTTP {http.throughput:.1f} tok/s"
        f" ({session.throughput / http.throughput:.2f}x)"
    )
    same = sum(
        a.text == b.text
        for a, b in zip(
            sorted(session.records, key=lambda r: (r.agent, r.turn)),
            sorted(http.records, key=lambda r: (r.agent, r.turn)),
            strict=True,
        )
    )
    print(f"identical replies (greedy): {same} of {len(session.records)} turns")
    print(
        "note: HTTP legitimately reuses the prefix cache of its own earlier turns (its cached"
        " tokens above); it cannot reuse the session mode's KV (separate fresh servers)."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=4)
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--model", default=None, help="default: the embedded SmolLM2")
    args = parser.parse_args()
    workload = Workload(args.agents, args.turns, args.max_tokens)
    loaded = load_model(args.model)
    print(
        f"model {loaded.name} on {loaded.device}; {workload.agents} agents x {workload.turns}"
        f" turns, max {workload.max_tokens} output tokens, temperature 0"
    )
    session = run_mode(loaded, "session protocol /v1/sessions (WebSocket)", ws_agent, workload)
    print_mode(session, workload.turns)
    http = run_mode(loaded, "fresh HTTP /v1/chat/completions (streaming)", http_agent, workload)
    print_mode(http, workload.turns)
    print_comparison(session, http, workload.turns)


if __name__ == "__main__":
    main()
