"""Helpers for session tests: build a served stack, run turns, check against fresh recompute."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

import redis

from engine.async_engine import AsyncEngine
from engine.config import EngineConfig
from engine.kv_store import KVStore
from engine.llm_engine import LLMEngine
from engine.model_loader import LoadedModel, load_model
from engine.sampling_params import SamplingParams
from sessions.manager import SessionManager
from sessions.policy import PausePolicy
from sessions.record_store import MemoryRecordStore, RedisRecordStore
from sessions.session import Session
from sessions.tiers.factory import build_kv_store

PARAMS = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


@dataclass
class Stack:
    """One 'server': engine, async engine and session manager (and its stores)."""

    engine: LLMEngine
    async_engine: AsyncEngine
    manager: SessionManager
    store: KVStore | None

    def stop(self) -> None:
        self.manager.check_integrity()
        self.async_engine.shutdown()


def build_stack(
    model: Path | LoadedModel,
    tiers: str = "host+redis",
    redis_url: str | None = None,
    policy: PausePolicy | None = None,
    **config: object,
) -> Stack:
    """tiers: "" (device only), "host", "redis" or "host+redis"."""
    loaded = model if isinstance(model, LoadedModel) else load_model(str(model), device="cpu")
    engine = LLMEngine(loaded, EngineConfig(check_integrity=True, **config))  # type: ignore[arg-type]
    client = redis.Redis.from_url(redis_url) if redis_url else None
    store = build_kv_store(
        engine,
        host_capacity_bytes=(256 << 20) if "host" in tiers else None,
        redis_client=client if "redis" in tiers else None,
    )
    engine.attach_kv_store(store)
    async_engine = AsyncEngine(engine)
    async_engine.start()
    records = RedisRecordStore(client) if client is not None else MemoryRecordStore()
    manager = SessionManager(async_engine, records, policy or PausePolicy())
    return Stack(engine, async_engine, manager, store)


def run_turn(
    stack: Stack,
    session: Session,
    user_text: str | None,
    params: SamplingParams = PARAMS,
    waiting_for_tool: bool = False,
) -> list[int]:
    """Append a user message (if given), generate, return the generated token ids."""
    if user_text is not None:
        stack.manager.append(session, [{"role": "user", "content": user_text}])

    async def consume() -> list[int]:
        produced: list[int] = []
        async for out in stack.manager.generate(session, params, waiting_for_tool):
            produced += out.new_token_ids
        return produced

    return asyncio.run(consume())


def last_prompt(session: Session) -> list[int]:
    """The prompt token ids of the session's last turn."""
    return session.token_ids[: len(session.token_ids) - session.last_usage.completion_tokens]


def fresh_recompute(
    loaded: LoadedModel, prompt: list[int], params: SamplingParams = PARAMS
) -> list[int]:
    """The same prompt on a brand-new engine: no prefix cache, no tiers."""
    engine = LLMEngine(loaded, EngineConfig(enable_prefix_caching=False, num_kv_blocks=512))
    try:
        return engine.generate([prompt], params)[0].new_token_ids
    finally:
        engine.close()


def drop_device_cache(stack: Stack, session: Session) -> None:
    """Release the session's pin and forget every cached block on the device."""
    stack.async_engine.run_exclusive(stack.engine.unpin, session.session_id)
    stack.async_engine.run_exclusive(stack.engine.reset_prefix_cache)
