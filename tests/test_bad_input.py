"""Bad input gets a clear error, changes nothing, and the engine keeps serving others."""

from __future__ import annotations

import pytest

from engine.config import EngineConfig
from engine.errors import InvalidRequestError, ModelLoadError
from engine.llm_engine import LLMEngine
from engine.model_loader import load_model
from engine.sampling_params import SamplingParams
from tests.helpers import make_engine

BAD_PARAMS = [
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": -5}, "max_tokens"),
    ({"temperature": -1.0}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -3}, "top_k"),
    ({"min_p": 2.0}, "min_p"),
    ({"logprobs": 99}, "logprobs"),
    ({"min_tokens": 50, "max_tokens": 10}, "min_tokens"),
    ({"stop": [""]}, "stop"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
]


@pytest.fixture(scope="module")
def engine(tiny_model_dirs):
    return make_engine(tiny_model_dirs["llama"], max_model_len=64)


def test_bad_requests_fail_cleanly_while_a_good_one_runs(engine):
    engine.add_request("good", [5, 6, 7], SamplingParams(temperature=0.0, max_tokens=8))
    engine.step()
    for kwargs, field in BAD_PARAMS:
        with pytest.raises(InvalidRequestError, match=field):
            engine.add_request(f"bad-{field}", [1, 2, 3], SamplingParams(**kwargs))
    with pytest.raises(InvalidRequestError, match="empty"):
        engine.add_request("empty", [], SamplingParams())
    with pytest.raises(InvalidRequestError, match="empty"):
        engine.add_request("empty-text", "", SamplingParams())
    with pytest.raises(InvalidRequestError, match="context limit"):
        engine.add_request("long", list(range(100, 164)), SamplingParams())
    with pytest.raises(InvalidRequestError, match="token ids"):
        engine.add_request("vocab", [10**9], SamplingParams())
    with pytest.raises(InvalidRequestError, match="already in use"):
        engine.add_request("good", [1], SamplingParams())
    engine.check_integrity()
    assert [r.request_id for r in engine.scheduler.running] == ["good"]
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    assert sum(len(o.new_token_ids) for o in outputs) + 1 >= 8
    assert outputs[-1].finished


def test_generation_stops_at_the_context_limit(engine):
    out = engine.generate(
        [list(range(100, 160))], SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True)
    )[0]
    assert out.finish_reason == "length"
    assert out.num_output_tokens == 4  # 60 prompt tokens + 4 = max_model_len 64


def test_unknown_model_path_names_what_was_tried(tmp_path):
    with pytest.raises(ModelLoadError) as info:
        load_model(str(tmp_path / "missing-model"))
    message = str(info.value)
    assert "local directory" in message and "GGUF file" in message and "hub id" in message
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(empty_dir))
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        load_model(None, dtype="int3")


def test_bad_engine_config_is_rejected(smollm2):
    with pytest.raises(ValueError, match="block_size"):
        LLMEngine(smollm2, EngineConfig(block_size=7))
    with pytest.raises(ValueError, match="num_kv_blocks"):
        LLMEngine(smollm2, EngineConfig(num_kv_blocks=0))


def test_memory_budget_in_bytes_sizes_the_pool(smollm2):
    per_block = 2 * 30 * 16 * 3 * 64 * 4  # layers, block size, kv heads, head dim, fp32
    engine = LLMEngine(smollm2, EngineConfig(kv_cache_bytes=per_block * 40 + 5))
    assert engine.kv_manager.pool.num_blocks == 40
    assert engine.max_model_len == 40 * 16
