"""Write-back on eviction vs write-through after each request, on an agent-like workload.

Plain requests (no sessions, as most agent frameworks send them): A agents x T turns, each
turn re-sends the agent's whole history plus a new tool result, on a device pool too small to
keep every agent's context. Both runs use a host tier of the same size:

- write-back (what the engine does): a cached block is written to the host tier when the pool
  evicts it, once per content hash;
- write-through (emulated here): additionally, every finished request's full blocks are
  written right away (``LLMEngine.save_tokens``), whether or not they are ever evicted.

Prints, for each: wall time, tokens written to the tier, prompt tokens restored from it and
recomputed. Usage:

    .venv/bin/python bench/tier_write_policy.py [--agents 6 --turns 5 --pool-tokens 3072]
        [--rounds 2]   (alternates the order each round)
"""

from __future__ import annotations

import argparse
import random
import time

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.model_loader import LoadedModel, load_model
from engine.sampling_params import SamplingParams
from sessions.tiers import HostKVStore

WORDS = [
    "tool",
    "result",
    "line",
    "value",
    "status",
    "ok",
    "error",
    "retry",
    "file",
    "path",
    "count",
    "total",
]


def text(rng: random.Random, num_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(num_words))


def run(loaded: LoadedModel, args: argparse.Namespace, write_through: bool) -> dict[str, float]:
    block_size = 16
    engine = LLMEngine(loaded, EngineConfig(num_kv_blocks=args.pool_tokens // block_size))
    engine.attach_kv_store(HostKVStore(capacity_bytes=1 << 30))
    params = SamplingParams(temperature=0.0, max_tokens=args.output_tokens, ignore_eos=True)
    rng = random.Random(0)
    system = text(rng, args.system_words)
    histories = [[{"role": "system", "content": system}] for _ in range(args.agents)]
    prompt_tokens = recomputed = 0
    started = time.perf_counter()
    for turn in range(args.turns):
        prompts = []
        for agent, history in enumerate(histories):
            history.append(
                {
                    "role": "user",
                    "content": f"agent {agent} turn {turn}: " + text(rng, args.tool_words),
                }
            )
            prompts.append(engine.apply_chat_template(history))
        outputs = engine.generate(prompts, params)
        for history, prompt, out in zip(histories, prompts, outputs, strict=True):
            history.append({"role": "assistant", "content": out.new_text})
            prompt_tokens += len(prompt)
            recomputed += len(prompt) - out.num_cached_tokens
            if write_through:
                engine.save_tokens([*prompt, *out.new_token_ids])
    engine.offload.readable_store()  # count the writes still in flight
    return {
        "wall_s": time.perf_counter() - started,
        "written_tokens": engine.num_saved_tokens,
        "restored_tokens": engine.num_restored_tokens,
        "prompt_tokens": prompt_tokens,
        "recomputed_tokens": recomputed,
        "evictions": engine.kv_manager.pool.num_evictions,
        "preemptions": engine.scheduler.num_preemptions,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=6)
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--pool-tokens", type=int, default=3072)
    parser.add_argument("--system-words", type=int, default=300)
    parser.add_argument("--tool-words", type=int, default=120)
    parser.add_argument("--output-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=1, help="alternate the two this often")
    args = parser.parse_args()
    loaded = load_model(None, dtype="float32", device="cpu")
    run(loaded, argparse.Namespace(**{**vars(args), "agents": 1, "turns": 1}), False)  # warm-up
    order = (("write-back", False), ("write-through", True))
    for round_idx in range(args.rounds):
        for name, write_through in order if round_idx % 2 == 0 else order[::-1]:
            r = run(loaded, args, write_through)
            print(
                f"{name:>13}: wall {r['wall_s']:.1f} s, written {r['written_tokens']} tokens, "
                f"restored {r['restored_tokens']}, recomputed {r['recomputed_tokens']} of "
                f"{r['prompt_tokens']} prompt tokens; {r['evictions']} evictions, "
                f"{r['preemptions']} preemptions",
                flush=True,
            )


if __name__ == "__main__":
    main()
