"""Sessions: every reuse path is token-identical to a fresh recompute, and KV really is reused.

Uses a real redis-server (started by the ``redis_server`` fixture) and a tiny Llama.
"""

from __future__ import annotations

import logging

import pytest
import redis

from engine.model_loader import load_model
from sessions.errors import (
    HistoryTooLongError,
    InvalidSessionInputError,
    SessionAccessError,
    SessionBusyError,
    SessionClosedError,
    SessionNotFoundError,
)
from sessions.policy import PauseDecision, PausePolicy
from sessions.prompt import common_prefix_len
from sessions.session import SessionState
from tests.session_helpers import (
    PARAMS,
    build_stack,
    drop_device_cache,
    fresh_recompute,
    last_prompt,
    run_turn,
)

BLOCK = 16
SYSTEM = "You are a careful assistant. " * 12


@pytest.fixture(scope="module")
def tiny(tiny_model_dirs):
    return load_model(str(tiny_model_dirs["llama"]), device="cpu")


@pytest.fixture
def stack(tiny, redis_server):
    redis.Redis.from_url(redis_server).flushall()
    built = build_stack(tiny, "host+redis", redis_server)
    yield built
    built.stop()


def _history_full_block_tokens(session_tokens_before: int) -> int:
    return session_tokens_before // BLOCK * BLOCK


def _two_turns(stack, tiny, between=None):
    session = stack.manager.create("alice", instructions=SYSTEM)
    run_turn(stack, session, "Tell me about tea.")
    history = len(session.token_ids)
    if between is not None:
        between(session)
    produced = run_turn(stack, session, "And coffee?")
    assert produced == fresh_recompute(tiny, last_prompt(session))
    assert session.last_usage.prompt_tokens > history
    return session, history


def test_resume_after_pause_keeps_kv_on_device(stack, tiny):
    def forget_unpinned_blocks(session):
        # A tool pause keeps the context pinned: only the pin can keep its KV on the device.
        assert session.state is SessionState.PAUSED
        assert stack.engine.is_pinned(session.session_id)
        stack.async_engine.run_exclusive(stack.engine.reset_prefix_cache)

    session = stack.manager.create("alice", instructions=SYSTEM)
    run_turn(stack, session, "Tell me about tea.", waiting_for_tool=True)
    history = len(session.token_ids)
    forget_unpinned_blocks(session)
    produced = run_turn(stack, session, "And coffee?")
    assert produced == fresh_recompute(tiny, last_prompt(session))
    assert session.last_usage.cached_tokens >= _history_full_block_tokens(history)
    assert session.last_usage.restored_tokens == 0


def test_resume_after_host_offload_restores_from_host(tiny):
    stack = build_stack(tiny, "host")
    try:

        def offload(session):
            stack.manager.offload(session)
            assert session.state is SessionState.OFFLOADED
            drop_device_cache(stack, session)

        session, history = _two_turns(stack, tiny, offload)
        assert session.last_usage.restored_tokens >= _history_full_block_tokens(history)
        assert session.last_usage.cached_tokens >= _history_full_block_tokens(history)
    finally:
        stack.stop()


def test_resume_after_redis_round_trip(tiny, redis_server):
    redis.Redis.from_url(redis_server).flushall()
    stack = build_stack(tiny, "redis", redis_server)
    try:

        def offload(session):
            stack.manager.offload(session)
            drop_device_cache(stack, session)

        session, history = _two_turns(stack, tiny, offload)
        assert session.last_usage.restored_tokens >= _history_full_block_tokens(history)
    finally:
        stack.stop()


def test_resume_after_server_restart_restores_kv_from_redis(tiny, redis_server):
    redis.Redis.from_url(redis_server).flushall()
    first = build_stack(tiny, "host+redis", redis_server)
    session = first.manager.create("alice", instructions=SYSTEM)
    run_turn(first, session, "Tell me about tea.")
    history, session_id = len(session.token_ids), session.session_id
    first.stop()

    second = build_stack(tiny, "host+redis", redis_server)  # a new process: empty device, host
    try:
        restored = second.manager.get(session_id, "alice")
        assert restored.token_ids == session.token_ids
        assert restored.state is SessionState.OFFLOADED
        produced = run_turn(second, restored, "And coffee?")
        assert produced == fresh_recompute(tiny, last_prompt(restored))
        assert restored.last_usage.restored_tokens >= _history_full_block_tokens(history)
        with pytest.raises(SessionAccessError):
            second.manager.get(session_id, "mallory")
    finally:
        second.stop()


