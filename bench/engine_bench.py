"""Engine throughput and latency on SmolLM2, against Hugging Face ``generate()`` in the same run.

    python bench/engine_bench.py                 # CPU: decode, prefill, 16 concurrent, prefix hit
    python bench/engine_bench.py --device cuda --gpu-decode   # GPU: decode batch 1 and 32,
                                                              # host time per step at batch 32

Every figure is printed next to what it is compared with; ratios come from the same process.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.model_loader import LoadedModel, load_model
from engine.sampling_params import SamplingParams


def random_prompt(length: int, seed: int) -> list[int]:
    return torch.randint(
        100, 20000, (length,), generator=torch.Generator().manual_seed(seed)
    ).tolist()


def timed(fn: Callable[[], object]) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


class HFBaseline:
    """``transformers`` on the same weights, sdpa attention, one request at a time."""

    def __init__(self, loaded: LoadedModel, cache_implementation: str | None = None) -> None:
        from transformers import AutoModelForCausalLM

        self.model = (
            AutoModelForCausalLM.from_pretrained(
                str(loaded.source_dir), dtype=loaded.dtype, attn_implementation="sdpa"
            )
            .to(loaded.device)
            .eval()
        )
        self.device = loaded.device
        self.cache_implementation = cache_implementation

    @torch.inference_mode()
    def generate(self, prompt: list[int], num_tokens: int, batch: int = 1) -> None:
        ids = torch.tensor([prompt] * batch, device=self.device)
        kwargs = (
            {"cache_implementation": self.cache_implementation} if self.cache_implementation else {}
        )
        self.model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=num_tokens,
            min_new_tokens=num_tokens,
            do_sample=False,
            pad_token_id=0,
            **kwargs,
        )

    @torch.inference_mode()
    def prefill(self, prompt: list[int]) -> None:
        self.model(torch.tensor([prompt], device=self.device))

    def decode_tok_s(self, prompt: list[int], num_tokens: int, batch: int = 1) -> float:
        """Decode tokens per second (all sequences), prefill time subtracted."""
        if self.cache_implementation is None:
            self.generate(prompt, 4, batch)  # warm-up
        else:  # a static cache is compiled per shape: warm up exactly the shapes timed below
            self.generate(prompt, 1, batch)
            self.generate(prompt, num_tokens, batch)
        with_prefill = timed(lambda: self.generate(prompt, 1, batch))
        total = timed(lambda: self.generate(prompt, num_tokens, batch))
        return batch * (num_tokens - 1) / (total - with_prefill)


def engine_decode_tok_s(engine: LLMEngine, prompts: list[list[int]], num_tokens: int) -> float:
    """Decode tokens per second over all requests, from the step after the last first token."""
    params = SamplingParams(temperature=0.0, max_tokens=num_tokens, ignore_eos=True)
    engine.generate([prompts[0]], SamplingParams(temperature=0.0, max_tokens=4))  # warm-up
    for idx, prompt in enumerate(prompts):
        engine.add_request(f"decode-{idx}-{time.monotonic()}", prompt, params)
    while (
        any(r.num_output_tokens == 0 for r in engine.scheduler.running) or engine.scheduler.waiting
    ):
        engine.step()
    start, produced = time.perf_counter(), 0
    while engine.has_unfinished_requests():
        produced += sum(len(o.new_token_ids) for o in engine.step())
    return produced / (time.perf_counter() - start)


def engine_ttft(engine: LLMEngine, prompt: list[int]) -> float:
    """Seconds from submission to the first sampled token."""
    request_id = f"ttft-{time.monotonic()}"
    start = time.perf_counter()
    engine.add_request(request_id, prompt, SamplingParams(temperature=0.0, max_tokens=1))
    while engine.has_unfinished_requests():
        engine.step()
    return time.perf_counter() - start


def report(label: str, ours: float, theirs: float, unit: str, target: str) -> None:
    ratio = ours / theirs if theirs else float("inf")
    print(
        f"{label:<44} tarry {ours:9.2f} {unit:<6} HF {theirs:9.2f} {unit:<6} "
        f"ratio {ratio:6.2f}x  (target {target})",
        flush=True,
    )


def cpu_suite(loaded: LoadedModel, num_hf_sequential: int) -> None:
    hf = HFBaseline(loaded)
    engine = LLMEngine(loaded, EngineConfig(max_num_batched_tokens=2048, max_num_seqs=64))

    decode_prompt = random_prompt(64, 0)
    report(
        "single-request decode (64-token prompt)",
        engine_decode_tok_s(engine, [decode_prompt], 128),
        hf.decode_tok_s(decode_prompt, 128),
        "tok/s",
        ">= 0.9x",
    )

    for length in (512, 2048):
        prompt = random_prompt(length, length)
        hf.prefill(prompt[:64])
        hf_tok_s = length / timed(lambda p=prompt: hf.prefill(p))
        engine.reset_prefix_cache()
        ours_tok_s = length / engine_ttft(engine, prompt)
        report(f"prefill {length} tokens", ours_tok_s, hf_tok_s, "tok/s", "report")

    prompts = [random_prompt(256, 100 + i) for i in range(16)]
    params = SamplingParams(temperature=0.0, max_tokens=128, ignore_eos=True)
    start = time.perf_counter()
    outputs = engine.generate(prompts, params)
    ours = sum(o.num_output_tokens for o in outputs) / (time.perf_counter() - start)
    hf_elapsed = sum(timed(lambda p=p: hf.generate(p, 128)) for p in prompts[:num_hf_sequential])
    hf_rate = num_hf_sequential * 128 / hf_elapsed
    report(
        f"16 concurrent x (256 in + 128 out) [HF: {num_hf_sequential} sequential]",
        ours,
        hf_rate,
        "tok/s",
        ">= 2.5x and >= 55 tok/s",
    )

    shared = random_prompt(2048, 7)
    engine.reset_prefix_cache()
    cold = engine_ttft(engine, shared + random_prompt(50, 8))
    engine_ttft(engine, shared + random_prompt(50, 9))  # the prefix is now cached
    warm = engine_ttft(engine, shared + random_prompt(50, 10))
    print(
        f"{'prefix-hit TTFT (2048 shared + 50 new)':<44} hit {warm * 1000:9.1f} ms    "
        f"miss {cold * 1000:9.1f} ms    speed-up {cold / warm:6.1f}x  (target >= 10x)"
    )


def step_host_ms(engine: LLMEngine, prompts: list[list[int]], num_steps: int) -> str:
    """Per-step host time of decode steps of ``len(prompts)`` requests: the mean wall time of a
    synchronised step minus the GPU time of one replay of the bucket's CUDA graph (the host
    waits for that replay in sampling; everything else in the step is host work)."""
    params = SamplingParams(temperature=0.0, max_tokens=num_steps + 16, ignore_eos=True)
    for idx, prompt in enumerate(prompts):
        engine.add_request(f"host-{idx}-{time.monotonic()}", prompt, params)
    while (
        any(r.num_output_tokens == 0 for r in engine.scheduler.running) or engine.scheduler.waiting
    ):
        engine.step()
    times = []
    for _ in range(num_steps):
        times.append(timed(engine.step))
    step_ms = 1000 * sum(times[4:]) / len(times[4:])
    decode = engine.model_runner.decode
    batch = len(prompts)
    if decode is None or batch not in decode.graphs:
        result = f"step {step_ms:.2f} ms (no CUDA graph for this batch: GPU time not separated)"
    else:
        gpu_ms = decode.replay_gpu_ms(batch)
        result = (
            f"host {step_ms - gpu_ms:.2f} ms = step {step_ms:.2f} ms - GPU replay {gpu_ms:.3f} ms"
        )
    while engine.has_unfinished_requests():
        engine.step()
    return result


def gpu_decode_suite(loaded: LoadedModel, enforce_eager: bool, compile_backend: str | None) -> None:
    """The three figures of issue 16, all from this run: batch-1 decode vs HF's static-cache
    ``generate()``, batch-32 decode vs HF batch 1, per-step host time at batch 32."""
    hf = HFBaseline(loaded, cache_implementation="static")
    prompt = random_prompt(256, 0)
    hf_batch1 = hf.decode_tok_s(prompt, 128)
    del hf
    torch.cuda.empty_cache()
    started = time.perf_counter()
    engine = LLMEngine(
        loaded,
        EngineConfig(
            max_num_batched_tokens=8192,
            max_num_seqs=64,
            enforce_eager=enforce_eager,
            compile_backend=compile_backend,
        ),
    )
    decode = engine.model_runner.decode
    print(
        f"engine ready in {time.perf_counter() - started:.1f}s: "
        f"{len(decode.graphs) if decode else 0} CUDA graphs "
        f"(buckets {decode.buckets if decode else []}), compile {compile_backend}",
        flush=True,
    )
    ours1 = engine_decode_tok_s(engine, [prompt], 128)
    prompts = [random_prompt(256, i) for i in range(32)]
    ours32 = engine_decode_tok_s(engine, prompts, 128)
    host32 = step_host_ms(engine, prompts, 40)
    print("FIGURES (issue 16 targets):")
    report("1. decode batch 1 vs HF static-cache generate()", ours1, hf_batch1, "tok/s", ">= 1x")
    report("2. decode batch 32 vs HF batch 1", ours32, hf_batch1, "tok/s", ">= 10x")
    print(f"{'3. per-step host time, decode batch 32':<44} {host32}  (target host < 3 ms)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model path (default: the embedded one)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--gpu-decode", action="store_true", help="decode batch 1/32 on a GPU")
    parser.add_argument("--enforce-eager", action="store_true", help="--gpu-decode: no graphs")
    parser.add_argument("--compile", action="store_true", help="--gpu-decode: torch.compile")
    parser.add_argument(
        "--hf-sequential",
        type=int,
        default=4,
        help="HF requests run one after another for the 16-request baseline rate",
    )
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("engine_bench: --device cuda asked for, but no GPU is present")
        return
    loaded = load_model(args.model, dtype=args.dtype, device=args.device)
    print(
        f"model {loaded.name} dtype {loaded.dtype} device {loaded.device} "
        f"torch threads {torch.get_num_threads()}",
        flush=True,
    )
    if args.gpu_decode:
        gpu_decode_suite(loaded, args.enforce_eager, "inductor" if args.compile else None)
    else:
        cpu_suite(loaded, args.hf_sequential)


if __name__ == "__main__":
    main()
