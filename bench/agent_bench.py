"""Multi-turn agents with tool pauses against a running server: OpenAI HTTP or Tarry sessions.

    python bench/agent_bench.py --base-url http://127.0.0.1:8000 --protocol http|ws
        [--model NAME] [--agents 8] [--turns 8] [--pause-max-s 2] [--max-tokens 32]
        [--system-words 600] [--tool-words 250] [--seed 0] [--no-ignore-eos]
        [--api-key KEY] [--label NAME] [--json-out FILE]

N agents start together; each runs K turns. Turn 1 sends the shared ~600-word system prompt
and a short task (distinct per agent); after each reply the agent "runs a tool" (sleeps a
seeded uniform 0..pause-max-s) and appends a ~250-word tool result (a user message, distinct
per agent and turn), then asks for the next reply. Every reply: ``max_tokens`` tokens,
temperature 0, ``ignore_eos`` (both protocols; ``--no-ignore-eos`` to leave it out).

- ``http``: streaming ``/v1/chat/completions`` (official ``openai`` client), the whole history
  re-sent every turn, as agent frameworks do. Works against any OpenAI-compatible server
  (vLLM needs ``--enable-prompt-tokens-details`` to report cached tokens).
- ``ws``: Tarry's session WebSocket ``/v1/sessions``: one session per agent, each turn sends
  only the new item and ``response.create`` (a reply that ends early at EOS is counted in the
  summary).

TTFT = request sent -> first streamed text. Reported: wall time, TTFT medians of the first and
second half of the turns (turns 1-4 and 5-8 at K=8), generation throughput (output tokens /
wall), prompt and cached tokens from usage, and the diff of the server's ``/metrics`` counters
(Tarry: prompt tokens cached per tier and computed, for every surface; vLLM: prefix-cache
queries/hits), and the machine's CPU steal during the run (on a VM, the host's contention: it
moves the same run's wall by tens of percent, see docs/BENCHMARKS.md; compare runs of similar
steal).

The prompts are the same in every run, so greedy replies are comparable across servers. So that
a run cannot reuse KV an earlier run left on the same server, each run has its own cache salt:
a random API key by default (Tarry salts its prefix cache per key) and, when the server is
vLLM (``owned_by: vllm`` in ``/v1/models``), the same string as vLLM's ``cache_salt`` field.
Other servers: restart them between runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import httpx
import openai
from agent_workload import (
    diff_counters,
    pause_rng,
    scrape_counters,
    system_prompt,
    task_message,
    tool_result,
)
from websockets.sync.client import ClientConnection, connect


@dataclass(frozen=True)
class Workload:
    agents: int
    turns: int
    max_tokens: int
    pause_max_s: float
    system_words: int
    tool_words: int
    seed: int
    ignore_eos: bool


@dataclass
class Turn:
    """One reply as the client saw it."""

    agent: int
    turn: int  # 0-based
    ttft_s: float | None  # None when no text was streamed
    latency_s: float
    prompt_tokens: int
    cached_tokens: int
    restored_tokens: int | None  # of the cached, from host memory / Redis (sessions only)
    output_tokens: int
    text: str  # the reply (greedy: comparable across servers and protocols)


@dataclass(frozen=True)
class Target:
    base_url: str  # without /v1
    model: str
    api_key: str  # one key for all agents (Tarry: also the prefix-cache salt)
    cache_salt: str | None  # vLLM's per-request salt; None for other servers


# -- OpenAI HTTP ------------------------------------------------------------------------------


def http_reply(
    client: openai.OpenAI,
    target: Target,
    messages: list[Any],
    work: Workload,
    agent: int,
    turn: int,
) -> tuple[Turn, str]:
    """One streaming chat completion over the whole history: the turn and the reply text."""
    extra: dict[str, Any] = {"ignore_eos": True} if work.ignore_eos else {}
    if target.cache_salt is not None:
        extra["cache_salt"] = target.cache_salt
    start = time.perf_counter()
    stream = client.chat.completions.create(
        model=target.model,
        messages=messages,
        max_tokens=work.max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=extra or None,
    )
    ttft, pieces, usage = None, [], None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            ttft = time.perf_counter() - start if ttft is None else ttft
            pieces.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            usage = chunk.usage
    latency = time.perf_counter() - start
    assert usage is not None, "the stream ended without usage (stream_options.include_usage)"
    details = usage.prompt_tokens_details
    cached = (details.cached_tokens or 0) if details else 0
    text = "".join(pieces)
    record = Turn(
        agent, turn, ttft, latency, usage.prompt_tokens, cached, None, usage.completion_tokens, text
    )
    return record, text


def http_agent(
    target: Target, work: Workload, agent: int, barrier: threading.Barrier
) -> list[Turn]:
    """One agent whose every turn is a new request carrying the full conversation."""
    client = openai.OpenAI(
        base_url=target.base_url + "/v1", api_key=target.api_key, max_retries=0, timeout=600
    )
    pauses = pause_rng(agent, work.seed)
    messages: list[Any] = [
        {"role": "system", "content": system_prompt(work.system_words, work.seed)},
        {"role": "user", "content": task_message(agent, work.seed)},
    ]
    barrier.wait()
    turns = []
    for turn in range(work.turns):
        if turn > 0:
            time.sleep(pauses.uniform(0, work.pause_max_s))
            result = tool_result(agent, turn - 1, work.tool_words, work.seed)
            messages.append({"role": "user", "content": result})
        record, text = http_reply(client, target, messages, work, agent, turn)
        messages.append({"role": "assistant", "content": text})
        turns.append(record)
    client.close()
    return turns


# -- Tarry session WebSocket ------------------------------------------------------------------


def ws_send(ws: ClientConnection, event: dict[str, Any]) -> None:
    ws.send(json.dumps(event))


def ws_recv(ws: ClientConnection) -> dict[str, Any]:
    """The next event; raises on an ``error`` event."""
    event: dict[str, Any] = json.loads(ws.recv(timeout=600))
    if event["type"] == "error":
        raise RuntimeError(f"protocol error: {event['error']}")
    return event


def ws_add_user(ws: ClientConnection, text: str) -> None:
    item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}
    ws_send(ws, {"type": "conversation.item.create", "item": item})
    assert ws_recv(ws)["type"] == "conversation.item.added"


def ws_reply(ws: ClientConnection, work: Workload, agent: int, turn: int) -> Turn:
    """One ``response.create`` until ``session.state``; the session keeps the history."""
    overrides: dict[str, Any] = {"max_output_tokens": work.max_tokens, "temperature": 0}
    if work.ignore_eos:
        overrides["ignore_eos"] = True
    start = time.perf_counter()
    ws_send(ws, {"type": "response.create", "response": overrides})
    ttft, pieces = None, []
    while (event := ws_recv(ws))["type"] != "response.done":
        if event["type"] == "response.output_text.delta" and event["delta"]:
            ttft = time.perf_counter() - start if ttft is None else ttft
            pieces.append(event["delta"])
    latency = time.perf_counter() - start
    usage = event["response"]["usage"]
    assert ws_recv(ws)["type"] == "session.state"
    details = usage["input_token_details"]
    return Turn(
        agent,
        turn,
        ttft,
        latency,
        usage["input_tokens"],
        details["cached_tokens"],
        details.get("restored_tokens"),
        usage["output_tokens"],
        "".join(pieces),
    )


def ws_agent(target: Target, work: Workload, agent: int, barrier: threading.Barrier) -> list[Turn]:
    """One agent on one session; each turn sends only its new item."""
    url = target.base_url.replace("http://", "ws://", 1).replace("https://", "wss://", 1)
    headers = {"Authorization": f"Bearer {target.api_key}"}
    with connect(url + "/v1/sessions", additional_headers=headers, max_size=None) as ws:
        instructions = system_prompt(work.system_words, work.seed)
        ws_send(ws, {"type": "session.create", "session": {"instructions": instructions}})
        assert ws_recv(ws)["type"] == "session.created"
        pauses = pause_rng(agent, work.seed)
        ws_add_user(ws, task_message(agent, work.seed))
        barrier.wait()
        turns = []
        for turn in range(work.turns):
            if turn > 0:
                time.sleep(pauses.uniform(0, work.pause_max_s))
                ws_add_user(ws, tool_result(agent, turn - 1, work.tool_words, work.seed))
            turns.append(ws_reply(ws, work, agent, turn))
        ws_send(ws, {"type": "session.close"})
        assert ws_recv(ws)["type"] == "session.closed"
    return turns


# -- running and reporting --------------------------------------------------------------------


def warm_up(target: Target) -> None:
    """One short request unrelated to the workload, so that no turn pays first-call costs."""
    client = openai.OpenAI(base_url=target.base_url + "/v1", api_key=target.api_key, timeout=600)
    client.chat.completions.create(
        model=target.model,
        messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=4,
        temperature=0,
    )
    client.close()


def run_agents(target: Target, work: Workload, protocol: str) -> tuple[list[Turn], float]:
    """All agents at once; the turns and the wall time from the common start to the last reply."""
    agent_fn = ws_agent if protocol == "ws" else http_agent
    barrier = threading.Barrier(work.agents + 1)
    with ThreadPoolExecutor(work.agents) as pool:
        futures = [pool.submit(agent_fn, target, work, a, barrier) for a in range(work.agents)]
        barrier.wait()
        start = time.perf_counter()
        turns = [t for future in futures for t in future.result()]
        wall = time.perf_counter() - start
    return turns, wall


def cpu_ticks() -> tuple[int, int] | None:
    """(steal, total) CPU ticks of the whole machine since boot, from ``/proc/stat``; None
    where there is none. Steal is time the VM's host ran something else while this machine
    had work: on a shared VM it varies from run to run and slows every run it hits."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(v) for v in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return (fields[7] if len(fields) > 7 else 0), sum(fields[:8])


