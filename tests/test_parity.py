"""Greedy output must be token-identical to Hugging Face ``generate()`` on every path:
single request, staggered batches, prefix-cache hits, small prefill chunks, preemption."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import TINY_ARCHITECTURES
from tests.helpers import greedy, hf_greedy, make_engine, mixed_prompts, run_staggered

NUM_TOKENS = 12
SHARED_PREFIX = list(range(300, 340))  # 40 tokens: two full blocks of 16 plus a partial one


@pytest.fixture(scope="module")
def references(
    tiny_model_dirs: dict[str, Path],
) -> dict[str, tuple[list[list[int]], list[list[int]]]]:
    """Per architecture: 8 mixed-length prompts (half share a prefix) and HF's continuations."""
    result = {}
    for arch, model_dir in tiny_model_dirs.items():
        prompts = mixed_prompts(1, 4, 3, 40) + mixed_prompts(2, 4, 1, 30, shared=SHARED_PREFIX)
        result[arch] = (prompts, hf_greedy(model_dir, prompts, NUM_TOKENS))
    return result


@pytest.mark.parametrize("arch", sorted(TINY_ARCHITECTURES))
def test_single_request_matches_hf(arch, tiny_model_dirs, references):
    prompts, expected = references[arch]
    engine = make_engine(tiny_model_dirs[arch])
    out = engine.generate([prompts[0]], greedy(NUM_TOKENS))[0]
    assert out.new_token_ids == expected[0]
    assert out.finish_reason == "length"


@pytest.mark.parametrize("arch", sorted(TINY_ARCHITECTURES))
def test_staggered_batch_with_prefix_hits_matches_hf(arch, tiny_model_dirs, references):
    prompts, expected = references[arch]
    engine = make_engine(tiny_model_dirs[arch])
    outputs = run_staggered(engine, prompts, greedy(NUM_TOKENS), arrivals=[0, 0, 1, 2, 2, 3, 5, 9])
    assert [o.new_token_ids for o in outputs] == expected
    # The shared-prefix prompts arriving after the first of them hit its cached blocks.
    assert max(o.num_cached_tokens for o in outputs[5:]) >= 32
    engine.check_integrity()
    assert engine.kv_manager.usage() == 0.0


@pytest.mark.parametrize("arch", sorted(TINY_ARCHITECTURES))
def test_small_prefill_chunks_match_hf(arch, tiny_model_dirs, references):
    prompts, expected = references[arch]
    engine = make_engine(tiny_model_dirs[arch], max_num_batched_tokens=7)
    outputs = run_staggered(engine, prompts, greedy(NUM_TOKENS), arrivals=[0, 0, 0, 1, 1, 2, 2, 3])
    assert [o.new_token_ids for o in outputs] == expected


@pytest.mark.parametrize("arch", sorted(TINY_ARCHITECTURES))
def test_preemption_by_tiny_pool_matches_hf(arch, tiny_model_dirs, references):
    prompts, expected = references[arch]
    engine = make_engine(tiny_model_dirs[arch], num_kv_blocks=10)
    outputs = run_staggered(engine, prompts, greedy(NUM_TOKENS), arrivals=[0] * 8)
    assert [o.new_token_ids for o in outputs] == expected
    assert engine.scheduler.num_preemptions > 0


def test_prefix_hit_reuses_blocks_and_matches_fresh(tiny_model_dirs, references):
    prompts, expected = references["llama"]
    engine = make_engine(tiny_model_dirs["llama"])
    first = engine.generate([prompts[5]], greedy(NUM_TOKENS))[0]
    again = engine.generate([prompts[5]], greedy(NUM_TOKENS))[0]
    assert first.new_token_ids == again.new_token_ids == expected[5]
    assert first.num_cached_tokens == 0
    # Every full block but the one holding the last prompt token comes from the cache.
    assert again.num_cached_tokens == (len(prompts[5]) - 1) // 16 * 16


def test_sliding_window_is_exercised(tiny_model_dirs):
    """The mistral config's window (24) is shorter than the prompts + outputs used above."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(tiny_model_dirs["mistral"]))
    assert config.sliding_window == 24
    assert config.sliding_window < 40 + 30 + NUM_TOKENS
