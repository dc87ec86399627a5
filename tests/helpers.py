"""Test helpers: Hugging Face reference generation and engine construction."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine, merge_outputs
from engine.model_loader import LoadedModel, load_model
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams


def parity_device() -> str:
    """Where the parity tests run: ``$TARRY_TEST_DEVICE`` (``bench/gpu_check.sh`` sets
    ``cuda``), else the CPU. The suite never needs a GPU."""
    return os.environ.get("TARRY_TEST_DEVICE", "cpu")


def hf_greedy(
    model_dir: Path, prompts: list[list[int]], num_tokens: int, device: str | None = None
) -> list[list[int]]:
    """``transformers`` ``generate()`` greedy continuations, one prompt at a time (no padding),
    exactly ``num_tokens`` each (EOS suppressed, as our ``min_tokens`` does), on ``device``
    (default ``parity_device()``)."""
    from transformers import AutoModelForCausalLM

    device = device or parity_device()
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), attn_implementation="sdpa")
    model = model.to(device).eval()
    results = []
    with torch.inference_mode():
        for prompt in prompts:
            out = model.generate(
                torch.tensor([prompt], device=device),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long, device=device),
                max_new_tokens=num_tokens,
                min_new_tokens=num_tokens,
                do_sample=False,
                pad_token_id=0,
            )
            results.append(out[0, len(prompt) :].tolist())
    return results


def greedy(num_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=num_tokens, min_tokens=num_tokens)


def make_engine(model: LoadedModel | Path, **config: object) -> LLMEngine:
    """An engine with integrity checks; a model directory is loaded on ``parity_device()``."""
    if isinstance(model, LoadedModel):
        loaded = model
    else:
        loaded = load_model(str(model), dtype="float32", device=parity_device())
    if "num_kv_blocks" not in config:  # a GPU's free memory would be millions of tiny blocks
        config.setdefault("kv_cache_bytes", 1 << 30)
    return LLMEngine(loaded, EngineConfig(check_integrity=True, **config))  # type: ignore[arg-type]


def run_staggered(
    engine: LLMEngine, prompts: list[list[int]], params: SamplingParams, arrivals: list[int]
) -> list[RequestOutput]:
    """Submit prompt ``i`` before step ``arrivals[i]``; run all to completion, in prompt order."""
    merged: dict[str, RequestOutput] = {}
    step_idx = 0
    pending = sorted(range(len(prompts)), key=lambda i: arrivals[i])
    while pending or engine.has_unfinished_requests():
        while pending and arrivals[pending[0]] <= step_idx:
            idx = pending.pop(0)
            engine.add_request(f"r{idx}", prompts[idx], params)
        for out in engine.step():
            merged[out.request_id] = merge_outputs(merged.get(out.request_id), out)
        step_idx += 1
    return [merged[f"r{idx}"] for idx in range(len(prompts))]


def run_all_at_once(
    engine: LLMEngine, prompts: list[list[int]], max_tokens: list[int]
) -> list[list[int]]:
    """Admit every prompt before the first step, prompt ``i`` asking for exactly
    ``max_tokens[i]`` greedy tokens; run all to completion; each one's tokens, in order. With
    different ``max_tokens`` the decode batch shrinks step by step."""
    merged: dict[str, RequestOutput] = {}
    for idx, (prompt, num_tokens) in enumerate(zip(prompts, max_tokens, strict=True)):
        engine.add_request(f"r{idx}", prompt, greedy(num_tokens))
    while engine.has_unfinished_requests():
        for out in engine.step():
            merged[out.request_id] = merge_outputs(merged.get(out.request_id), out)
    return [merged[f"r{idx}"].new_token_ids for idx in range(len(prompts))]


def mixed_prompts(
    seed: int, count: int, min_len: int, max_len: int, shared: list[int] | None = None
) -> list[list[int]]:
    """Seeded random prompts of mixed lengths (ids 100..20000), after an optional shared prefix."""
    gen = torch.Generator().manual_seed(seed)
    prompts = []
    for _ in range(count):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=gen))
        body = torch.randint(100, 20000, (length,), generator=gen).tolist()
        prompts.append([*(shared or []), *body])
    return prompts