def steal_percent(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    """Share of the machine's CPU time stolen by the VM host between two ``cpu_ticks``."""
    if before is None or after is None or after[1] == before[1]:
        return None
    return 100.0 * (after[0] - before[0]) / (after[1] - before[1])


def median_ttft_ms(turns: list[Turn], first: int, last: int) -> float | None:
    """Median TTFT in ms of 0-based turns ``first..last-1``; None when there are none."""
    times = [t.ttft_s * 1000 for t in turns if first <= t.turn < last and t.ttft_s is not None]
    return statistics.median(times) if times else None


def summarise(
    turns: list[Turn], wall: float, work: Workload, steal: float | None = None
) -> dict[str, Any]:
    half = (work.turns + 1) // 2
    output = sum(t.output_tokens for t in turns)
    prompt = sum(t.prompt_tokens for t in turns)
    cached = sum(t.cached_tokens for t in turns)
    restored = [t.restored_tokens for t in turns if t.restored_tokens is not None]
    return {
        "wall_s": wall,
        "ttft_early_median_ms": median_ttft_ms(turns, 0, half),
        "ttft_late_median_ms": median_ttft_ms(turns, half, work.turns),
        "early_turns": f"1-{half}",
        "late_turns": f"{half + 1}-{work.turns}" if half < work.turns else "none",
        "ttft_median_by_turn_ms": [median_ttft_ms(turns, k, k + 1) for k in range(work.turns)],
        "output_tokens": output,
        "throughput_tok_s": output / wall,
        "prompt_tokens": prompt,
        "cached_tokens": cached,
        "restored_tokens": sum(restored) if restored else None,
        "recomputed_tokens": prompt - cached,
        "cached_fraction": cached / prompt if prompt else 0.0,
        "short_replies": sum(t.output_tokens < work.max_tokens for t in turns),
        "turns_without_text": sum(t.ttft_s is None for t in turns),
        "cpu_steal_percent": steal,
    }


def fmt_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} ms"


