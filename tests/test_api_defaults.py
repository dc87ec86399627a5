"""Server-side defaults and request validation with the official openai client: default
sampling from the generation config, open-ended requests in /metrics and the log, penalties
and logit_bias over HTTP, tool_choice errors and ``pattern`` in forced tool schemas, model ids.
"""

from __future__ import annotations

import logging
import re
import threading

import httpx
import openai
import pytest
from pydantic import BaseModel, Field

from api.server import BackgroundServer, ServeOptions, build_state
from engine.config import EngineConfig
from engine.generation_config import EMBEDDED_MODEL_GENERATION_CONFIG
from engine.llm_engine import LLMEngine
from tests.api_helpers import live_server

README_QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


class Booking(BaseModel):
    code: str = Field(pattern=r"^[A-Z]{3}-\d{4}$")
    guests: int


@pytest.fixture(scope="module")
def server(smollm2):
    with live_server(smollm2, ServeOptions()) as running:
        yield running


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def hot_short_server(smollm2):
    """Defaults overridden to temperature 1.5; a 256-token context, so an open-ended request
    ends soon."""
    engine = LLMEngine(smollm2, EngineConfig(num_kv_blocks=256, max_model_len=256))
    options = ServeOptions(override_generation_config={"temperature": 1.5, "top_p": 1.0})
    background = BackgroundServer(build_state(engine, options))
    base_url = background.start()
    try:
        yield base_url, background.state
    finally:
        background.stop()


def test_readme_snippet_answers_paris_at_default_sampling(server, client):
    assert server[1].sampling_defaults == EMBEDDED_MODEL_GENERATION_CONFIG
    for _ in range(4):
        reply = client.chat.completions.create(model="tarry", messages=README_QUESTION)
        choice = reply.choices[0]
        assert "Paris" in choice.message.content, choice.message.content
        assert choice.finish_reason == "stop"
        assert reply.usage.completion_tokens < 64


def test_override_sets_the_default_and_the_request_wins(server, hot_short_server):
    base_url, state = hot_short_server
    assert state.sampling_defaults == {"temperature": 1.5, "top_p": 1.0}
    hot_client = openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0)
    greedy_client = openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "Tell me a story about a dragon."}]
    greedy = greedy_client.chat.completions.create(model="tarry", messages=messages, max_tokens=12)
    explicit = hot_client.chat.completions.create(
        model="tarry", messages=messages, temperature=0, max_tokens=12
    )
    assert explicit.choices[0].message.content == greedy.choices[0].message.content
    hot = [
        hot_client.chat.completions.create(model="tarry", messages=messages, max_tokens=12, seed=s)
        .choices[0]
        .message.content
        for s in range(3)
    ]
    assert any(text != greedy.choices[0].message.content for text in hot)
    short = hot_client.chat.completions.create(model="tarry", messages=messages, max_tokens=3)
    assert short.usage.completion_tokens == 3 and short.choices[0].finish_reason == "length"


def test_open_ended_request_runs_to_the_context_limit_visibly(hot_short_server, caplog):
    base_url, state = hot_short_server
    client = openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0)
    caplog.set_level(logging.INFO, logger="engine.llm_engine")
    stream = client.chat.completions.create(
        model="tarry",
        messages=[{"role": "user", "content": "Count from one to one thousand."}],
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = iter(stream)
    next(chunks)
    next(chunks)
    metrics = httpx.get(base_url + "/metrics").text
    assert "tarry_open_ended_requests_running 1.0" in metrics
    assert re.search(r"tarry_open_ended_request_oldest_age_seconds [0-9.e-]+", metrics)
    rest = list(chunks)
    usage = rest[-1].usage
    assert usage.prompt_tokens + usage.completion_tokens == 256  # the rest of the context
    assert [c.choices[0].finish_reason for c in rest if c.choices][-1] == "length"
    metrics = httpx.get(base_url + "/metrics").text
    assert "tarry_open_ended_requests_running 0.0" in metrics
    assert "tarry_open_ended_requests_admitted 1.0" in metrics
    messages = [r.getMessage() for r in caplog.records]
    assert any("has no max_tokens" in m for m in messages)
    assert any("ran to the context limit (256 tokens) without max_tokens" in m for m in messages)


def test_penalties_and_logit_bias_change_the_output_over_http(server, client):
    messages = [{"role": "user", "content": "Say 'hello hello hello hello'."}]
    plain = client.chat.completions.create(
        model="tarry", messages=messages, max_tokens=8, logprobs=True
    )
    first = plain.choices[0].logprobs.content[0].token
    tokenizer = server[1].async_engine.engine.tokenizer
    first_id = tokenizer.encode(first, add_special_tokens=False)[0]
    biased = client.chat.completions.create(
        model="tarry", messages=messages, max_tokens=8, logit_bias={str(first_id): -100}
    )
    assert biased.choices[0].message.content != plain.choices[0].message.content
    text = client.completions.create(model="tarry", prompt="hello hello hello hello", max_tokens=8)
    penalized = client.completions.create(
        model="tarry",
        prompt="hello hello hello hello",
        max_tokens=8,
        frequency_penalty=2.0,
        presence_penalty=1.0,
        extra_body={"repetition_penalty": 1.5},
    )
    assert penalized.choices[0].text != text.choices[0].text
    for bad, param in [
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"frequency_penalty": -2.5}, "frequency_penalty"),
        ({"extra_body": {"repetition_penalty": 0}}, "repetition_penalty"),
        ({"logit_bias": {"x": 1}}, "logit_bias"),
        ({"logit_bias": {"5": 200}}, "logit_bias"),
        ({"logit_bias": {"99999999": 1}}, "logit_bias"),
    ]:
        with pytest.raises(openai.BadRequestError, match=param):
            client.chat.completions.create(model="tarry", messages=messages, **bad)


