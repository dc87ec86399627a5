"""The agent workload's text and the server counters that the agent benchmark diffs.

Pure functions, no I/O except ``scrape_counters``. Every text is deterministic in
``(seed, agent, turn)`` so that two runs (or two servers) see the same prompts.
"""

from __future__ import annotations

import random
import re

import httpx

WORDS_TEXT = (
    "agent build cache check commit config deploy engine error event file function index "
    "input kernel layer limit log memory merge metric model module output parser patch path "
    "plan process queue record request result retry route schema server service session "
    "shard signal source stack state step store stream table task test thread token tool "
    "trace update value worker branch buffer client cluster column driver frame handle "
    "header image job key lease lock loop node option page pool port query range region "
    "report scope script slot socket span status target timer topic type user version "
    "window zone alpha beta careful clear correct direct exact final fresh local main "
    "minor new old open quick ready short small stable strict valid warm"
)
WORDS = WORDS_TEXT.split()

# Counters worth diffing, by metric name (labels kept): Tarry's and vLLM's cache accounting.
COUNTERS = (
    "tarry_prompt_tokens_total",
    "tarry_completion_tokens_total",
    "tarry_prompt_tokens_cached_total",
    "tarry_prompt_tokens_computed_total",
    "vllm:prompt_tokens_total",
    "vllm:generation_tokens_total",
    "vllm:prefix_cache_queries_total",
    "vllm:prefix_cache_hits_total",
)
SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def words(rng: random.Random, num_words: int) -> str:
    """``num_words`` words as sentences of 6-14 words, each capitalised and ended by a period."""
    sentences, left = [], num_words
    while left > 0:
        size = min(left, rng.randint(6, 14))
        picked = [rng.choice(WORDS) for _ in range(size)]
        sentences.append(" ".join(picked).capitalize() + ".")
        left -= size
    return " ".join(sentences)


def system_prompt(num_words: int, seed: int) -> str:
    """The agents' shared system prompt (one agent framework, one prompt), ~``num_words``."""
    rng = random.Random(f"system:{seed}")
    head = "You are a software agent. Follow these rules when you use tools. "
    return head + words(rng, num_words)


def task_message(agent: int, seed: int) -> str:
    """The short first user message, distinct per agent."""
    rng = random.Random(f"task:{seed}:{agent}")
    return f"Task {agent}: " + words(rng, 30) + " Start by calling a tool."


def tool_result(agent: int, turn: int, num_words: int, seed: int) -> str:
    """The ~``num_words`` tool output appended after the reply of ``turn`` (0-based)."""
    rng = random.Random(f"tool:{seed}:{agent}:{turn}")
    return f"Tool result (agent {agent}, call {turn + 1}):\n" + words(rng, num_words)


def pause_rng(agent: int, seed: int) -> random.Random:
    """The per-agent generator of tool pauses (independent of thread scheduling)."""
    return random.Random(f"pause:{seed}:{agent}")


def parse_counters(text: str) -> dict[str, float]:
    """Prometheus text -> ``{"name{labels}": value}`` for the names in ``COUNTERS``."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        match = SAMPLE.match(line)
        if match and match.group(1) in COUNTERS:
            labels = re.sub(r',?model_name="[^"]*"', "", match.group(2) or "").replace("{,", "{")
            key = match.group(1) + ("" if labels in ("", "{}") else labels)
            values[key] = values.get(key, 0.0) + float(match.group(3))
    return values


def scrape_counters(base_url: str, api_key: str) -> dict[str, float] | None:
    """The server's ``/metrics`` counters, or None when it has no such endpoint."""
    try:
        reply = httpx.get(
            base_url + "/metrics", headers={"Authorization": f"Bearer {api_key}"}, timeout=10
        )
    except httpx.HTTPError:
        return None
    return parse_counters(reply.text) if reply.status_code == 200 else None


def diff_counters(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """``after - before`` for every counter of ``after`` (a counter new in ``after`` from 0)."""
    return {key: after[key] - before.get(key, 0.0) for key in sorted(after)}
