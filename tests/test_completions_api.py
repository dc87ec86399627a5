"""``/v1/completions`` with the official openai client: logprobs, echo, prompt lists, ``n``
(the prompt computed once), ``include_usage``; ``/v1/models/{id}`` and unknown model ids."""

from __future__ import annotations

import json
import re

import httpx
import openai
import pytest

from api.server import ServeOptions
from tests.api_helpers import live_server

FRANCE = "The capital of France is"


@pytest.fixture(scope="module")
def server(smollm2):
    with live_server(smollm2, ServeOptions()) as running:
        yield running


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused")


def metric(base_url: str, name: str) -> float:
    text = httpx.get(base_url + "/metrics", timeout=10).text
    found = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.MULTILINE)
    assert found, f"{name} not in /metrics"
    return float(found.group(1))


def test_prompt_list_n_and_logprobs_in_the_legacy_shape(client, smollm2):
    ids = smollm2.tokenizer.encode("Paris is the capital of", add_special_tokens=False)
    result = client.completions.create(
        model="tarry", prompt=[FRANCE, ids], n=2, max_tokens=4, temperature=0, logprobs=2
    )
    assert [c.index for c in result.choices] == [0, 1, 2, 3]
    by_index = {c.index: c for c in result.choices}
    assert by_index[0].text == by_index[1].text and "Paris" in by_index[0].text
    assert by_index[2].text == by_index[3].text
    for choice in result.choices:
        lp = choice.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
        assert "".join(lp.tokens) == choice.text
        assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(4)]
        for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
            assert top[token] == logprob <= 0 and 1 <= len(top) <= 3
            assert logprob == max(top.values())  # greedy picks the most likely token
    usage = result.usage
    prompt_tokens = len(smollm2.tokenizer.encode(FRANCE, add_special_tokens=False)) + len(ids)
    assert usage.prompt_tokens == prompt_tokens  # once per prompt, not per choice
    assert usage.completion_tokens == 16


def test_echo_prepends_the_prompt_and_bad_fields_are_400(client, smollm2):
    plain = client.completions.create(model="tarry", prompt=FRANCE, max_tokens=4, temperature=0)
    echoed = client.completions.create(
        model="tarry", prompt=FRANCE, max_tokens=4, temperature=0, echo=True
    )
    assert echoed.choices[0].text == FRANCE + plain.choices[0].text
    ids = smollm2.tokenizer.encode(FRANCE, add_special_tokens=False)
    from_ids = client.completions.create(
        model="tarry", prompt=ids, max_tokens=4, temperature=0, echo=True
    )
    assert from_ids.choices[0].text == echoed.choices[0].text
    for extra in ({"echo": True, "logprobs": 1}, {"suffix": "!"}, {"best_of": 3}, {"n": 0}):
        with pytest.raises(openai.BadRequestError) as caught:
            client.completions.create(model="tarry", prompt=FRANCE, max_tokens=2, **extra)
        assert caught.value.body["param"] in extra
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tarry", prompt=[], max_tokens=2)


