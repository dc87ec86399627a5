"""Structured outputs on SmolLM2 (issue 13, item 3): ``response_format`` through the openai SDK,
LangChain ``with_structured_output`` (all three methods) and pydantic-ai ``NativeOutput``.

Schemas are small and their strings bounded, so a greedy generation finishes well within
``max_tokens`` and the constraint guarantees a valid value.
"""

from __future__ import annotations

import json

import openai
import pytest
from pydantic import BaseModel, Field

from api.errors import APIError
from api.response_format import json_answer_from_format
from api.server import ServeOptions
from tests.api_helpers import live_server
from tools.constrained import JsonAnswer

KEY = "key-structured"
QUESTION = "What is the capital of France? Reply in JSON."


class Capital(BaseModel):
    country: str = Field(max_length=24)
    city: str = Field(max_length=24)


@pytest.fixture(scope="module")
def server(smollm2):
    with live_server(smollm2, ServeOptions(api_keys=(KEY,))) as running:
        yield running


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0)


def test_parse_with_a_pydantic_model_validates(client):
    reply = client.beta.chat.completions.parse(
        model="tarry",
        messages=[{"role": "user", "content": QUESTION}],
        response_format=Capital,
        temperature=0,
        max_tokens=80,
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, Capital), choice.message.content
    assert json.loads(choice.message.content) == choice.message.parsed.model_dump()


def test_json_object_is_a_json_object_streamed_or_not(client):
    kwargs = {
        "model": "tarry",
        "messages": [{"role": "user", "content": "Give the capital of France as JSON."}],
        "response_format": {"type": "json_object"},
        "temperature": 0,
        "max_tokens": 80,
    }
    reply = client.chat.completions.create(**kwargs)
    content = reply.choices[0].message.content
    assert reply.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(content), dict), content
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == content


def test_uncompilable_schema_is_a_400_naming_the_problem(client):
    bad = {"type": "object", "properties": {"code": {"type": "string", "pattern": "(ab"}}}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="tarry",
            messages=[{"role": "user", "content": "Hi"}],
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": bad}},
            max_tokens=8,
        )
    error = info.value.body
    assert isinstance(error, dict) and error["param"] == "response_format"
    assert "parenthesis" in error["message"] and "code" in error["message"]


def test_tools_auto_with_a_schema_gives_a_call_or_the_answer(client):
    weather = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 24}},
                "required": ["city"],
            },
        },
    }
    schema = {"name": "capital", "schema": Capital.model_json_schema()}
    reply = client.chat.completions.create(
        model="tarry",
        messages=[{"role": "user", "content": QUESTION}],
        response_format={"type": "json_schema", "json_schema": schema},
        tools=[weather],
        temperature=0,
        max_tokens=80,
    )
    message = reply.choices[0].message
    if message.tool_calls:
        assert message.tool_calls[0].function.name == "get_weather"
        assert json.loads(message.tool_calls[0].function.arguments)["city"]
    else:
        Capital.model_validate_json(message.content or "")


@pytest.mark.parametrize("method", ["function_calling", "json_mode", "json_schema"])
def test_langchain_with_structured_output(server, method):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(
        model="tarry",
        base_url=server[0] + "/v1",
        api_key=KEY,
        temperature=0,
        max_tokens=80,
        max_retries=0,
    )
    structured = llm.with_structured_output(Capital, method=method)
    prompt = QUESTION
    if method == "json_mode":  # json_mode sends no schema: the prompt has to name the keys
        prompt += ' Answer like {"country": "Spain", "city": "Madrid"}.'
    result = structured.invoke(prompt)
    assert isinstance(result, Capital), result


def test_pydantic_ai_native_output(server):
    from pydantic_ai import Agent, NativeOutput
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider

    model = OpenAIChatModel(
        "tarry", provider=OpenAIProvider(base_url=server[0] + "/v1", api_key=KEY)
    )
    agent = Agent(
        model,
        output_type=NativeOutput(Capital),
        model_settings={"temperature": 0, "max_tokens": 80},
    )
    result = agent.run_sync(QUESTION)
    assert isinstance(result.output, Capital)


def test_chat_and_responses_format_shapes():
    """``response_format`` (chat) and ``text.format`` (Responses) map to the same answer."""
    schema = Capital.model_json_schema()
    chat = {"type": "json_schema", "json_schema": {"name": "c", "schema": schema, "strict": True}}
    responses = {"type": "json_schema", "name": "c", "schema": schema, "strict": True}
    assert json_answer_from_format(chat) == json_answer_from_format(responses, "text.format")
    assert json_answer_from_format(chat) == JsonAnswer(schema)
    assert json_answer_from_format({"type": "json_object"}) == JsonAnswer(None)
    assert json_answer_from_format({"type": "text"}) is None
    assert json_answer_from_format(None) is None
    for bad in ({"type": "json"}, [], {"type": "json_schema", "name": 3, "schema": {}}):
        with pytest.raises(APIError) as info:
            json_answer_from_format(bad, "text.format")
        assert info.value.status == 400 and info.value.param == "text.format"
