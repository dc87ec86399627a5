"""``AsyncEngine.generate_n``: n sequences of one prompt computed once, a seed per sequence,
cancellation of all of them, and the observer seeing the group once."""

from __future__ import annotations

import asyncio

import pytest

from engine.async_engine import AsyncEngine
from engine.errors import InvalidRequestError
from engine.generation_observer import GenerationObserver, GenerationStatus, GenerationTrace
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from tests.helpers import greedy, make_engine, mixed_prompts


class Recorder(GenerationObserver):
    def __init__(self) -> None:
        self.ends: list[tuple[int, GenerationStatus]] = []

    def on_end(self, trace: GenerationTrace, status: GenerationStatus, now: float) -> None:
        self.ends.append((trace.num_sequences, status))


@pytest.fixture
def async_engine(tiny_model_dirs):
    async_engine = AsyncEngine(make_engine(tiny_model_dirs["qwen2"]), observer=Recorder())
    async_engine.start()
    yield async_engine
    async_engine.shutdown()


async def run_n(
    async_engine: AsyncEngine, prompt: list[int], params: SamplingParams, n: int
) -> tuple[list[list[int]], list[RequestOutput]]:
    tokens: list[list[int]] = [[] for _ in range(n)]
    last: list[RequestOutput] = [None] * n  # type: ignore[list-item]
    async for idx, out in async_engine.generate_n(prompt, params, n):
        tokens[idx] += out.new_token_ids
        last[idx] = out
    return tokens, last


async def run_one(
    async_engine: AsyncEngine, prompt: list[int], params: SamplingParams
) -> list[int]:
    return [t async for out in async_engine.generate(prompt, params) for t in out.new_token_ids]


def test_the_prompt_is_computed_once_and_greedy_sequences_agree(async_engine):
    prompt = mixed_prompts(5, 1, 70, 70)[0]

    async def scenario():
        three = await run_n(async_engine, prompt, greedy(6), 3)
        one = await run_one(async_engine, prompt, greedy(6))
        return three, one

    (tokens, last), one = asyncio.run(scenario())
    assert tokens == [one] * 3
    reusable = (len(prompt) - 1) // 16 * 16
    assert [out.num_cached_tokens for out in last] == [0, reusable, reusable]
    assert all(out.finished for out in last)
    assert async_engine.observer.ends[0] == (3, GenerationStatus.FINISHED)


def test_sequence_i_samples_with_seed_plus_i(async_engine):
    prompt = mixed_prompts(6, 1, 20, 20)[0]
    params = SamplingParams(max_tokens=8, temperature=1.0, seed=11, ignore_eos=True)

    async def scenario():
        tokens, _ = await run_n(async_engine, prompt, params, 3)
        singles = []
        for offset in range(3):
            seeded = SamplingParams(
                max_tokens=8, temperature=1.0, seed=11 + offset, ignore_eos=True
            )
            singles.append(await run_one(async_engine, prompt, seeded))
        return tokens, singles

    tokens, singles = asyncio.run(scenario())
    assert tokens == singles and len({tuple(t) for t in tokens}) > 1


def test_stopping_early_aborts_every_sequence(async_engine):
    prompt = mixed_prompts(7, 1, 40, 40)[0]
    params = SamplingParams(max_tokens=500, ignore_eos=True)

    async def scenario():
        seen = 0
        async for _ in async_engine.generate_n(prompt, params, 4):
            seen += 1
            if seen == 6:
                break
        await asyncio.sleep(0.05)

    asyncio.run(scenario())
    engine = async_engine.engine
    assert async_engine.run_exclusive(engine.has_unfinished_requests) is False
    async_engine.run_exclusive(engine.check_integrity)
    assert async_engine.observer.ends[-1] == (4, GenerationStatus.ABORTED)


def test_bad_n_and_shared_processors_are_refused(async_engine):
    async def first(n: int, params: SamplingParams) -> None:
        async for _ in async_engine.generate_n([1, 2, 3], params, n):
            break

    with pytest.raises(InvalidRequestError):
        asyncio.run(first(0, greedy(2)))
    with_processor = SamplingParams(max_tokens=2, logits_processors=[lambda ids, logits: logits])
    with pytest.raises(InvalidRequestError):
        asyncio.run(first(2, with_processor))
