"""``/metrics`` counts every surface (HTTP chat and completions, the session WebSocket, the
Responses WebSocket) at the engine's one output path, restores per tier (host vs Redis, with a
real redis-server), misses, latency histograms and engine gauges; ``POST /v1/sessions`` opens
a session usable by chat completions (header) and by the WebSocket's ``session.resume``."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.sync.client import connect

from api.server import ServeOptions
from tests.api_helpers import ProtocolClient, live_server
from tests.helpers import mixed_prompts

KEY = "key-metrics"
NUM_BLOCKS = 14  # room for one ~180-token request: the next one evicts the previous one's


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(base_url: str) -> Samples:
    text = httpx.get(base_url + "/metrics", timeout=10).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def moved(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


@pytest.fixture(scope="module")
def host_and_redis(smollm2, redis_server):
    options = ServeOptions(redis_url=redis_server, api_keys=(KEY,))
    with live_server(smollm2, options, num_kv_blocks=NUM_BLOCKS) as running:
        yield running


@pytest.fixture(scope="module")
def redis_only(smollm2, redis_server):
    options = ServeOptions(redis_url=redis_server, api_keys=(KEY,), host_kv_bytes=0)
    with live_server(smollm2, options, num_kv_blocks=NUM_BLOCKS) as running:
        yield running


def evict_and_restore(base_url: str, seed: int) -> int:
    """Complete prompt P, then E (its blocks evict P's: written back to the tiers), then P
    again (restored); the cached tokens of the last answer."""
    client = openai.OpenAI(base_url=base_url + "/v1", api_key=KEY)
    first, evictor = mixed_prompts(seed, 2, 170, 180)
    for prompt in (first, evictor, first):
        result = client.completions.create(
            model="tarry", prompt=prompt, max_tokens=4, temperature=0
        )
    assert result.usage.prompt_tokens_details is not None
    return result.usage.prompt_tokens_details.cached_tokens


def test_restores_are_counted_per_tier(host_and_redis, redis_only):
    for (base_url, _), seed, tier, other in (
        (host_and_redis, 31, "host", "redis"),
        (redis_only, 32, "redis", "host"),
    ):
        before = scrape(base_url)
        cached = evict_and_restore(base_url, seed)
        after = scrape(base_url)
        restored = moved(before, after, "tarry_prompt_tokens_cached_total", tier=tier)
        assert cached > 0 and 0 < restored <= cached
        assert moved(before, after, "tarry_prompt_tokens_cached_total", tier=other) == 0
        assert value(after, "tarry_tier_up", tier="redis") == 1.0
        parts = sum(
            moved(before, after, "tarry_prompt_tokens_cached_total", tier=t)
            for t in ("device", "host", "redis")
        ) + moved(before, after, "tarry_prompt_tokens_computed_total")
        assert parts == moved(before, after, "tarry_prompt_tokens_total")
        assert moved(before, after, "tarry_requests_total", endpoint="completions", status="200")
        assert moved(before, after, "tarry_prompt_tokens_computed_total") > 2 * 170  # P and E
    assert value(scrape(host_and_redis[0]), "tarry_tier_up", tier="host") == 1.0
    assert ("tarry_tier_up", (("tier", "host"),)) not in scrape(redis_only[0])


def test_every_surface_is_counted_with_its_label(host_and_redis):
    base_url, _ = host_and_redis
    before = scrape(base_url)
    client = openai.OpenAI(base_url=base_url + "/v1", api_key=KEY)
    chat = client.chat.completions.create(
        model="tarry", messages=[{"role": "user", "content": "Hi!"}], max_tokens=6, temperature=0
    )
    ws = ProtocolClient(base_url, KEY)
    try:
        ws.create_session("You are terse.")
        ws.user("What is the capital of France?")
        ws.respond(max_output_tokens=6, temperature=0)
    finally:
        ws.close()
    url = base_url.replace("http://", "ws://") + "/v1/responses"
    with connect(url, additional_headers={"Authorization": f"Bearer {KEY}"}) as responses:
        create = {"type": "response.create", "model": "tarry", "input": "Hello", "temperature": 0}
        responses.send(json.dumps({**create, "max_output_tokens": 6}))
        ends = ("response.completed", "response.incomplete", "error")
        while (event := json.loads(responses.recv(timeout=120)))["type"] not in ends:
            pass
        assert event["type"] == "response.incomplete", event  # at max_output_tokens
    refused = httpx.post(
        base_url + "/v1/completions",
        headers={"Authorization": f"Bearer {KEY}"},
        json={"model": "tarry", "prompt": {"not": "a prompt"}},
    )
    assert refused.status_code == 400
    after = scrape(base_url)
    for endpoint in ("chat", "session_ws", "responses_ws"):
        assert moved(before, after, "tarry_requests_total", endpoint=endpoint, status="200") == 1
    assert moved(before, after, "tarry_requests_total", endpoint="completions", status="400") == 1
    assert moved(before, after, "tarry_time_to_first_token_seconds_count") == 3
    assert moved(before, after, "tarry_e2e_request_latency_seconds_count") == 3
    # every token after a sequence's first has an inter-token gap
    generated = moved(before, after, "tarry_completion_tokens_total")
    assert generated >= chat.usage.completion_tokens + 2
    assert moved(before, after, "tarry_inter_token_latency_seconds_count") == generated - 3
    assert value(after, "tarry_requests_running") == 0 == value(after, "tarry_requests_waiting")
    assert value(after, "tarry_kv_pool_usage") >= 0
    assert not any("KVStore" in labels for _, labels in after if labels)


def test_post_sessions_opens_a_session_for_chat_and_websocket_resume(host_and_redis):
    base_url, _ = host_and_redis
    headers = {"Authorization": f"Bearer {KEY}"}
    opened = httpx.post(
        base_url + "/v1/sessions",
        headers=headers,
        json={"instructions": "You are a helpful assistant.", "temperature": 0},
    )
    assert opened.status_code == 200, opened.text
    info = opened.json()
    assert info["object"] == "session" and info["num_items"] == 1 and info["resume_token"]
    listed = httpx.get(base_url + "/v1/sessions", headers=headers).json()["data"]
    assert info["id"] in [s["id"] for s in listed]
    client = openai.OpenAI(base_url=base_url + "/v1", api_key=KEY)
    answer = client.chat.completions.create(
        model="tarry",
        temperature=0,
        max_tokens=12,
        extra_headers={"X-Tarry-Session-Id": info["id"]},
        messages=[{"role": "user", "content": "What is the capital of France?"}],
    )
    assert "Paris" in (answer.choices[0].message.content or "")
    ws = ProtocolClient(base_url, KEY)
    try:
        ws.send({"type": "session.resume", "session_id": info["id"], "resume_token": "wrong"})
        assert ws.recv()["type"] == "error"
        ws.send(
            {
                "type": "session.resume",
                "session_id": info["id"],
                "resume_token": info["resume_token"],
            }
        )
        resumed = ws.recv()
        assert resumed["type"] == "session.resumed", resumed
        assert resumed["session"]["num_items"] == 3  # instructions, question, answer
        ws.user("And of Italy?")
        text, done = ws.respond(max_output_tokens=12)  # temperature 0: the session default
        assert text and done["status"] == "completed"
        context = answer.usage.prompt_tokens + answer.usage.completion_tokens
        # the history the HTTP turn left is reused, not recomputed
        assert done["usage"]["input_token_details"]["cached_tokens"] >= context // 16 * 16 - 16
    finally:
        ws.close()
    for bad in ({"temperature": "hot"}, {"surprise": 1}, {"seed": -1}):
        refused = httpx.post(base_url + "/v1/sessions", headers=headers, json=bad)
        assert refused.status_code == 400 and refused.json()["error"]["message"]
    assert httpx.post(base_url + "/v1/sessions", json={}).status_code == 401