def test_stream_with_include_usage_ends_with_a_usage_chunk(client):
    plain = client.completions.create(
        model="tarry", prompt=FRANCE, n=2, max_tokens=5, temperature=0, logprobs=1
    )
    chunks = list(
        client.completions.create(
            model="tarry",
            prompt=FRANCE,
            n=2,
            max_tokens=5,
            temperature=0,
            logprobs=1,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage == plain.usage
    for choice in plain.choices:
        mine = [c.choices[0] for c in chunks[:-1] if c.choices[0].index == choice.index]
        assert "".join(c.text for c in mine) == choice.text
        assert [t for c in mine for t in c.logprobs.tokens] == choice.logprobs.tokens
        offsets = [o for c in mine for o in c.logprobs.text_offset]
        assert offsets == choice.logprobs.text_offset
        assert mine[-1].finish_reason == "length"


def test_n_forks_the_prompt_computed_once_with_a_seed_per_choice(server, client, smollm2):
    base_url = server[0]
    # A prompt no other test sends: nothing of it is cached before.
    prompt = "Write a long story about a lighthouse keeper. " * 6
    num_prompt = len(smollm2.tokenizer.encode(prompt, add_special_tokens=False))
    computed_before = metric(base_url, "tarry_prompt_tokens_computed_total")
    three = client.completions.create(
        model="tarry", prompt=prompt, n=3, max_tokens=8, temperature=0
    )
    computed = metric(base_url, "tarry_prompt_tokens_computed_total") - computed_before
    # Sequence 0 computes the prompt; 1 and 2 only its last, partial block (prefix hits).
    reused = (num_prompt - 1) // 16 * 16
    assert computed == num_prompt + 2 * (num_prompt - reused)
    assert three.usage.prompt_tokens == num_prompt and three.usage.completion_tokens == 24
    one = client.completions.create(model="tarry", prompt=prompt, max_tokens=8, temperature=0)
    assert [c.text for c in three.choices] == [one.choices[0].text] * 3

    def sampled(n: int, seed: int) -> list[str]:
        result = client.completions.create(
            model="tarry", prompt=FRANCE, n=n, max_tokens=8, temperature=1.0, seed=seed
        )
        return [c.text for c in sorted(result.choices, key=lambda c: c.index)]

    seeded = sampled(3, 7)
    assert sampled(3, 7) == seeded  # deterministic per seed
    assert [sampled(1, 7 + i)[0] for i in range(3)] == seeded  # choice i uses seed + i
    assert len(set(seeded)) > 1


def test_model_cards_and_unknown_models_are_404(server, client):
    served = client.models.list().data[0].id
    assert client.models.retrieve(served).id == served
    assert client.models.retrieve("tarry").id == "tarry"  # the alias
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("gpt-4o")
    assert caught.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4o", prompt=FRANCE, max_tokens=2)


def test_chat_n_choices_share_the_prompt_and_stream_by_index(server, client):
    """Chat ``n``: the prompt computed once; greedy choices equal ``n=1``; choice i samples
    with seed + i; streamed chunks carry each choice's index; forced calls per choice."""
    base_url = server[0]
    story = [{"role": "user", "content": "Tell a long tale of a sailor and a whale. " * 6}]
    computed_before = metric(base_url, "tarry_prompt_tokens_computed_total")
    three = client.chat.completions.create(
        model="tarry", messages=story, n=3, max_tokens=6, temperature=0
    )
    computed = metric(base_url, "tarry_prompt_tokens_computed_total") - computed_before
    num_prompt = three.usage.prompt_tokens
    reused = (num_prompt - 1) // 16 * 16
    assert computed == num_prompt + 2 * (num_prompt - reused)
    assert three.usage.completion_tokens == 18
    assert [c.index for c in three.choices] == [0, 1, 2]
    one = client.chat.completions.create(model="tarry", messages=story, max_tokens=6, temperature=0)
    assert [c.message.content for c in three.choices] == [one.choices[0].message.content] * 3

    hello = [{"role": "user", "content": "Say something about Paris."}]

    def sampled(n: int, seed: int) -> list[str]:
        result = client.chat.completions.create(
            model="tarry", messages=hello, n=n, max_tokens=8, temperature=1.0, seed=seed
        )
        return [c.message.content for c in result.choices]

    seeded = sampled(3, 11)
    assert [sampled(1, 11 + i)[0] for i in range(3)] == seeded
    assert len(set(seeded)) > 1

    texts = ["", ""]
    finishes = [None, None]
    stream = client.chat.completions.create(
        model="tarry", messages=hello, n=2, max_tokens=8, temperature=1.0, seed=11, stream=True
    )
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            finishes[choice.index] = choice.finish_reason or finishes[choice.index]
    assert texts == seeded[:2] and finishes == ["length", "length"]

    tool = {
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
    forced = client.chat.completions.create(
        model="tarry",
        messages=[{"role": "user", "content": "Weather in Oslo?"}],
        tools=[tool],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        n=2,
        max_tokens=40,
        temperature=1.0,
        seed=3,
    )
    assert len(forced.choices) == 2
    for choice in forced.choices:
        assert choice.finish_reason == "tool_calls"
        assert choice.message.tool_calls[0].function.name == "get_weather"
        assert "city" in json.loads(choice.message.tool_calls[0].function.arguments)

    for bad in ({"n": 0}, {"n": "two"}, {"n": 65}):
        reply = httpx.post(
            base_url + "/v1/chat/completions",
            json={"model": "tarry", "messages": hello, "max_tokens": 2, **bad},
            timeout=30,
        )
        assert reply.status_code == 400 and reply.json()["error"]["param"] == "n", reply.text
