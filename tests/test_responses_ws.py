"""Responses API WebSocket mode: the OpenAI Agents SDK and a raw client with
previous_response_id."""

from __future__ import annotations

import asyncio
import json

import pytest
from websockets.sync.client import connect

from api.server import ServeOptions
from tests.api_helpers import live_server

KEY = "key-agents"


@pytest.fixture(scope="module")
def server(smollm2):
    with live_server(smollm2, ServeOptions(api_keys=(KEY,))) as running:
        yield running


def test_agents_sdk_runs_over_the_responses_websocket(server):
    from agents import Agent, ModelSettings, RunConfig, Runner, set_tracing_disabled
    from agents.models.openai_provider import OpenAIProvider

    set_tracing_disabled(True)
    provider = OpenAIProvider(api_key=KEY, base_url=server[0] + "/v1", use_responses_websocket=True)
    agent = Agent(
        name="geo",
        instructions="Answer in one sentence.",
        model="tarry",
        model_settings=ModelSettings(temperature=0),
    )
    result = asyncio.run(
        Runner.run(
            agent, "What is the capital of France?", run_config=RunConfig(model_provider=provider)
        )
    )
    assert "Paris" in result.final_output
    assert result.raw_responses[-1].usage.output_tokens > 0


def _events_until_done(ws):
    events = []
    while True:
        event = json.loads(ws.recv(timeout=120))
        events.append(event)
        if event["type"] in ("response.completed", "response.incomplete", "error"):
            return events


def test_previous_response_id_continues_from_kept_kv(server):
    url = server[0].replace("http://", "ws://") + "/v1/responses"
    with connect(url, additional_headers={"Authorization": f"Bearer {KEY}"}) as ws:
        ws.send(
            json.dumps(
                {
                    "type": "response.create",
                    "model": "tarry",
                    "temperature": 0,
                    "instructions": "You are a helpful assistant.",
                    "input": "What is the capital of France?",
                }
            )
        )
        first = _events_until_done(ws)
        kinds = [e["type"] for e in first]
        assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
        assert "response.output_text.delta" in kinds and "response.output_item.done" in kinds
        assert [e["sequence_number"] for e in first] == list(range(len(first)))
        done = first[-1]["response"]
        context = done["usage"]["input_tokens"] + done["usage"]["output_tokens"]
        ws.send(
            json.dumps(
                {
                    "type": "response.create",
                    "model": "tarry",
                    "temperature": 0,
                    "previous_response_id": done["id"],
                    "input": [{"role": "user", "content": "And of Italy?"}],
                }
            )
        )
        second = _events_until_done(ws)[-1]["response"]
        assert second["usage"]["input_tokens_details"]["cached_tokens"] >= context // 16 * 16
        ws.send(
            json.dumps(
                {"type": "response.create", "previous_response_id": "resp_nope", "input": "hi"}
            )
        )
        error = _events_until_done(ws)[-1]
        assert error["type"] == "error"
        assert error["error"]["code"] == "previous_response_not_found"
        ws.send("{oops")
        assert json.loads(ws.recv(timeout=10))["error"]["code"] == "invalid_frame"


def test_agents_sdk_two_tool_call_agent(server):
    from agents import (
        Agent,
        ModelSettings,
        RunConfig,
        Runner,
        ToolsToFinalOutputResult,
        function_tool,
        set_tracing_disabled,
    )
    from agents.models.openai_provider import OpenAIProvider

    set_tracing_disabled(True)
    calls: list[tuple[str, str]] = []

    @function_tool
    def get_weather(city: str) -> str:
        """Current weather in a city."""
        calls.append(("get_weather", city))
        return f"18 degrees and sunny in {city}"

    @function_tool
    def get_time(city: str) -> str:
        """Local time in a city."""
        calls.append(("get_time", city))
        return f"14:05 in {city}"

    def stop_after_two_calls(context, results) -> ToolsToFinalOutputResult:
        done = len(calls) >= 2
        return ToolsToFinalOutputResult(
            is_final_output=done,
            final_output=" / ".join(str(r.output) for r in results) if done else None,
        )

    provider = OpenAIProvider(api_key=KEY, base_url=server[0] + "/v1", use_responses_websocket=True)
    agent = Agent(
        name="travel",
        instructions="Use the tools to answer.",
        model="tarry",
        tools=[get_weather, get_time],
        tool_use_behavior=stop_after_two_calls,
        reset_tool_choice=False,
        model_settings=ModelSettings(temperature=0, tool_choice="required", max_tokens=80),
    )
    result = asyncio.run(
        Runner.run(
            agent,
            "Weather and time in Paris?",
            max_turns=4,
            run_config=RunConfig(model_provider=provider),
        )
    )
    assert len(calls) == 2
    assert {name for name, _ in calls} <= {"get_weather", "get_time"}
    assert result.final_output
    assert len(result.raw_responses) == 2
    second_usage = result.raw_responses[1].usage
    assert second_usage.input_tokens_details.cached_tokens > 0  # the first call's prefix
