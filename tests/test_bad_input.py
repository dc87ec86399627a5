"""Bad input gets a clear error, changes nothing, and the engine keeps serving others."""

from __future__ import annotations

import json

import httpx
import msgpack
import pytest
import redis

from api.server import ServeOptions
from engine.config import EngineConfig
from engine.errors import InvalidRequestError, ModelLoadError
from engine.llm_engine import LLMEngine
from engine.model_loader import load_model
from engine.sampling_params import SamplingParams
from sessions.redis_keys import session_record_key
from tests.api_helpers import ProtocolClient, live_server
from tests.helpers import make_engine

BAD_PARAMS = [
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": -5}, "max_tokens"),
    ({"temperature": -1.0}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -3}, "top_k"),
    ({"min_p": 2.0}, "min_p"),
    ({"logprobs": 99}, "logprobs"),
    ({"min_tokens": 50, "max_tokens": 10}, "min_tokens"),
    ({"stop": [""]}, "stop"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"seed": 2**64}, "seed"),
    ({"seed": -1}, "seed"),
]


@pytest.fixture(scope="module")
def engine(tiny_model_dirs):
    return make_engine(tiny_model_dirs["llama"], max_model_len=64)


def test_bad_requests_fail_cleanly_while_a_good_one_runs(engine):
    engine.add_request("good", [5, 6, 7], SamplingParams(temperature=0.0, max_tokens=8))
    engine.step()
    for kwargs, field in BAD_PARAMS:
        with pytest.raises(InvalidRequestError, match=field):
            engine.add_request(f"bad-{field}", [1, 2, 3], SamplingParams(**kwargs))
    with pytest.raises(InvalidRequestError, match="empty"):
        engine.add_request("empty", [], SamplingParams())
    with pytest.raises(InvalidRequestError, match="empty"):
        engine.add_request("empty-text", "", SamplingParams())
    with pytest.raises(InvalidRequestError, match="context limit"):
        engine.add_request("long", list(range(100, 164)), SamplingParams())
    with pytest.raises(InvalidRequestError, match="token ids"):
        engine.add_request("vocab", [10**9], SamplingParams())
    with pytest.raises(InvalidRequestError, match="already in use"):
        engine.add_request("good", [1], SamplingParams())
    engine.check_integrity()
    assert [r.request_id for r in engine.scheduler.running] == ["good"]
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    assert sum(len(o.new_token_ids) for o in outputs) + 1 >= 8
    assert outputs[-1].finished


def test_generation_stops_at_the_context_limit(engine):
    out = engine.generate(
        [list(range(100, 160))], SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True)
    )[0]
    assert out.finish_reason == "length"
    assert out.num_output_tokens == 4  # 60 prompt tokens + 4 = max_model_len 64


def test_unknown_model_path_names_what_was_tried(tmp_path):
    with pytest.raises(ModelLoadError) as info:
        load_model(str(tmp_path / "missing-model"))
    message = str(info.value)
    assert "local directory" in message and "GGUF file" in message and "hub id" in message
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(empty_dir))
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        load_model(None, dtype="int3")


def test_bad_engine_config_is_rejected(smollm2):
    with pytest.raises(ValueError, match="block_size"):
        LLMEngine(smollm2, EngineConfig(block_size=7))
    with pytest.raises(ValueError, match="num_kv_blocks"):
        LLMEngine(smollm2, EngineConfig(num_kv_blocks=0))


def test_memory_budget_in_bytes_sizes_the_pool(smollm2):
    per_block = 2 * 30 * 16 * 3 * 64 * 4  # layers, block size, kv heads, head dim, fp32
    engine = LLMEngine(smollm2, EngineConfig(kv_cache_bytes=per_block * 40 + 5))
    assert engine.kv_manager.pool.num_blocks == 40
    assert engine.max_model_len == 40 * 16


# -- the served API (issue 14, item 10): typed errors, never a 500 or a poisoned session --------

KEY = "bad-input-key"


def _tool(parameter: dict) -> dict:
    """A function tool ``f`` with one required parameter ``x`` of schema ``parameter``."""
    parameters = {"type": "object", "properties": {"x": parameter}, "required": ["x"]}
    return {"type": "function", "function": {"name": "f", "parameters": parameters}}


def _json_schema(schema: dict) -> dict:
    return {
        "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
    }


HTTP_BAD_BODIES = [
    ({"seed": 2**64}, "seed"),
    ({"seed": -1}, "seed"),
    ({"stream": True, "stream_options": 5}, "stream_options"),
    ({"messages": [{"role": "assistant", "content": "", "tool_calls": "zzz"}]}, "tool_calls"),
    ({"tools": [{"type": "python"}], "tool_choice": 123}, "tool_choice"),
    # issue 13, item 4: tool_choice and schemas that cannot be honoured
    ({"tools": [{"type": "python"}], "tool_choice": {"function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [], "tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice"),
    (
        {"tools": [_tool({"type": "string", "pattern": "(ab"})], "tool_choice": "required"},
        "pattern",
    ),
    ({"tools": [_tool({"type": "wat"})], "tool_choice": "f"}, "tool_choice"),
    ({"tools": [_tool({"type": "string", "minLength": 10**6})], "tool_choice": "f"}, "minLength"),
    ({"tools": [_tool({"$ref": "https://example.com/s.json"})], "tool_choice": "f"}, "$ref"),
    ({"response_format": "json"}, "response_format"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": 5}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": []}}}, "schema"),
    (_json_schema({"type": "string", "pattern": "[z-a]"}), "response_format"),
    (_json_schema({"type": "object", "properties": {"a": False}, "required": ["a"]}), "schema"),
    (_json_schema({"$ref": "#/$defs/missing"}), "$ref"),
]


