"""Tool calling through the API on SmolLM2: forced calls over HTTP (openai client, LangChain),
the built-in python tool, and a three-round agent loop over the session protocol."""

from __future__ import annotations

import asyncio
import json

import jsonschema
import openai
import pytest

from api.server import ServeOptions
from api.tool_runtime import python_result_text
from tests.api_helpers import ProtocolClient, live_server
from tools.sandbox import PythonSandbox

KEY = "key-tools"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "unit": {"type": "string", "enum": ["c", "f"]},
            },
            "required": ["city", "unit"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Local time in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


@pytest.fixture(scope="module")
def server(smollm2):
    with live_server(smollm2, ServeOptions(api_keys=(KEY,))) as running:
        yield running


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY)


def test_openai_client_forced_tool_call_is_valid(client):
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    reply = client.chat.completions.create(
        model="tarry",
        messages=messages,
        tools=[WEATHER, TIME],
        tool_choice="required",
        temperature=0,
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.id.startswith("call_")
    schema = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]
    jsonschema.validate(json.loads(call.function.arguments), schema["function"]["parameters"])
    chunks = list(
        client.chat.completions.create(
            model="tarry",
            messages=messages,
            tools=[WEATHER],
            temperature=0,
            stream=True,
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
        )
    )
    streamed = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert [tc.function.name for tc in streamed] == ["get_weather"]
    jsonschema.validate(
        json.loads(streamed[0].function.arguments), WEATHER["function"]["parameters"]
    )
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    follow_up = client.chat.completions.create(
        model="tarry",
        temperature=0,
        max_tokens=30,
        tools=[WEATHER],
        messages=[
            *messages,
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": call.id,
                        "type": "function",
                        "function": {
                            "name": call.function.name,
                            "arguments": call.function.arguments,
                        },
                    }
                ],
            },
            {"role": "tool", "tool_call_id": call.id, "content": "18 degrees and sunny"},
        ],
    )
    assert follow_up.choices[0].message.content


def test_langchain_streams_and_binds_tools(server):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(
        base_url=server[0] + "/v1", api_key=KEY, model="tarry", temperature=0, max_tokens=30
    )
    streamed = "".join(
        chunk.content
        for chunk in llm.stream("What is the capital of France? Answer in one sentence.")
    )
    assert "Paris" in streamed
    roomy = ChatOpenAI(
        base_url=server[0] + "/v1", api_key=KEY, model="tarry", temperature=0, max_tokens=80
    )
    with_tools = roomy.bind_tools([WEATHER], tool_choice="get_weather")
    message = with_tools.invoke("Weather in Rome?")
    assert message.tool_calls and message.tool_calls[0]["name"] == "get_weather"
    assert set(message.tool_calls[0]["args"]) == {"city", "unit"}


def test_python_tool_runs_in_the_sandbox(server, tmp_path):
    ws = ProtocolClient(server[0], KEY)
    try:
        ws.send({"type": "session.create", "session": {"tools": [{"type": "python"}]}})
        assert ws.recv()["type"] == "session.created"
        ws.user("Compute 17*23 with python")
        ws.send(
            {
                "type": "response.create",
                "response": {
                    "temperature": 0,
                    "max_output_tokens": 120,
                    "tool_choice": {"type": "function", "function": {"name": "python"}},
                },
            }
        )
        events = ws.recv_until("response.done")
        ws.recv()  # session.state
        call = next(e for e in events if e["type"] == "response.function_call_arguments.done")
        assert call["name"] == "python"
        output = next(e for e in events if e["type"] == "response.tool_output.done")
        code = json.loads(call["arguments"])["code"]
        with PythonSandbox(tmp_path) as fresh:  # what that code really prints
            assert output["output"] == python_result_text(fresh.run(code))
        if code.strip() == "17*23" or "print(17*23)" in code.replace(" ", ""):
            assert "391" in output["output"]
        done = events[-1]["response"]
        assert done["status"] in ("completed", "incomplete")
        assert done["output"][0]["type"] == "function_call"
    finally:
        ws.close()


def test_agent_loop_three_tool_rounds_reuses_the_whole_context(server):
    ws = ProtocolClient(server[0], KEY)
    try:
        ws.send(
            {
                "type": "session.create",
                "session": {
                    "instructions": "You are a travel assistant.",
                    "tools": [WEATHER, TIME, {"type": "python"}],
                },
            }
        )
        assert ws.recv()["type"] == "session.created"
        ws.user("Plan my afternoon in Paris.")
        previous_context = 0
        for round_idx, (tool, result) in enumerate(
            [("get_weather", "18 degrees and sunny"), ("get_time", "14:05"), ("python", None)]
        ):
            ws.send(
                {
                    "type": "response.create",
                    "response": {
                        "temperature": 0,
                        "max_output_tokens": 60,
                        "tool_choice": {"type": "function", "function": {"name": tool}},
                    },
                }
            )
            events = ws.recv_until("response.done")
            ws.recv()  # session.state
            done = events[-1]["response"]
            calls = [e for e in events if e["type"] == "response.function_call_arguments.done"]
            assert calls and calls[0]["name"] == tool, (round_idx, events[-1]["response"]["output"])
            usage = done["usage"]
            if round_idx:
                assert usage["input_token_details"]["cached_tokens"] >= previous_context // 16 * 16
            if result is not None:
                assert done["status"] == "requires_action"
                ws.send(
                    {
                        "type": "conversation.item.create",
                        "item": {
                            "type": "function_call_output",
                            "call_id": calls[0]["call_id"],
                            "output": result,
                        },
                    }
                )
                assert ws.recv()["type"] == "conversation.item.added"
            else:
                assert any(e["type"] == "response.tool_output.done" for e in events)
            previous_context = usage["input_tokens"] + usage["output_tokens"]
    finally:
        ws.close()


def test_agents_sdk_over_chat_completions_answers_from_the_tool_result(server):
    """The Agents SDK demo (issue 13, item 8): a function tool forced once, tool_choice reset
    after the call; the final answer uses the result instead of parroting its markup."""
    from agents import (
        Agent,
        ModelSettings,
        OpenAIChatCompletionsModel,
        Runner,
        function_tool,
        set_tracing_disabled,
    )

    set_tracing_disabled(True)
    cities: list[str] = []

    @function_tool
    def get_weather(city: str) -> str:
        """Current weather in a city."""
        cities.append(city)
        return f"18 degrees and sunny in {city}"

    model = OpenAIChatCompletionsModel(
        "tarry", openai.AsyncOpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0)
    )
    agent = Agent(
        name="weather",
        instructions="You are a helpful assistant. Use the tools to answer.",
        model=model,
        tools=[get_weather],
        model_settings=ModelSettings(temperature=0, tool_choice="required", max_tokens=80),
    )
    result = asyncio.run(Runner.run(agent, "What is the weather in Paris?", max_turns=4))
    assert cities == ["Paris"]
    answer = result.final_output
    assert "18 degrees" in answer, answer
    assert not any(markup in answer for markup in ("<tool_response>", "<tool_call>", '"name"'))
