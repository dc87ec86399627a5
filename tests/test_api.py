"""The API against real clients: the official openai client and a websockets client."""

from __future__ import annotations

import contextlib
import json
import time

import openai
import pytest

from api.server import ServeOptions
from api.state import Limits
from tests.api_helpers import ProtocolClient, live_server

KEY_A, KEY_B = "key-alice", "key-bob"
FRANCE = "What is the capital of France? Answer in one sentence."


@pytest.fixture(scope="module")
def server(smollm2, redis_server):
    limits = Limits(max_frame_bytes=64 * 1024, max_events_per_second=50, max_output_tokens=256)
    options = ServeOptions(redis_url=redis_server, api_keys=(KEY_A, KEY_B), limits=limits)
    with live_server(smollm2, options) as running:
        yield running


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY_A)


def test_openai_chat_completion_and_stream_agree(client):
    messages = [{"role": "user", "content": FRANCE}]
    plain = client.chat.completions.create(model="tarry", messages=messages, temperature=0)
    assert "Paris" in plain.choices[0].message.content
    assert plain.choices[0].finish_reason == "stop"
    assert plain.usage.prompt_tokens_details.cached_tokens >= 0
    chunks = list(
        client.chat.completions.create(
            model="tarry",
            messages=messages,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == plain.choices[0].message.content
    usage = chunks[-1].usage
    assert usage.completion_tokens == plain.usage.completion_tokens
    # The identical prompt was just computed: its full blocks come from the prefix cache.
    assert usage.prompt_tokens_details.cached_tokens >= usage.prompt_tokens // 16 * 16 - 16


def test_openai_completions_models_logprobs_and_seed(client):
    listed = client.models.list()
    assert [m.id for m in listed.data] == ["SmolLM2-135M-Instruct"]
    text = client.completions.create(
        model="tarry", prompt="The capital of France is", max_tokens=5, temperature=0
    )
    assert text.choices[0].text and text.usage.completion_tokens == 5
    with_lp = client.chat.completions.create(
        model="tarry",
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=3,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    entries = with_lp.choices[0].logprobs.content
    assert len(entries) == 3 and all(len(e.top_logprobs) == 2 for e in entries)
    runs = [
        client.chat.completions.create(
            model="tarry",
            messages=[{"role": "user", "content": "Tell me a story."}],
            max_tokens=8,
            seed=5,
            temperature=1.0,
        )
        .choices[0]
        .message.content
        for _ in range(2)
    ]
    assert runs[0] == runs[1]


def test_openai_errors_are_typed(server):
    bad_key = openai.OpenAI(base_url=server[0] + "/v1", api_key="wrong")
    with pytest.raises(openai.AuthenticationError):
        bad_key.models.list()
    good = openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY_A)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        good.chat.completions.create(
            model="tarry", messages=[{"role": "user", "content": "x"}], temperature=-1
        )
    with pytest.raises(openai.BadRequestError, match="messages"):
        good.chat.completions.create(model="tarry", messages=[])


def test_websocket_multi_turn_reuses_kv_and_matches_fresh_http(server, client):
    ws = ProtocolClient(server[0], KEY_A)
    try:
        info = ws.create_session("You are a helpful assistant.")
        assert info["id"].startswith("sess_") and info["resume_token"]
        ws.user(FRANCE)
        first_text, first = ws.respond(temperature=0, max_output_tokens=40)
        assert "Paris" in first_text and first["status"] == "completed"
        first_context = first["usage"]["input_tokens"] + first["usage"]["output_tokens"]
        ws.user("And what is the capital of Italy?")
        second_text, second = ws.respond(temperature=0, max_output_tokens=40)
        assert second["usage"]["input_token_details"]["cached_tokens"] >= first_context // 16 * 16
        fresh = client.chat.completions.create(
            model="tarry",
            temperature=0,
            max_tokens=40,
            messages=[
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": FRANCE},
                {"role": "assistant", "content": first_text},
                {"role": "user", "content": "And what is the capital of Italy?"},
            ],
        )
        assert fresh.choices[0].message.content == second_text
    finally:
        ws.close()


def test_msgpack_frames(server):
    ws = ProtocolClient(server[0], KEY_A, binary=True)
    try:
        ws.create_session()
        ws.user(FRANCE)
        text, done = ws.respond(temperature=0, max_output_tokens=20)
        assert "Paris" in text and done["status"] == "completed"
    finally:
        ws.close()


def test_disconnect_mid_stream_then_resume(server):
    ws = ProtocolClient(server[0], KEY_A)
    info = ws.create_session()
    ws.user("Write a long story about a dragon.")
    ws.send({"type": "response.create", "response": {"max_output_tokens": 200, "temperature": 0}})
    deltas = 0
    while deltas < 3:
        if ws.recv()["type"] == "response.output_text.delta":
            deltas += 1
    ws.close()  # dropped mid-stream: the response is cancelled, the session pauses
    time.sleep(0.5)
    again = ProtocolClient(server[0], KEY_A)
    try:
        again.send(
            {
                "type": "session.resume",
                "session_id": info["id"],
                "resume_token": info["resume_token"],
            }
        )
        resumed = again.recv()
        assert resumed["type"] == "session.resumed"
        assert resumed["session"]["num_items"] == 1  # the cancelled turn left no half message
        text, done = again.respond(max_output_tokens=10, temperature=0)
        assert done["status"] == "incomplete" and text
    finally:
        again.close()
    other_key = ProtocolClient(server[0], KEY_B)
    try:
        other_key.send(
            {
                "type": "session.resume",
                "session_id": info["id"],
                "resume_token": info["resume_token"],
            }
        )
        event = other_key.recv()
        assert event["type"] == "error" and event["error"]["code"] == "session_not_found"
    finally:
        other_key.close()


def test_bad_input_gets_typed_errors_and_state_survives(server):
    ws = ProtocolClient(server[0], KEY_A)
    bystander = ProtocolClient(server[0], KEY_B)
    try:
        ws.send_raw("{not json")
        assert ws.recv()["error"]["code"] == "invalid_frame"
        ws.send({"type": "session.create", "session": {}})
        assert ws.recv()["type"] == "session.created"
        ws.send({"type": "no.such.event", "event_id": "e1"})
        error = ws.recv()["error"]
        assert error["code"] == "unknown_event" and error["event_id"] == "e1"
        ws.send({"type": "response.create", "response": {"temperature": "hot"}})
        assert ws.recv()["error"]["code"] == "invalid_event"
        ws.send(
            {
                "type": "conversation.item.create",
                "item": {"type": "message", "role": "user", "content": 7},
            }
        )
        assert ws.recv()["error"]["code"] == "invalid_event"
        ws.send_raw(b"\xc1\xff garbage")
        assert ws.recv()["error"]["code"] == "invalid_frame"
        ws.user("Count to fifty.")
        ws.send({"type": "response.create", "response": {"max_output_tokens": 100}})
        ws.send({"type": "response.create", "response": {}})
        events = ws.recv_until("response.done")
        codes = [e["error"]["code"] for e in events if e["type"] == "error"]
        assert codes == ["conversation_already_has_active_response"]
        ws.recv()  # session.state
        with contextlib.suppress(Exception):  # the server may close (4008) mid-burst
            for _ in range(300):  # a burst far over the events per second allowed
                ws.send({"type": "no.such.event"})
        codes = set()
        try:
            for _ in range(300):
                codes.add(ws.recv(timeout=10)["error"]["code"])
        except Exception:
            pass  # closed with 4008 after the sustained burst
        assert "rate_limited" in codes
        bystander.create_session()
        bystander.user(FRANCE)
        text, done = bystander.respond(temperature=0, max_output_tokens=20)
        assert "Paris" in text
    finally:
        ws.close()
        bystander.close()


def test_health_metrics_and_sessions_rest(server):
    import httpx

    base, state = server
    assert httpx.get(base + "/health").json()["status"] == "ok"
    metrics = httpx.get(base + "/metrics").text
    assert "tarry_time_to_first_token_seconds_bucket" in metrics
    assert 'tarry_tier_up{tier="redis"} 1.0' in metrics
    ws = ProtocolClient(base, KEY_A)
    try:
        info = ws.create_session()
    finally:
        ws.close()
    headers_a = {"Authorization": f"Bearer {KEY_A}"}
    headers_b = {"Authorization": f"Bearer {KEY_B}"}
    ids = [s["id"] for s in httpx.get(base + "/v1/sessions", headers=headers_a).json()["data"]]
    assert info["id"] in ids
    assert httpx.get(base + f"/v1/sessions/{info['id']}", headers=headers_b).status_code == 404
    assert httpx.get(base + f"/v1/sessions/{info['id']}", headers=headers_a).status_code == 200
    assert httpx.delete(base + f"/v1/sessions/{info['id']}", headers=headers_a).json()["deleted"]
    assert httpx.get(base + f"/v1/sessions/{info['id']}", headers=headers_a).status_code == 404


def test_chat_completion_bound_to_a_session_by_header(server, client):
    ws = ProtocolClient(server[0], KEY_A)
    try:
        info = ws.create_session("You are a helpful assistant.")
    finally:
        ws.close()
    headers = {"X-Tarry-Session-Id": info["id"]}
    first = client.chat.completions.create(
        model="tarry",
        temperature=0,
        max_tokens=30,
        extra_headers=headers,
        messages=[{"role": "user", "content": FRANCE}],
    )
    assert "Paris" in first.choices[0].message.content
    second = client.chat.completions.create(
        model="tarry",
        temperature=0,
        max_tokens=30,
        extra_headers=headers,
        messages=[{"role": "user", "content": "And of Italy?"}],
    )  # only the new message
    context = first.usage.prompt_tokens + first.usage.completion_tokens
    assert second.usage.prompt_tokens_details.cached_tokens >= context // 16 * 16
    assert second.usage.prompt_tokens > context
    other = openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY_B)
    with pytest.raises(openai.NotFoundError):
        other.chat.completions.create(
            model="tarry", extra_headers=headers, messages=[{"role": "user", "content": "hi"}]
        )


def test_session_update_fork_truncate_and_prefill_only(server):
    ws = ProtocolClient(server[0], KEY_A)
    try:
        ws.create_session("You are terse.")
        ws.send(
            {
                "type": "session.update",
                "session": {"instructions": "You are verbose.", "temperature": 0},
            }
        )
        updated = ws.recv()
        assert updated["type"] == "session.updated" and updated["session"]["num_items"] == 1
        ws.user(FRANCE)
        ws.send({"type": "response.create", "response": {"generate": False}})
        events = ws.recv_until("response.done")
        assert not [e for e in events if e["type"] == "response.output_text.delta"]
        prefilled = events[-1]["response"]["usage"]["input_tokens"]
        ws.recv()  # session.state
        text, done = ws.respond(max_output_tokens=20)
        assert done["usage"]["input_token_details"]["cached_tokens"] >= prefilled // 16 * 16 - 16
        ws.send({"type": "session.fork"})
        forked = ws.recv()
        assert forked["type"] == "session.forked" and forked["session"]["resume_token"]
        assert forked["session"]["num_items"] == 3
        ws.send({"type": "conversation.item.truncate", "count": 2})
        truncated = ws.recv()
        assert truncated["type"] == "conversation.item.truncated" and truncated["num_items"] == 1
        ws.send({"type": "session.close"})
        assert ws.recv()["type"] == "session.closed"
        ws.send({"type": "response.create", "response": {}})
        assert ws.recv()["error"]["code"] == "no_session"
    finally:
        ws.close()
    child = ProtocolClient(server[0], KEY_A)
    try:
        child.send(
            {
                "type": "session.resume",
                "session_id": forked["session"]["id"],
                "resume_token": forked["session"]["resume_token"],
            }
        )
        assert child.recv()["session"]["num_items"] == 3
        child.user("And Germany?")
        text, done = child.respond(max_output_tokens=10)
        assert done["usage"]["input_token_details"]["cached_tokens"] >= 32
    finally:
        child.close()


def test_response_cancel_and_browser_subprotocol_auth(server):
    from websockets.sync.client import connect

    url = server[0].replace("http://", "ws://") + "/v1/sessions"
    with connect(url, subprotocols=[f"tarry.auth.{KEY_A}"]) as ws:  # type: ignore[list-item]
        ws.send(json.dumps({"type": "session.create", "session": {}}))
        assert json.loads(ws.recv(timeout=30))["type"] == "session.created"
        ws.send(
            json.dumps(
                {
                    "type": "conversation.item.create",
                    "item": {"type": "message", "role": "user", "content": "Write a long poem."},
                }
            )
        )
        ws.recv(timeout=30)
        ws.send(json.dumps({"type": "response.create", "response": {"max_output_tokens": 200}}))
        while json.loads(ws.recv(timeout=60))["type"] != "response.output_text.delta":
            pass
        ws.send(json.dumps({"type": "response.cancel"}))
        while (event := json.loads(ws.recv(timeout=60)))["type"] != "response.done":
            pass
        assert event["response"]["status"] == "cancelled"
        ws.send(json.dumps({"type": "response.cancel", "event_id": "c2"}))
        while (event := json.loads(ws.recv(timeout=60)))["type"] != "error":
            pass
        assert event["error"]["code"] == "no_active_response"
    from websockets.exceptions import ConnectionClosed

    wrong = ["tarry.auth.wrong"]
    with connect(url, subprotocols=wrong) as ws, pytest.raises(ConnectionClosed) as closed:  # type: ignore[arg-type]
        ws.recv(timeout=30)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4001
    oversized = ProtocolClient(server[0], KEY_A)  # a frame over max_frame_bytes: close 1009
    oversized.send_raw("x" * (64 * 1024 + 1))
    with pytest.raises(ConnectionClosed) as closed:
        oversized.recv(timeout=30)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
