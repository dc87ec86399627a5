"""Padded decode steps (``engine.decode_graph``) on the CPU: greedy output token-identical to
Hugging Face ``generate()`` while the batch shrinks through odd sizes that pad (7 -> 8, 5 -> 8,
3 -> 4), on every tiny architecture and on the embedded SmolLM2."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.llm_engine import LLMEngine
from engine.step_inputs import SeqChunk
from tests.conftest import TINY_ARCHITECTURES
from tests.helpers import hf_greedy, make_engine, mixed_prompts, run_all_at_once

NUM_TOKENS = 12
# Seven requests, all admitted at once, finishing at different steps: the decode batch runs
# at 7, 6, 5, 4, 3, 2 and 1 sequences (buckets 8, 8, 8, 4, 4, 2, 1).
MAX_TOKENS = [12, 5, 9, 3, 11, 7, 10]


def run_shrinking(engine: LLMEngine, prompts: list[list[int]]) -> list[list[int]]:
    return run_all_at_once(engine, prompts, MAX_TOKENS)


@pytest.fixture(scope="module")
def references(tiny_model_dirs: dict[str, Path]) -> dict[str, tuple[list[list[int]], list]]:
    """Per architecture: 7 prompts of 3..40 tokens and HF's greedy continuations."""
    prompts = mixed_prompts(11, 7, 3, 40)
    return {
        arch: (prompts, hf_greedy(model_dir, prompts, NUM_TOKENS))
        for arch, model_dir in tiny_model_dirs.items()
    }


@pytest.mark.parametrize("arch", sorted(TINY_ARCHITECTURES))
def test_padded_decode_matches_hf_while_the_batch_shrinks(arch, tiny_model_dirs, references):
    prompts, expected = references[arch]
    engine = make_engine(tiny_model_dirs[arch], max_num_seqs=16)
    decode = engine.model_runner.decode
    assert decode is not None and decode.buckets == [1, 2, 4, 8, 16]
    outputs = run_shrinking(engine, prompts)
    assert outputs == [hf[:n] for hf, n in zip(expected, MAX_TOKENS, strict=True)]
    # Every decode step took the padded path, including batches of 7, 5 and 3 (padded).
    assert {b for b, n in decode.num_runs_by_bucket.items() if n} == {1, 2, 4, 8}
    assert sum(decode.num_runs_by_bucket.values()) == max(MAX_TOKENS) - 1
    engine.check_integrity()
    assert engine.kv_manager.usage() == 0.0


def test_compiled_modules_keep_parity(tiny_model_dirs, references):
    """The torch.compile code path (here the "eager" backend: dynamo traces the norms and MLPs
    without generating code, which a CPU test can afford); CUDA tests use inductor."""
    prompts, expected = references["llama"]
    engine = make_engine(tiny_model_dirs["llama"], max_num_seqs=8, compile_backend="eager")
    outputs = run_shrinking(engine, prompts)
    assert outputs == [hf[:n] for hf, n in zip(expected, MAX_TOKENS, strict=True)]


def test_only_pure_decode_steps_that_fit_take_the_padded_path(tiny_model_dirs):
    engine = make_engine(tiny_model_dirs["qwen2"], max_num_seqs=4, max_model_len=64)
    decode = engine.model_runner.decode
    assert decode is not None and decode.width == 4  # 64 tokens / 16 per block
    one = SeqChunk([5], 20, [0, 1], True)
    assert decode.fits([one] * 3)
    assert not decode.fits([one] * 5)  # more lanes than the largest bucket
    assert not decode.fits([one, SeqChunk([5, 6], 20, [0, 1], True)])  # mixed with a prefill
    assert not decode.fits([SeqChunk([5], 20, [0, 1], False)])  # a chunked prefill's piece
    assert not decode.fits([SeqChunk([5], 64, [0, 1, 2, 3, 4], True)])  # wider than the tables


def test_smollm2_padded_decode_matches_hf(smollm2):
    engine = make_engine(smollm2, max_num_seqs=8)
    prompts = [
        engine.apply_chat_template([{"role": "user", "content": "What is 2+2?"}]),
        *mixed_prompts(12, 6, 4, 30),
    ]
    expected = hf_greedy(smollm2.source_dir, prompts, NUM_TOKENS)
    outputs = run_shrinking(engine, prompts)
    assert outputs == [hf[:n] for hf, n in zip(expected, MAX_TOKENS, strict=True)]
    assert engine.model_runner.decode is not None
    assert engine.model_runner.decode.num_runs_by_bucket[8] > 0
