"""A Redis prefix restore runs beside the batch: how long the read takes on the transfer
worker, and what the running batch's steps cost meanwhile.

Engine A computes a long prompt and saves it to Redis; engine B (another instance, same
Redis) decodes one request, then receives the long prompt: its prefix is read from Redis on
the transfer worker while B keeps decoding. Before item 2 of issue 12 that read (plus the
scatter) ran inside the admitting step, so the decode stalled for the whole load. Prints the
load's duration, the decode's step times before and during it, and the restored request's
time to first token and tokens restored. Usage:

    .venv/bin/python bench/async_restore_bench.py [--prompt-tokens 1500] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import redis
from local_redis import local_redis

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.model_loader import LoadedModel, load_model
from engine.sampling_params import SamplingParams
from sessions.tiers import RedisKVStore


def instance(loaded: LoadedModel, url: str, num_blocks: int) -> LLMEngine:
    engine = LLMEngine(loaded, EngineConfig(num_kv_blocks=num_blocks))
    store = RedisKVStore(
        redis.Redis.from_url(url),
        engine.fingerprint,
        dtype=loaded.dtype,
        block_shape=engine.kv_block_shape,
    )
    engine.attach_kv_store(store)
    return engine


def one_round(loaded: LoadedModel, url: str, prompt: list[int], seed: int) -> dict[str, float]:
    redis.Redis.from_url(url).flushall()
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    blocks = len(prompt) // 16 + 4
    writer = instance(loaded, url, blocks)
    writer.generate([prompt], params)
    writer.save_tokens(prompt)
    writer.offload.readable_store()
    engine = instance(loaded, url, 2 * blocks + 64)
    engine.add_request("decode", [100 + seed, 200, 300, 400], SamplingParams(max_tokens=400))
    before: list[float] = []
    for _ in range(8):
        started = time.perf_counter()
        engine.step()
        before.append(time.perf_counter() - started)
    arrived = time.perf_counter()
    engine.add_request("long", prompt, params)
    during: list[float] = []
    ttft = restored = 0.0
    while True:
        started = time.perf_counter()
        outputs = engine.step()
        if engine.offload.num_loading:
            during.append(time.perf_counter() - started)
        long_out = [out for out in outputs if out.request_id == "long"]
        if long_out:
            ttft = time.perf_counter() - arrived
            restored = long_out[0].num_restored_tokens
            break
    load = engine.offload.last_load_s
    engine.abort_request("decode")
    return {
        "load_ms": load * 1e3,
        "step_before_ms": statistics.median(before) * 1e3,
        "steps_during": len(during),
        "step_during_ms": statistics.median(during) * 1e3 if during else 0.0,
        "ttft_ms": ttft * 1e3,
        "restored": restored,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-tokens", type=int, default=1500)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    loaded = load_model(None, dtype="float32", device="cpu")
    prompt = [100 + (i * 7919) % 19000 for i in range(args.prompt_tokens)]
    with local_redis() as url:
        for round_idx in range(args.rounds):
            r = one_round(loaded, url, prompt, round_idx)
            print(
                f"round {round_idx}: load {r['load_ms']:.0f} ms on the worker; decode step "
                f"median {r['step_before_ms']:.0f} ms before, {r['step_during_ms']:.0f} ms "
                f"during ({r['steps_during']} steps); restored request TTFT "
                f"{r['ttft_ms']:.0f} ms, {r['restored']:.0f} tokens restored",
                flush=True,
            )


if __name__ == "__main__":
    main()