def test_fork_shares_blocks_and_children_diverge(stack, tiny):
    parent = stack.manager.create("alice", instructions=SYSTEM)
    run_turn(stack, parent, "Tell me about tea.", waiting_for_tool=True)
    assert parent.state is SessionState.PAUSED
    child = stack.manager.fork(parent)
    stack.async_engine.run_exclusive(lambda: None)  # the child's pin command has run
    pins = {owner_id: pin.blocks for owner_id, pin in stack.engine.offload.pins.items()}
    shared = {b.block_id for b in pins[parent.session_id]} & {
        b.block_id for b in pins[child.session_id]
    }
    assert len(shared) == len(parent.token_ids) // BLOCK
    for block in pins[parent.session_id]:
        assert block.ref_cnt == 2
    history = len(parent.token_ids)
    for session, text in ((parent, "And coffee?"), (child, "What about juice?")):
        produced = run_turn(stack, session, text)
        assert produced == fresh_recompute(tiny, last_prompt(session))
        assert session.last_usage.cached_tokens >= _history_full_block_tokens(history)
    assert parent.messages[-2]["content"] != child.messages[-2]["content"]


def test_truncate_drops_items_and_resumes_identically(stack, tiny):
    session = stack.manager.create("alice", instructions=SYSTEM)
    run_turn(stack, session, "Tell me about tea.")
    run_turn(stack, session, "And coffee?")
    stack.manager.truncate(session, 2)
    assert [m["role"] for m in session.messages] == ["system", "user", "assistant"]
    produced = run_turn(stack, session, "What about juice?")
    assert produced == fresh_recompute(tiny, last_prompt(session))
    assert session.last_usage.cached_tokens >= 5 * BLOCK


def test_redis_flushed_between_turns_recomputes_identically(tiny, redis_server):
    client = redis.Redis.from_url(redis_server)
    client.flushall()
    stack = build_stack(tiny, "redis", redis_server)
    try:

        def flush(session):
            stack.manager.offload(session)
            drop_device_cache(stack, session)
            client.flushall()

        session, _ = _two_turns(stack, tiny, flush)
        assert session.last_usage.restored_tokens == 0
    finally:
        stack.stop()


def test_redis_stopped_between_turns_degrades_and_recovers(tiny, redis_process):
    url = redis_process.url
    redis.Redis.from_url(url).flushall()
    stack = build_stack(tiny, "host+redis", url)
    try:
        session = stack.manager.create("alice", instructions=SYSTEM)
        run_turn(stack, session, "Tell me about tea.")
        redis_process.stop()
        produced = run_turn(stack, session, "And coffee?")
        assert produced == fresh_recompute(tiny, last_prompt(session))
        redis_tier = stack.store.tiers[1]
        assert not redis_tier.healthy
        assert not stack.manager.records.healthy
        assert stack.manager.tier_health() == {
            "session_records": False,
            "host": True,
            "redis": False,
        }
        redis_process.start()
        run_turn(stack, session, "Thanks!")
        assert redis_tier.healthy and stack.manager.records.healthy
        assert all(stack.manager.tier_health().values())
        assert stack.manager.records.load(session.session_id)["token_ids"] == session.token_ids
    finally:
        stack.stop()


