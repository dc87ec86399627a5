"""Host overhead of one engine decode step, on a deep but narrow random model.

    python -m bench.step_overhead                     # CPU: 30 layers, hidden 64, batch 1 and 32
    python -m bench.step_overhead --profile 25        # plus cProfile's top 25 of each batch
    python -m bench.step_overhead --device cuda --dtype bfloat16 --full-width
                                                      # GPU: SmolLM2-135M's full shape

The model has SmolLM2-135M's depth (30 layers) and vocabulary (49152) but, by default, a tiny
width, so on a CPU the matmuls cost next to nothing and a step's time is what the engine spends
around them: scheduling, metadata, per-layer dispatch, sampling over the vocabulary,
detokenizing. ``--full-width`` takes every size from the tokenizer directory's ``config.json``
(SmolLM2's) instead. Weights are random (seeded); decode speed does not depend on them.

Each batch size runs its own requests (random prompts, greedy, ``ignore_eos``): the prefill
steps are run first and not timed, then ``--tokens`` decode steps are timed one by one. Prints
the mean and median step time and the decode rate; with ``--profile N``, the top ``N`` entries
of a cProfile of the decode steps sorted by cumulative and by own time. There is no baseline
in-process: to compare two versions, run this file from a checkout of each, on the same machine
(``git archive HEAD | tar -x -C /tmp/base`` gives one without touching the working tree).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import tempfile
import time
from pathlib import Path

import torch

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.model_loader import load_model, resolve_model_dir
from engine.sampling_params import SamplingParams

TINY_WIDTH = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4}
GPU_ASSETS_TOKENIZER = Path(".gpu/smollm2")  # see bench/gpu_check.sh


def default_tokenizer_dir() -> Path:
    """SmolLM2's tokenizer: the GPU assets copy if present, else the embedded model's dir."""
    if (GPU_ASSETS_TOKENIZER / "tokenizer.json").is_file():
        return GPU_ASSETS_TOKENIZER
    return resolve_model_dir(None)[1]


def write_model(tokenizer_dir: Path, target: Path, layers: int, full_width: bool) -> Path:
    """Save a seeded random Llama with SmolLM2's vocabulary and ``layers`` layers (tiny width
    unless ``full_width``) plus the tokenizer of ``tokenizer_dir`` to ``target``."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    base = json.loads((tokenizer_dir / "config.json").read_text())
    sizes = {"num_key_value_heads": 2, **TINY_WIDTH}
    if full_width:
        sizes = {key: base[key] for key in (*TINY_WIDTH, "num_key_value_heads")}
    config = LlamaConfig(
        vocab_size=base.get("vocab_size", 49152),
        num_hidden_layers=layers,
        max_position_embeddings=2048,
        tie_word_embeddings=base.get("tie_word_embeddings", True),
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        **sizes,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(target)
    AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(target)
    return target


def start_batch(engine: LLMEngine, batch: int, prompt_len: int, num_tokens: int) -> None:
    """Admit ``batch`` greedy requests and run their prefill steps (untimed)."""
    gen = torch.Generator().manual_seed(batch)
    params = SamplingParams(temperature=0.0, max_tokens=num_tokens + 1, ignore_eos=True)
    for idx in range(batch):
        prompt = torch.randint(100, 20000, (prompt_len,), generator=gen).tolist()
        engine.add_request(f"b{batch}-{idx}-{time.monotonic_ns()}", prompt, params)
    while engine.scheduler.waiting or any(
        r.num_output_tokens == 0 for r in engine.scheduler.running
    ):
        engine.step()


def timed_steps(engine: LLMEngine, num_steps: int, device: torch.device) -> list[float]:
    """Seconds of each of ``num_steps`` engine steps (synchronised on CUDA)."""
    return [wall for wall, _ in timed_steps_cpu(engine, num_steps, device)]


def timed_steps_cpu(
    engine: LLMEngine, num_steps: int, device: torch.device
) -> list[tuple[float, float]]:
    """(wall seconds, process CPU seconds) of each of ``num_steps`` engine steps. CPU time is
    the steadier figure on a shared machine: other processes stretch the wall time only."""
    times = []
    for _ in range(num_steps):
        start, start_cpu = time.perf_counter(), time.process_time()
        engine.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start, time.process_time() - start_cpu))
    return times


def run_batch(engine: LLMEngine, batch: int, args: argparse.Namespace) -> None:
    """Time (and optionally profile) ``args.tokens`` decode steps of ``batch`` requests."""
    start_batch(engine, batch, args.prompt_len, args.tokens)
    timed_steps(engine, args.warmup, engine.model_runner.device)
    pairs = timed_steps_cpu(engine, args.tokens - args.warmup, engine.model_runner.device)
    times = [wall for wall, _ in pairs]
    mean_ms, median_ms = 1000 * statistics.mean(times), 1000 * statistics.median(times)
    cpu_ms = 1000 * statistics.median(cpu for _, cpu in pairs)
    print(
        f"batch {batch:3d}: step mean {mean_ms:7.2f} ms  median {median_ms:7.2f} ms  "
        f"CPU median {cpu_ms:7.2f} ms  decode {batch * 1000 / mean_ms:8.1f} tok/s  "
        f"({len(times)} steps)",
        flush=True,
    )
    while engine.has_unfinished_requests():
        engine.step()
    if args.profile:
        start_batch(engine, batch, args.prompt_len, args.tokens)
        profiler = cProfile.Profile()
        profiler.runcall(timed_steps, engine, args.tokens, engine.model_runner.device)
        for key in ("cumulative", "tottime"):
            print(f"--- batch {batch}: cProfile of {args.tokens} decode steps, by {key}")
            pstats.Stats(profiler).sort_stats(key).print_stats(args.profile)
        while engine.has_unfinished_requests():
            engine.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="default: float32 on CPU, bf16 on CUDA")
    parser.add_argument("--tokenizer", type=Path, default=None, help="dir with config.json")
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--full-width", action="store_true", help="the tokenizer dir's sizes")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--tokens", type=int, default=64, help="decode steps per batch")
    parser.add_argument("--warmup", type=int, default=8, help="of which untimed")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--profile", type=int, default=0, help="print cProfile's top N")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("step_overhead: --device cuda asked for, but no GPU is present")
        return
    with tempfile.TemporaryDirectory(prefix="step-overhead-") as tmp:
        tokenizer_dir = args.tokenizer or default_tokenizer_dir()
        model_dir = write_model(tokenizer_dir, Path(tmp) / "model", args.layers, args.full_width)
        loaded = load_model(str(model_dir), dtype=args.dtype, device=args.device)
        engine = LLMEngine(
            loaded,
            EngineConfig(kv_cache_bytes=256 << 20, max_num_batched_tokens=4096, max_num_seqs=64),
        )
        config = loaded.config
        print(
            f"random Llama: {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
            f"vocab {config.vocab_size}, {loaded.dtype} on {loaded.device}, "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads",
            flush=True,
        )
        for batch in args.batch:
            run_batch(engine, batch, args)


if __name__ == "__main__":
    main()
