"""Stored responses survive a restart: ``previous_response_id`` and ``GET`` against a new
``tarry serve --redis-url`` process (the response and its session live in the record)."""

from __future__ import annotations

from pathlib import Path

import openai

from tests.redis_fixture import RedisServer
from tests.scaleout_helpers import TarryProcess

API_KEY = "restart-key"
FRANCE = "What is the capital of France? Answer in one sentence."
ITALY = "And what is the capital of Italy?"


def _client(process: TarryProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=process.url + "/v1", api_key=API_KEY, max_retries=0)


def test_previous_response_id_across_a_restart(redis_process: RedisServer, tmp_path: Path) -> None:
    first_process = TarryProcess(redis_process.url, tmp_path, 3.0, "--api-key", API_KEY)
    first_process.start()
    try:
        first_process.wait_ready()
        client = _client(first_process)
        first = client.responses.create(
            model="tarry", input=FRANCE, temperature=0, max_output_tokens=30
        )
        second = client.responses.create(
            model="tarry",
            previous_response_id=first.id,
            input=ITALY,
            temperature=0,
            max_output_tokens=30,
        )
    finally:
        first_process.stop()
    assert "Paris" in first.output_text

    restarted = TarryProcess(redis_process.url, tmp_path, 3.0, "--api-key", API_KEY)
    restarted.start()
    try:
        restarted.wait_ready()
        client = _client(restarted)
        assert client.responses.retrieve(first.id).output_text == first.output_text
        # Continuing the first response again (a branch) on the new process: same answer.
        again = client.responses.create(
            model="tarry",
            previous_response_id=first.id,
            input=ITALY,
            temperature=0,
            max_output_tokens=30,
        )
        assert again.output_text == second.output_text
        third = client.responses.create(
            model="tarry",
            previous_response_id=second.id,
            input="Thank you.",
            temperature=0,
            max_output_tokens=20,
        )
        assert third.status == "completed" and third.output_text
        assert third.usage.input_tokens > second.usage.input_tokens + second.usage.output_tokens
    finally:
        restarted.stop()