@pytest.mark.parametrize("damage", ["corrupt", "foreign", "truncate"])
def test_bad_redis_values_are_discarded_and_recomputed(tiny, redis_server, caplog, damage):
    client = redis.Redis.from_url(redis_server)
    client.flushall()
    stack = build_stack(tiny, "redis", redis_server)
    try:

        def spoil(session):
            stack.manager.offload(session)
            drop_device_cache(stack, session)
            keys = sorted(client.keys("tarry:kv:*"))
            assert keys
            value = client.get(keys[0])
            if damage == "corrupt":
                value = value[:-100] + bytes(100)
            elif damage == "truncate":
                value = value[: len(value) // 2]
            else:
                value = value.replace(stack.engine.fingerprint.encode(), b"0" * 32)
            for key in keys:
                client.set(key, value)

        with caplog.at_level(logging.WARNING):
            session, _ = _two_turns(stack, tiny, spoil)
        assert session.last_usage.restored_tokens == 0
        assert any("discard" in r.getMessage().lower() for r in caplog.records)
    finally:
        stack.stop()


def test_memory_pressure_offloads_instead_of_recomputing(tiny, redis_server):
    """12 sessions whose contexts total 3x the device pool, 6 turns each with pauses."""
    redis.Redis.from_url(redis_server).flushall()
    num_blocks = 64
    stack = build_stack(tiny, "host+redis", redis_server, num_kv_blocks=num_blocks)
    try:
        sessions = [
            stack.manager.create("alice", instructions=f"Session {i}. " + "Context words. " * 40)
            for i in range(12)
        ]
        recomputed = 0
        for turn in range(6):
            for idx, session in enumerate(sessions):
                history = len(session.token_ids)
                produced = run_turn(
                    stack, session, f"Turn {turn}, question {idx}.", waiting_for_tool=(idx % 3 == 0)
                )
                assert len(produced) == PARAMS.max_tokens
                if history:
                    recomputed += max(
                        0, history // BLOCK * BLOCK - session.last_usage.cached_tokens
                    )
            stack.manager.enforce_policy()
        total_context = sum(len(s.token_ids) for s in sessions)
        assert total_context >= 3 * num_blocks * BLOCK
        offloaded = stack.engine.num_saved_tokens
        assert offloaded > 0
        print(
            f"pressure: context {total_context} tokens, offloaded {offloaded}, restored "
            f"{stack.engine.num_restored_tokens}, recomputed {recomputed}"
        )
        assert recomputed < 0.05 * offloaded, (recomputed, offloaded)
        assert stack.engine.num_restored_tokens > 0
    finally:
        stack.stop()


def test_prefix_sharing_32_sessions_hold_a_shared_prompt_once(tiny):
    stack = build_stack(tiny, "", num_kv_blocks=512)
    try:
        shared_system = "Shared policy text for every agent. " * 150  # about 1,050 tokens
        sessions = []
        for idx in range(32):
            session = stack.manager.create("alice", instructions=shared_system)
            run_turn(stack, session, f"Agent {idx} reporting.", waiting_for_tool=True)
            sessions.append(session)
        assert all(s.state is SessionState.PAUSED for s in sessions)
        first = sessions[0].token_ids
        shared_len = min(common_prefix_len(first, s.token_ids) for s in sessions[1:])
        assert shared_len >= 1000
        shared_blocks = shared_len // BLOCK
        unique_blocks = sum((len(s.token_ids) - shared_blocks * BLOCK) // BLOCK for s in sessions)
        pins = stack.engine.offload.pins.values()
        used = {b.block_id for pin in pins for b in pin.blocks}
        assert len(used) <= shared_blocks + unique_blocks + len(sessions)
        assert sessions[-1].last_usage.cached_tokens >= shared_blocks * BLOCK
    finally:
        stack.stop()


def test_session_errors_leave_state_unchanged(stack):
    manager = stack.manager
    session = manager.create("alice", instructions=SYSTEM)
    with pytest.raises(InvalidSessionInputError):
        manager.append(session, [{"role": "robot", "content": "hi"}])
    with pytest.raises(InvalidSessionInputError):
        manager.append(session, [{"role": "user", "content": 42}])
    with pytest.raises(InvalidSessionInputError):
        manager.truncate(session, 5)
    with pytest.raises(HistoryTooLongError):  # over the tiny model's context
        manager.append(session, [{"role": "user", "content": "word " * 3000}])
    with pytest.raises(HistoryTooLongError):  # over the byte bound: refused before tokenizing
        manager.append(session, [{"role": "user", "content": "x" * (2048 * 32 + 1)}])
    with pytest.raises(InvalidSessionInputError, match="surrogate"):
        manager.append(session, [{"role": "user", "content": "a\ud800"}])
    assert len(session.messages) == 1 and session.num_pending_tokens == 0
    with pytest.raises(SessionNotFoundError):
        manager.get("sess_missing", "alice")
    with pytest.raises(SessionAccessError):
        manager.get(session.session_id, "bob")
    session.transition(SessionState.ACTIVE)
    with pytest.raises(SessionBusyError):
        manager.append(session, [{"role": "user", "content": "again"}])
    session.transition(SessionState.PAUSED)
    manager.close(session)
    with pytest.raises(SessionClosedError):
        manager.append(session, [{"role": "user", "content": "late"}])
    with pytest.raises(SessionNotFoundError):
        manager.get(session.session_id, "alice")


def test_pause_policy_decisions():
    policy = PausePolicy(keep_ttl_s=30, pressure_threshold=0.75)
    assert policy.decide(500, 2.0, 0.1) is PauseDecision.KEEP
    assert policy.decide(500, 2.0, 0.9) is PauseDecision.OFFLOAD
    assert policy.decide(500, 120.0, 0.1) is PauseDecision.OFFLOAD
    assert policy.decide(5, 120.0, 0.1) is PauseDecision.DROP


def test_preemption_swaps_to_host_and_matches_hf(tiny_model_dirs):
    """With a host pool, preempted requests come back from host memory, not recomputation."""
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine
    from sessions.tiers import HostKVStore
    from tests.helpers import greedy, hf_greedy, mixed_prompts, run_staggered

    prompts = mixed_prompts(11, 8, 20, 60)
    expected = hf_greedy(tiny_model_dirs["llama"], prompts, 12)
    loaded = load_model(str(tiny_model_dirs["llama"]), device="cpu")
    engine = LLMEngine(loaded, EngineConfig(num_kv_blocks=12, check_integrity=True))
    engine.attach_kv_store(HostKVStore(capacity_bytes=64 << 20))
    outputs = run_staggered(engine, prompts, greedy(12), arrivals=[0] * 8)
    assert [o.new_token_ids for o in outputs] == expected
    assert engine.scheduler.num_preemptions > 0
    assert engine.num_saved_tokens > 0 and engine.num_restored_tokens > 0
