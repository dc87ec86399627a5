"""CUDA graphs of padded decode steps (``engine.decode_graph``): one graph per bucket, replayed
for every pure-decode step, token-identical to the same engine without graphs and to Hugging
Face ``generate()`` on the GPU; with torch.compile (inductor) too. CUDA only, so
they live outside the CPU suite: ``bench/gpu_check.sh`` runs them on a GPU machine (the
tiny-model fixtures come from ``tests.conftest`` through this folder's conftest)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.model_loader import load_model
from tests.conftest import TINY_ARCHITECTURES
from tests.helpers import greedy, hf_greedy, mixed_prompts, run_all_at_once, run_staggered

if not torch.cuda.is_available():  # not part of the CPU suite (tests/): never silently skipped
    raise RuntimeError("these CUDA graph tests need a CUDA device; run bench/gpu_check.sh on one")

NUM_TOKENS = 12
MAX_TOKENS = [12, 5, 9, 3, 11, 7, 10]  # the batch shrinks through 7, 6, ..., 1 (buckets 8..1)


def cuda_engine(model_dir: Path, **config: object) -> LLMEngine:
    loaded = load_model(str(model_dir), dtype="float32", device="cuda")
    settings = EngineConfig(
        kv_cache_bytes=1 << 30,
        max_num_seqs=16,
        check_integrity=True,
        **config,  # type: ignore[arg-type]
    )
    return LLMEngine(loaded, settings)


@pytest.fixture(scope="module")
def references(tiny_model_dirs: dict[str, Path]) -> dict[str, tuple[list[list[int]], list]]:
    """Per architecture: 7 prompts of 3..40 tokens and HF's greedy continuations on CUDA."""
    prompts = mixed_prompts(11, 7, 3, 40)
    return {
        arch: (prompts, hf_greedy(model_dir, prompts, NUM_TOKENS, device="cuda"))
        for arch, model_dir in tiny_model_dirs.items()
    }


@pytest.mark.parametrize("arch", sorted(TINY_ARCHITECTURES))
def test_graphs_match_eager_and_hf(arch, tiny_model_dirs, references):
    prompts, expected = references[arch]
    expected = [hf[:n] for hf, n in zip(expected, MAX_TOKENS, strict=True)]
    graphed = cuda_engine(tiny_model_dirs[arch])
    decode = graphed.model_runner.decode
    assert decode is not None and sorted(decode.graphs) == decode.buckets == [1, 2, 4, 8, 16]
    assert run_all_at_once(graphed, prompts, MAX_TOKENS) == expected
    assert {b for b, n in decode.num_runs_by_bucket.items() if n} == {1, 2, 4, 8}
    graphed.check_integrity()

    eager = cuda_engine(tiny_model_dirs[arch], enforce_eager=True)
    assert eager.model_runner.decode is not None and not eager.model_runner.decode.graphs
    assert run_all_at_once(eager, prompts, MAX_TOKENS) == expected


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_graphs_between_mixed_steps_match_hf(arch, tiny_model_dirs, references):
    """Staggered arrivals: prefill and mixed steps run eagerly between graph replays."""
    prompts, expected = references[arch]
    engine = cuda_engine(tiny_model_dirs[arch])
    outputs = run_staggered(engine, prompts, greedy(NUM_TOKENS), arrivals=[0, 1, 1, 3, 4, 4, 6])
    assert [o.new_token_ids for o in outputs] == expected
    assert engine.model_runner.decode is not None
    assert sum(engine.model_runner.decode.num_runs_by_bucket.values()) > 0
    assert engine.kv_manager.usage() == 0.0


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_compiled_graphs_match_hf(arch, tiny_model_dirs, references):
    prompts, expected = references[arch]
    engine = cuda_engine(tiny_model_dirs[arch], compile_backend="inductor")
    assert engine.model_runner.decode is not None and engine.model_runner.decode.graphs
    outputs = run_all_at_once(engine, prompts, MAX_TOKENS)
    assert outputs == [hf[:n] for hf, n in zip(expected, MAX_TOKENS, strict=True)]
