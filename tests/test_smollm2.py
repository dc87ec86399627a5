"""The embedded SmolLM2 through the engine: correctness against transformers, and its answer."""

from __future__ import annotations

from engine.model_loader import load_model, resolve_model_dir
from engine.sampling_params import SamplingParams
from tests.helpers import greedy, hf_greedy, make_engine, mixed_prompts, run_staggered

NUM_TOKENS = 10


def test_capital_of_france_contains_paris(smollm2):
    engine = make_engine(smollm2)
    prompt = engine.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    )
    out = engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=40))[0]
    assert "Paris" in out.new_text
    assert out.finish_reason == "stop"


def test_greedy_parity_with_hf_on_every_path(smollm2):
    """Single, staggered batch with prefix hits, small chunks and preemption: all equal HF."""
    engine = make_engine(smollm2)
    system = engine.apply_chat_template(
        [{"role": "system", "content": "You are terse. " * 6}, {"role": "user", "content": "Hi"}]
    )
    prompts = [
        engine.apply_chat_template([{"role": "user", "content": "What is 2+2?"}]),
        *mixed_prompts(3, 2, 5, 60),
        *[system + extra for extra in mixed_prompts(4, 3, 1, 12)],
    ]
    expected = hf_greedy(smollm2.source_dir, prompts, NUM_TOKENS)
    single = engine.generate([prompts[0]], greedy(NUM_TOKENS))[0]
    assert single.new_token_ids == expected[0]
    staggered = run_staggered(engine, prompts, greedy(NUM_TOKENS), arrivals=[0, 0, 1, 2, 4, 6])
    assert [o.new_token_ids for o in staggered] == expected
    assert staggered[5].num_cached_tokens >= 32
    chunked = run_staggered(
        make_engine(smollm2, max_num_batched_tokens=16),
        prompts,
        greedy(NUM_TOKENS),
        arrivals=[0] * 6,
    )
    assert [o.new_token_ids for o in chunked] == expected
    tiny_pool = make_engine(smollm2, num_kv_blocks=12)
    preempted = run_staggered(tiny_pool, prompts, greedy(NUM_TOKENS), arrivals=[0] * 6)
    assert [o.new_token_ids for o in preempted] == expected
    assert tiny_pool.scheduler.num_preemptions > 0


def test_second_load_uses_the_safetensors_cache(smollm2):
    name, model_dir = resolve_model_dir(None)
    assert name == "SmolLM2-135M-Instruct"
    assert (model_dir / "model.safetensors").is_file()
    again = load_model(None, device="cpu")
    assert again.source_dir == smollm2.source_dir
    assert again.weights_digest == smollm2.weights_digest
