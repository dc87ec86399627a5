"""Test helpers: Hugging Face reference generation and engine construction."""

from __future__ import annotations

from pathlib import Path

import torch

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine, merge_outputs
from engine.model_loader import LoadedModel, load_model
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams


def hf_greedy(model_dir: Path, prompts: list[list[int]], num_tokens: int) -> list[list[int]]:
    """``transformers`` ``generate()`` greedy continuations, one prompt at a time (no padding),
    exactly ``num_tokens`` each (EOS suppressed, as our ``min_tokens`` does)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), attn_implementation="sdpa").eval()
    results = []
    with torch.inference_mode():
        for prompt in prompts:
            out = model.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
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
    loaded = model if isinstance(model, LoadedModel) else load_model(str(model), device="cpu")
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