def print_summary(label: str, summary: dict[str, Any], counters: dict[str, float] | None) -> None:
    s = summary
    print(f"\n=== agent_bench: {label} ===")
    print(f"wall                 {s['wall_s']:.1f} s")
    if s.get("cpu_steal_percent") is not None:
        print(
            f"cpu steal            {s['cpu_steal_percent']:.1f} % of the machine's CPU time"
            " (VM host contention: compare runs of similar steal)"
        )
    print(
        f"TTFT median          turns {s['early_turns']}: {fmt_ms(s['ttft_early_median_ms'])}"
        f"   turns {s['late_turns']}: {fmt_ms(s['ttft_late_median_ms'])}"
    )
    print("TTFT median by turn  " + "  ".join(fmt_ms(v) for v in s["ttft_median_by_turn_ms"]))
    print(f"generation           {s['output_tokens']} tokens, {s['throughput_tok_s']:.1f} tok/s")
    print(
        f"prompt tokens        {s['prompt_tokens']}, cached {s['cached_tokens']}"
        f" ({100 * s['cached_fraction']:.1f}%), recomputed {s['recomputed_tokens']}"
    )
    if s["restored_tokens"] is not None:
        print(f"restored tokens      {s['restored_tokens']} of the cached, from host / Redis")
    if s["short_replies"] or s["turns_without_text"]:
        print(
            f"note                 {s['short_replies']} replies ended before max_tokens,"
            f" {s['turns_without_text']} had no text"
        )
    if counters is None:
        print("/metrics             not available")
        return
    for key, value in counters.items():
        print(f"/metrics diff        {key} {value:.0f}")


