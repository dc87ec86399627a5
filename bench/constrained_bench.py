"""Per-token cost of the forced-tool-call logits processor against a plain decode step.

Runs SmolLM2-135M (CPU, float32, greedy) on one prompt twice: unconstrained and with
``tool_choice`` naming a function, and prints the processor's time per token next to the
engine's time per decode step.
Usage: ``OMP_NUM_THREADS=1 .venv/bin/python bench/constrained_bench.py``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from engine.llm_engine import LLMEngine, merge_outputs
from engine.model_loader import load_model
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from tools.constrained import ToolCallConstrainer, ToolCallLogitsProcessor

PLAN_TOOL = {
    "type": "function",
    "function": {
        "name": "make_plan",
        "parameters": {
            "type": "object",
            "properties": {
                "title": {"type": "string"},
                "steps": {"type": "array", "items": {"type": "string"}},
                "budget": {"type": "number"},
                "urgent": {"type": "boolean"},
            },
            "required": ["title", "steps", "budget", "urgent"],
        },
    },
}


class TimedProcessor:
    """Wraps a processor and accumulates the time spent in it."""

    def __init__(self, inner: ToolCallLogitsProcessor) -> None:
        self.inner = inner
        self.seconds = 0.0
        self.num_calls = 0

    def __call__(self, output_token_ids: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        result = self.inner(output_token_ids, logits)
        self.seconds += time.perf_counter() - start
        self.num_calls += 1
        return result


def run_one(engine: LLMEngine, prompt: list[int], params: SamplingParams) -> RequestOutput:
    engine.add_request("bench", prompt, params)
    merged = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            merged = merge_outputs(merged, out)
    assert merged is not None
    return merged


def main() -> None:
    torch.set_num_threads(1)
    loaded = load_model(None)
    engine = LLMEngine(loaded)
    start = time.perf_counter()
    constrainer = ToolCallConstrainer(
        loaded.tokenizer, loaded.config.vocab_size, sorted(engine.eos_token_ids)
    )
    setup_s = time.perf_counter() - start
    messages = [{"role": "user", "content": "Plan a birthday party for my sister."}]
    prompt = engine.apply_chat_template(messages, tools=[PLAN_TOOL])

    run_one(engine, prompt, SamplingParams(temperature=0.0, max_tokens=4))  # warm-up
    plain_params = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
    start = time.perf_counter()
    plain = run_one(engine, prompt, plain_params)  # prompt cached by the warm-up
    plain_ms = 1000 * (time.perf_counter() - start) / len(plain.new_token_ids)

    start = time.perf_counter()
    base = constrainer.processor_for([PLAN_TOOL], "make_plan")
    compile_ms = 1000 * (time.perf_counter() - start)
    assert base is not None
    processor = TimedProcessor(base)
    forced_params = SamplingParams(temperature=0.0, max_tokens=256, logits_processors=[processor])
    start = time.perf_counter()
    forced = run_one(engine, prompt, forced_params)
    forced_ms = 1000 * (time.perf_counter() - start) / len(forced.new_token_ids)

    calls = processor.num_calls
    print(f"tokenizer setup (once per tokenizer): {1000 * setup_s:.0f} ms")
    print(f"grammar compile + processor (once per tool set): {compile_ms:.1f} ms")
    print(f"plain decode: {plain_ms:.1f} ms/token over {len(plain.new_token_ids)} tokens")
    print(f"forced call:  {forced_ms:.1f} ms/token over {len(forced.new_token_ids)} tokens")
    print(f"processor: {1000 * processor.seconds / calls:.3f} ms/token over {calls} tokens")
    print(f"output: {forced.new_text}")


if __name__ == "__main__":
    main()