def test_tool_choice_errors_are_400_not_500(client):
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    with pytest.raises(openai.BadRequestError, match="not in tools") as info:
        client.chat.completions.create(
            model="tarry",
            messages=messages,
            tools=[WEATHER],
            tool_choice={"type": "function", "function": {"name": "get_time"}},
        )
    assert info.value.body["param"] == "tool_choice"
    with pytest.raises(openai.BadRequestError, match="needs at least one tool"):
        client.chat.completions.create(model="tarry", messages=messages, tool_choice="required")
    with pytest.raises(openai.BadRequestError, match="not in tools"):
        client.chat.completions.create(
            model="tarry",
            messages=messages,
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
        )
    with pytest.raises(openai.BadRequestError, match="tool_choice must be"):
        client.chat.completions.create(
            model="tarry",
            messages=messages,
            tools=[WEATHER],
            tool_choice={"type": "function", "function": "get_weather"},  # type: ignore[typeddict-item]
        )


def test_pattern_in_a_forced_tool_schema_is_enforced(client):
    tool = openai.pydantic_function_tool(Booking, name="book")
    assert tool["function"]["parameters"]["properties"]["code"]["pattern"]
    reply = client.chat.completions.create(
        model="tarry",
        messages=[{"role": "user", "content": "Book table ABC-1234 for two guests."}],
        tools=[tool],
        tool_choice={"type": "function", "function": {"name": "book"}},
        max_tokens=96,
    )
    call = reply.choices[0].message.tool_calls[0]
    booking = Booking.model_validate_json(call.function.arguments)  # pattern checked here
    assert re.fullmatch(r"[A-Z]{3}-\d{4}", booking.code)
    lookbehind = {
        "type": "function",
        "function": {
            "name": "odd",
            "parameters": {
                "type": "object",
                "properties": {"x": {"type": "string", "pattern": "(?<=a)b"}},
                "required": ["x"],
            },
        },
    }
    with pytest.raises(openai.BadRequestError, match="Lookbehind"):
        client.chat.completions.create(
            model="tarry",
            messages=[{"role": "user", "content": "x"}],
            tools=[lookbehind],
            tool_choice="required",
        )


def test_unknown_model_is_404_and_models_can_be_retrieved(client):
    card = client.models.retrieve("SmolLM2-135M-Instruct")
    assert card.id == "SmolLM2-135M-Instruct" and card.model_extra["max_model_len"] > 0
    assert client.models.retrieve("tarry").id == "tarry"  # the default alias
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("gpt-4o")
    assert info.value.body["code"] == "model_not_found"
    for call in (
        lambda: client.chat.completions.create(model="gpt-4o", messages=README_QUESTION),
        lambda: client.completions.create(model="gpt-4o", prompt="Hi", max_tokens=2),
    ):
        with pytest.raises(openai.NotFoundError, match="gpt-4o"):
            call()


def test_concurrent_default_requests_all_finish(server, client):
    """Several default-sampling requests at once (the engine batches them) all answer."""
    answers: list[str] = []

    def ask() -> None:
        reply = client.chat.completions.create(model="tarry", messages=README_QUESTION)
        answers.append(reply.choices[0].message.content)

    threads = [threading.Thread(target=ask) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert len(answers) == 3 and all("Paris" in a for a in answers), answers