def first_model(base_url: str, api_key: str) -> tuple[str, str]:
    """The id and ``owned_by`` of the first model the server lists."""
    reply = httpx.get(
        base_url + "/v1/models", headers={"Authorization": f"Bearer {api_key}"}, timeout=30
    )
    reply.raise_for_status()
    model = reply.json()["data"][0]
    return str(model["id"]), str(model.get("owned_by", ""))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000", help="without /v1")
    parser.add_argument("--protocol", choices=("http", "ws"), default="http")
    parser.add_argument("--model", default=None, help="default: the first of GET /v1/models")
    parser.add_argument(
        "--api-key", default=None, help="one key for all agents; default: random per run"
    )
    parser.add_argument("--agents", type=int, default=8)
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument("--pause-max-s", type=float, default=2.0)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--system-words", type=int, default=600)
    parser.add_argument("--tool-words", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-ignore-eos", action="store_true", help="do not send ignore_eos")
    parser.add_argument("--label", default=None, help="name in the summary and the JSON")
    parser.add_argument("--json-out", default=None, help="also write the results here")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    base_url = args.base_url.rstrip("/").removesuffix("/v1")
    api_key = args.api_key or f"bench-{os.urandom(4).hex()}"
    model, owned_by = first_model(base_url, api_key)
    cache_salt = api_key if owned_by == "vllm" else None
    target = Target(base_url, args.model or model, api_key, cache_salt)
    work = Workload(
        agents=args.agents,
        turns=args.turns,
        max_tokens=args.max_tokens,
        pause_max_s=args.pause_max_s,
        system_words=args.system_words,
        tool_words=args.tool_words,
        seed=args.seed,
        ignore_eos=not args.no_ignore_eos,
    )
    label = args.label or f"{args.protocol} {base_url} ({target.model})"
    print(
        f"{label}: {work.agents} agents x {work.turns} turns, system ~{work.system_words} words,"
        f" tool results ~{work.tool_words} words, {work.max_tokens} output tokens"
        f" (ignore_eos {work.ignore_eos}), pauses U(0, {work.pause_max_s}) s, seed {work.seed},"
        f" key {api_key}" + (f", cache_salt {cache_salt}" if cache_salt else ""),
        flush=True,
    )
    warm_up(target)
    before = scrape_counters(base_url, api_key)
    ticks_before = cpu_ticks()
    turns, wall = run_agents(target, work, args.protocol)
    steal = steal_percent(ticks_before, cpu_ticks())
    after = scrape_counters(base_url, api_key)
    counters = diff_counters(before, after) if before is not None and after is not None else None
    summary = summarise(turns, wall, work, steal)
    print_summary(label, summary, counters)
    if args.json_out:
        result = {
            "label": label,
            "protocol": args.protocol,
            "base_url": base_url,
            "model": target.model,
            "api_key": api_key,
            "cache_salt": cache_salt,
            "workload": asdict(work),
            "summary": summary,
            "metrics_diff": counters,
            "turns": [asdict(t) for t in turns],
        }
        with open(args.json_out, "w") as out:
            json.dump(result, out, indent=1)
        print(f"wrote {args.json_out}")


if __name__ == "__main__":
    main()
