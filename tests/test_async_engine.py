"""The background step loop: streaming, concurrency, cancellation, and the CLI on top of it."""

from __future__ import annotations

import asyncio
import time

import pytest

from api.cli import main
from engine.async_engine import AsyncEngine
from engine.errors import InvalidRequestError
from engine.sampling_params import SamplingParams
from tests.helpers import greedy, make_engine


@pytest.fixture
def async_engine(tiny_model_dirs):
    async_engine = AsyncEngine(make_engine(tiny_model_dirs["qwen2"]))
    async_engine.start()
    yield async_engine
    async_engine.shutdown()


async def _collect(
    async_engine: AsyncEngine, prompt: list[int], params: SamplingParams
) -> list[int]:
    tokens: list[int] = []
    async for out in async_engine.generate(prompt, params):
        tokens += out.new_token_ids
    return tokens


def test_concurrent_streams_equal_sequential_results(async_engine, tiny_model_dirs):
    prompts = [[10 + i, 20, 30, 40 + i] for i in range(5)]
    reference = make_engine(tiny_model_dirs["qwen2"])
    sequential = [reference.generate([p], greedy(8))[0].new_token_ids for p in prompts]

    async def run_all():
        return await asyncio.gather(*(_collect(async_engine, p, greedy(8)) for p in prompts))

    assert asyncio.run(run_all()) == sequential


def test_cancellation_aborts_and_frees_blocks(async_engine):
    async def cancel_midway():
        seen = 0
        async for _ in async_engine.generate(
            [1, 2, 3], SamplingParams(max_tokens=500, ignore_eos=True)
        ):
            seen += 1
            if seen == 3:
                break  # leaving the loop closes the generator, which aborts the request
        await asyncio.sleep(0.05)
        return seen

    assert asyncio.run(cancel_midway()) == 3

    def engine_state() -> tuple[bool, float]:
        async_engine.engine.check_integrity()
        return async_engine.engine.has_unfinished_requests(), async_engine.engine.kv_manager.usage()

    assert async_engine.run_exclusive(engine_state) == (False, 0.0)
    assert async_engine.stats.num_running == async_engine.stats.num_waiting == 0


def test_invalid_request_raises_before_streaming(async_engine):
    async def bad():
        async for _ in async_engine.generate([], SamplingParams()):
            pass

    with pytest.raises(InvalidRequestError):
        asyncio.run(bad())
    assert asyncio.run(_collect(async_engine, [4, 5], greedy(3))) != []


def test_cli_generate_streams_the_answer(capsys):
    code = main(
        ["generate", "What is the capital of France? Answer in one sentence.", "--max-tokens", "30"]
    )
    assert code == 0
    assert "Paris" in capsys.readouterr().out


def test_cli_reports_unknown_model(capsys):
    assert main(["generate", "hi", "--model", "/no/such/model"]) == 2
    assert "cannot load model" in capsys.readouterr().err


def test_commands_never_block_the_event_loop(async_engine):
    """While the engine thread is busy (here: a 0.5 s command standing in for a long step),
    starting a request, aborting and submitting return at once; the request then runs."""

    async def scenario() -> tuple[float, list[int]]:
        busy = asyncio.ensure_future(async_engine.run_exclusive_async(time.sleep, 0.5))
        await asyncio.sleep(0.05)  # the engine thread is inside the sleep now
        started = time.perf_counter()
        stream = async_engine.generate([1, 2, 3], greedy(4))
        first = asyncio.ensure_future(stream.__anext__())
        await asyncio.sleep(0)  # generate ran up to its first wait: the add is queued
        async_engine.abort("no-such-request")
        pinned = async_engine.submit(len, [1, 2])
        enqueue_s = time.perf_counter() - started
        await busy
        tokens = (await first).new_token_ids
        async for out in stream:
            tokens += out.new_token_ids
        assert pinned.result() == 2  # queued commands ran, in order, on the engine thread
        return enqueue_s, tokens

    enqueue_s, tokens = asyncio.run(scenario())
    assert enqueue_s < 0.1
    assert len(tokens) == 4


def test_run_exclusive_refuses_to_block_an_event_loop(async_engine):
    async def on_the_loop() -> None:
        async_engine.run_exclusive(len, [1])

    with pytest.raises(RuntimeError, match="run_exclusive_async"):
        asyncio.run(on_the_loop())
    assert async_engine.run_exclusive(len, [1, 2, 3]) == 3  # fine from a plain thread