@pytest.fixture(scope="module")
def server(smollm2, redis_server):
    options = ServeOptions(redis_url=redis_server, api_keys=(KEY,))
    with live_server(smollm2, options) as running:
        yield running


def _chat(base_url: str, body: bytes | dict) -> httpx.Response:
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(
        base_url + "/v1/chat/completions", content=content, headers=headers, timeout=60
    )


def _assert_openai_error(reply: httpx.Response, status: int = 400) -> dict:
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == "invalid_request_error"
    return error


def test_http_bad_values_get_typed_400s(server):
    base_url, _ = server
    for overrides, name in HTTP_BAD_BODIES:
        body = {"model": "tarry", "messages": [{"role": "user", "content": "Hi"}], **overrides}
        error = _assert_openai_error(_chat(base_url, body))
        assert name in error["message"] or error["param"] == name or "64 bits" in error["message"]
    surrogate = b'{"model": "tarry", "messages": [{"role": "user", "content": "a\\ud800b"}]}'
    assert "surrogate" in _assert_openai_error(_chat(base_url, surrogate))["message"]
    deep = b'{"model": "tarry", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    assert "deep" in _assert_openai_error(_chat(base_url, deep))["message"]
    completion = httpx.post(
        base_url + "/v1/completions",
        json={"prompt": "Hi", "seed": 2**64, "max_tokens": 2},
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=60,
    )
    assert "64 bits" in _assert_openai_error(completion)["message"]
    good = _chat(base_url, {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
    assert good.status_code == 200


def test_forced_tool_with_a_pattern_follows_it(server):
    """pydantic ``Field(pattern=...)`` in a forced tool's schema (it used to be a 500)."""
    from pydantic import BaseModel, Field

    class Booking(BaseModel):
        code: str = Field(pattern=r"^[A-Z]{3}-\d{4}$")

    tool = {
        "type": "function",
        "function": {"name": "f", "parameters": Booking.model_json_schema()},
    }
    body = {
        "messages": [{"role": "user", "content": "Book flight ABC-1234."}],
        "tools": [tool],
        "tool_choice": "required",
        "temperature": 0,
        "max_tokens": 60,
    }
    reply = _chat(server[0], body)
    assert reply.status_code == 200, reply.text
    (call,) = reply.json()["choices"][0]["message"]["tool_calls"]
    Booking.model_validate_json(call["function"]["arguments"])


def test_websocket_bad_seed_and_lone_surrogate_leave_the_session_usable(server, redis_server):
    base_url, state = server
    ws = ProtocolClient(base_url, KEY)
    try:
        session_id = ws.create_session("Be terse.")["id"]
        ws.user("What is the capital of France?")
        for seed in (2**64, -1):
            ws.send({"type": "response.create", "event_id": "s", "response": {"seed": seed}})
            event = ws.recv()
            assert event["type"] == "error" and event["error"]["event_id"] == "s", event
            message = event["error"]["message"]
            assert "seed" in message or "64 bits" in message, event
        for bad in ({"seed": 2**64}, {"max_output_tokens": 10**30}, {"tool_choice": 123}):
            ws.send({"type": "session.update", "session": bad})  # a default is refused at once
            assert ws.recv()["type"] == "error", bad
        lone = '{"type":"conversation.item.create","item":{"type":"message","role":"user",'
        ws.send_raw(lone + '"content":"a\\ud800b"}}')
        error = ws.recv()["error"]
        assert error["code"] == "invalid_event" and "surrogate" in error["message"]
        ws.send_raw("[" * 100_000 + "]" * 100_000)
        assert ws.recv()["error"]["code"] == "invalid_frame"
        ws.send_raw('{"type":"session.update","session":{"instructions":"\\udfff"}}')
        assert ws.recv()["error"]["code"] == "invalid_event"
        text, done = ws.respond(temperature=0, max_output_tokens=20)
        assert "Paris" in text and done["status"] == "completed"
        # The record is written and readable (Redis), the REST view answers.
        raw = redis.Redis.from_url(redis_server).get(session_record_key("tarry", session_id))
        assert raw is not None and len(msgpack.unpackb(raw)["messages"]) == 3
        rest = httpx.get(
            f"{base_url}/v1/sessions/{session_id}",
            headers={"Authorization": f"Bearer {KEY}"},
            timeout=30,
        )
        assert rest.status_code == 200
        ws.user("And of Italy?")
        text, done = ws.respond(temperature=0, max_output_tokens=20)
        assert done["status"] == "completed"
    finally:
        ws.close()
    state.sessions.check_integrity()
