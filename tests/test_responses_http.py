"""The Responses API over HTTP with the real clients: the openai SDK (plain, stream,
previous_response_id, GET/DELETE), the Agents SDK's default model and LangChain
``use_responses_api``; stored responses backed by sessions, and no session left behind."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from api.server import ServeOptions
from api.state import Limits
from tests.api_helpers import live_server

KEY, OTHER_KEY = "key-responses", "key-other"
FRANCE = "What is the capital of France? Answer in one sentence."
INSTRUCTIONS = "You are a helpful assistant."
MAX_SESSIONS = 6


@pytest.fixture(scope="module")
def server(smollm2, redis_server):
    limits = Limits(max_output_tokens=256, max_sessions_per_key=MAX_SESSIONS)
    options = ServeOptions(redis_url=redis_server, api_keys=(KEY, OTHER_KEY), limits=limits)
    with live_server(smollm2, options) as running:
        yield running


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0)


def _num_sessions(server) -> int:
    return len(server[1].sessions.all_sessions())


def test_create_plain_and_stream_agree(server, client):
    before = _num_sessions(server)
    plain = client.responses.create(
        model="tarry",
        instructions=INSTRUCTIONS,
        input=FRANCE,
        temperature=0,
        max_output_tokens=40,
        store=False,
    )
    assert plain.status == "completed" and "Paris" in plain.output_text
    assert plain.usage.input_tokens > 0 and plain.usage.output_tokens > 0
    assert _num_sessions(server) == before  # store=false leaves no session behind
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(plain.id)

    events = list(
        client.responses.create(
            model="tarry",
            instructions=INSTRUCTIONS,
            input=FRANCE,
            temperature=0,
            max_output_tokens=40,
            store=False,
            stream=True,
        )
    )
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == plain.output_text == events[-1].response.output_text
    assert _num_sessions(server) == before

    metrics = httpx.get(server[0] + "/metrics").text
    assert 'tarry_requests_total{endpoint="responses",status="200"}' in metrics
    short = client.responses.create(model="tarry", input=FRANCE, max_output_tokens=2, store=False)
    assert short.status == "incomplete" and short.incomplete_details.reason == "max_output_tokens"


def test_previous_response_id_reuses_kv_and_matches_fresh(server, client):
    first = client.responses.create(
        model="tarry", instructions=INSTRUCTIONS, input=FRANCE, temperature=0, max_output_tokens=40
    )
    context = first.usage.input_tokens + first.usage.output_tokens
    second = client.responses.create(
        model="tarry",
        previous_response_id=first.id,
        input="And what is the capital of Italy?",
        temperature=0,
        max_output_tokens=40,
    )
    assert second.usage.input_tokens > context
    assert second.usage.input_tokens_details.cached_tokens >= context // 16 * 16
    fresh = client.responses.create(
        model="tarry",
        instructions=INSTRUCTIONS,
        input=[
            {"role": "user", "content": FRANCE},
            {"role": "assistant", "content": first.output_text},
            {"role": "user", "content": "And what is the capital of Italy?"},
        ],
        temperature=0,
        max_output_tokens=40,
        store=False,
    )
    assert fresh.output_text == second.output_text

    # A branch from the first response (no longer its session's latest) forks: same answer.
    branch = client.responses.create(
        model="tarry",
        previous_response_id=first.id,
        input="And what is the capital of Italy?",
        temperature=0,
        max_output_tokens=40,
    )
    assert branch.output_text == second.output_text
    assert branch.usage.input_tokens_details.cached_tokens >= context // 16 * 16

    fetched = client.responses.retrieve(second.id)
    assert fetched.id == second.id and fetched.output_text == second.output_text
    other = openai.OpenAI(base_url=server[0] + "/v1", api_key=OTHER_KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError):
        other.responses.retrieve(second.id)  # another tenant's response is not found
    with pytest.raises(openai.NotFoundError):
        other.responses.create(model="tarry", previous_response_id=second.id, input="hi")
    deleted = client.responses.delete(branch.id)
    assert deleted is None or getattr(deleted, "deleted", True)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(branch.id)
    client.responses.delete(first.id)
    client.responses.delete(second.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="tarry", previous_response_id=second.id, input="hi")


def test_failed_requests_leave_no_session_and_bad_input_is_4xx(server, client):
    auth = {"Authorization": f"Bearer {KEY}"}
    base = server[0] + "/v1/responses"
    first = client.responses.create(model="tarry", input=FRANCE, max_output_tokens=5)
    session = server[1].sessions.get(
        first.id.partition("-")[2], server[1].owner_for(f"Bearer {KEY}")
    )
    num_items, before = len(session.messages), _num_sessions(server)
    too_long = "word " * 40000
    for body in (
        {"input": too_long},
        {"input": too_long, "previous_response_id": first.id},
        {"input": too_long, "previous_response_id": first.id, "store": False},
    ):
        reply = httpx.post(base, json=body, headers=auth, timeout=120)
        assert reply.status_code == 400, reply.text
        assert reply.json()["error"]["code"] == "context_length_exceeded"
    assert _num_sessions(server) == before and len(session.messages) == num_items
    bad_bodies = [
        ({"input": 5}, 400, "input"),
        ({"input": [{"type": "image"}]}, 400, "input"),
        ({"input": "hi", "temperature": "hot"}, 400, "temperature"),
        ({"input": "hi", "top_k": "x"}, 400, "top_k"),
        ({"input": "hi", "text": {"format": {"type": "xml"}}}, 400, "text.format"),
        (
            {"input": "hi", "text": {"format": {"type": "json_schema", "schema": 3}}},
            400,
            "text.format",
        ),
        ({"input": "hi", "tool_choice": {"type": "function", "name": "nope"}}, 400, "tool_choice"),
        ({"input": "hi", "previous_response_id": "resp_nope"}, 404, "previous_response_id"),
        ({"input": "hi", "model": "gpt-nope"}, 404, "model"),
        ({"input": "hi", "store": "yes"}, 400, "store"),
        ({"input": "hi", "max_output_tokens": 10**6}, 400, "max_output_tokens"),
        ({"input": [{"type": "function_call", "name": None}]}, 400, "input"),
        ({"input": [{"type": "function_call_output", "output": "x"}]}, 400, "input"),
        ({"input": [], "max_output_tokens": 4}, 400, None),
    ]
    for body, status, param in bad_bodies:
        reply = httpx.post(base, json=body, headers=auth, timeout=60)
        assert reply.status_code == status, (body, reply.text)
        assert reply.json()["error"]["param"] == param, reply.text
    assert httpx.post(base, content=b"{oops", headers=auth).status_code == 400
    assert httpx.post(base, json={"input": "hi"}).status_code == 401
    assert httpx.get(base + "/resp_nope", headers=auth).status_code == 404
    assert httpx.delete(base + "/resp_0-sess_nope", headers=auth).status_code == 404
    assert _num_sessions(server) == before

    # Stored responses stay within max_sessions_per_key: the oldest idle one makes room.
    owner = server[1].owner_for(f"Bearer {KEY}")
    for _ in range(MAX_SESSIONS + 2):
        client.responses.create(model="tarry", input="hi", max_output_tokens=1)
        assert len(server[1].sessions.sessions_of(owner)) <= MAX_SESSIONS


def test_agents_sdk_default_model_runs_a_function_tool(server):
    from agents import (
        Agent,
        ModelSettings,
        OpenAIResponsesModel,
        RunConfig,
        Runner,
        function_tool,
        set_tracing_disabled,
    )
    from agents.models.openai_provider import OpenAIProvider

    set_tracing_disabled(True)
    calls = []

    @function_tool
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        calls.append(city)
        return f"It is sunny and 24 degrees in {city}."

    # No use_responses flag: the SDK's default model is OpenAIResponsesModel over HTTP.
    provider = OpenAIProvider(api_key=KEY, base_url=server[0] + "/v1")
    agent = Agent(
        name="weather",
        instructions="Use the get_weather tool, then answer in one sentence.",
        model="tarry",
        tools=[get_weather],
        model_settings=ModelSettings(temperature=0, tool_choice="required", max_tokens=60),
        reset_tool_choice=True,
    )
    assert isinstance(provider.get_model("tarry"), OpenAIResponsesModel)
    result = asyncio.run(
        Runner.run(
            agent, "What is the weather in Paris?", run_config=RunConfig(model_provider=provider)
        )
    )
    assert calls, "the agent called the tool"
    assert isinstance(result.final_output, str) and result.final_output.strip()
    assert len(result.raw_responses) >= 2
    assert result.raw_responses[-1].usage.output_tokens > 0


def test_langchain_use_responses_api_invoke_and_stream(server):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(
        model="tarry",
        base_url=server[0] + "/v1",
        api_key=KEY,
        temperature=0,
        max_tokens=40,
        use_responses_api=True,
    )
    message = llm.invoke(FRANCE)
    assert "Paris" in message.text
    streamed = "".join(chunk.text for chunk in llm.stream(FRANCE))
    assert streamed == message.text


WEATHER_TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "The current weather in a city.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}


def test_streamed_function_call_then_its_output(client):
    events = list(
        client.responses.create(
            model="tarry",
            input="What is the weather in Paris?",
            tools=[WEATHER_TOOL],
            tool_choice={"type": "function", "name": "get_weather"},
            temperature=0,
            max_output_tokens=60,
            stream=True,
        )
    )
    kinds = [e.type for e in events]
    assert "response.function_call_arguments.delta" in kinds
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    assert json.loads(done.arguments)["city"]
    response = events[-1].response
    assert events[-1].type == "response.completed"
    call = next(item for item in response.output if item.type == "function_call")
    assert call.name == "get_weather" and call.arguments == done.arguments
    context = response.usage.input_tokens + response.usage.output_tokens
    answer = client.responses.create(
        model="tarry",
        previous_response_id=response.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 24 C"}],
        tools=[WEATHER_TOOL],
        temperature=0,
        max_output_tokens=40,
    )
    assert answer.status == "completed" and answer.output_text
    assert answer.usage.input_tokens_details.cached_tokens >= context // 16 * 16


def test_text_format_json_schema_constrains_the_output(client):
    """``text.format`` (what ``client.responses.parse`` sends) is followed, not ignored."""
    from pydantic import BaseModel

    class City(BaseModel):
        name: str
        population: int

    parsed = client.responses.parse(
        model="tarry",
        input="Describe Paris as JSON.",
        text_format=City,
        max_output_tokens=60,
        temperature=0,
    )
    assert parsed.status == "completed", parsed.output_text
    assert isinstance(parsed.output_parsed, City)
    plain = client.responses.create(
        model="tarry",
        input="Give me a JSON object about Rome.",
        text={"format": {"type": "json_object"}},
        max_output_tokens=40,
        temperature=0,
    )
    if plain.status == "completed":
        assert isinstance(json.loads(plain.output_text), dict)
    else:  # cut by max_output_tokens: still a JSON prefix
        assert plain.output_text.lstrip().startswith("{")
