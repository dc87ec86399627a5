"""The session manager: sessions' lifecycle on top of the async engine.

It owns no tensors. A paused session's KV is kept on the device by an engine *pin* on its full
blocks; offloading writes those blocks to the engine's KV store (host memory -> Redis) and
releases the pin; dropping releases the pin only. Any of them can be lost later: the next turn
then recomputes from the token ids, which are the truth.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from typing import Any

from engine.async_engine import AsyncEngine
from engine.outputs import RequestOutput
from engine.pool_stats import PoolStats
from engine.sampling_params import SamplingParams
from sessions.errors import (
    HistoryTooLongError,
    InvalidSessionInputError,
    SessionAccessError,
    SessionBusyError,
    SessionClosedError,
    SessionMovedError,
    SessionNotFoundError,
    TooManySessionsError,
)
from sessions.history_budget import HistoryBudget, count_item_tokens, message_bytes, utf8_len
from sessions.owner_keys import OwnerKeys
from sessions.ownership import Owner, SessionOwnership
from sessions.policy import PauseDecision, PausePolicy
from sessions.prompt import common_prefix_len, render_conversation, turn_prompt
from sessions.record_store import MemoryRecordStore, SessionRecordStore
from sessions.session import Session, SessionState, TurnRecord, TurnUsage

MESSAGE_ROLES = {"system", "user", "assistant", "tool"}
MESSAGE_FIELDS = {"role", "content", "name", "tool_call_id", "tool_calls"}
NUM_TOKENIZE_WORKERS = 2


class SessionManager:
    """Creates, resumes, forks, truncates and closes sessions; applies the pause policy.

    All methods run on the caller's event loop thread and never wait for an engine step:
    engine bookkeeping (pins) is queued with ``AsyncEngine.submit`` (commands run in order, so
    a pin is in place before the session's next request) or awaited with
    ``run_exclusive_async``. What waits with ``run_exclusive`` runs off the loop: the end of
    a turn (on a worker thread) and ``offload`` / ``enforce_policy`` / ``check_integrity``
    (called from tests and benchmarks, not from a handler). Errors are
    ``sessions.errors.SessionError`` subclasses and leave every session unchanged.

    Abandoned sessions do not stay forever: ``expire_idle`` (run periodically by the server,
    with ``enforce_policy_async``) evicts sessions untouched for ``idle_timeout_s``, and
    ``create`` / ``fork`` refuse a session beyond ``max_sessions`` (TooManySessionsError).

    A session's history is bounded by ``budget`` (default: the engine's context length, see
    ``sessions.history_budget``); an item that would not fit is refused when it arrives. The
    async methods tokenize and render in a small dedicated thread pool, never on the loop.
    """

    def __init__(
        self,
        async_engine: AsyncEngine,
        records: SessionRecordStore | None = None,
        policy: PausePolicy | None = None,
        persist_kv: bool = True,
        ownership: SessionOwnership | None = None,
        budget: HistoryBudget | None = None,
        owner_keys: OwnerKeys | None = None,
        idle_timeout_s: float = 3600.0,
        max_sessions: int = 4096,
    ) -> None:
        self.async_engine = async_engine
        self.engine = async_engine.engine
        self.tokenizer = self.engine.tokenizer
        self.records = records or MemoryRecordStore()
        self.policy = policy or PausePolicy()
        self.persist_kv = persist_kv  # write each turn's new full blocks to the KV store
        self._sessions: dict[str, Session] = {}
        # Several instances sharing one Redis: session leases (None = single instance).
        self.ownership = ownership
        self.budget = budget or HistoryBudget.for_context(self.engine.max_model_len)
        self._tokenize_pool = ThreadPoolExecutor(NUM_TOKENIZE_WORKERS, "tarry-tokenize")
        # API key -> the owner id records store (a keyed hash; legacy clear-text records load).
        self.owner_keys = owner_keys or OwnerKeys()
        self.idle_timeout_s = idle_timeout_s  # untouched this long: evicted by expire_idle
        self.max_sessions = max_sessions  # in memory on this server, all tenants together

    # -- lifecycle ---------------------------------------------------------------------------

    def create(
        self,
        owner: str,
        instructions: str | None = None,
        tools: list[dict[str, Any]] | None = None,
        settings: dict[str, Any] | None = None,
    ) -> Session:
        """A new session; TooManySessionsError when the server holds ``max_sessions``."""
        self._check_capacity()
        session = Session(owner=owner, tools=list(tools or []), settings=dict(settings or {}))
        if instructions:
            self.budget.check_bytes(0, [{"role": "system", "content": instructions}])
            session.messages.append({"role": "system", "content": instructions})
        self._sessions[session.session_id] = session
        if self.ownership is not None:
            self.ownership.leases.acquire(session.session_id)
        self.records.save(session.to_record())
        return session

    def get(
        self,
        session_id: str,
        owner: str,
        migrate: bool = False,
        verify: Callable[[Session], None] | None = None,
        unreachable_owner: str | None = None,
    ) -> Session:
        """The caller's session, from memory or (after a restart) from the record store.

        ``verify`` (e.g. a resume-token check) runs after the access check and before any lease
        is taken; it raises to refuse. With ownership configured, a session whose lease another
        live instance holds raises ``SessionMovedError`` (carrying its URL and id) unless
        ``migrate``, or the holder is ``unreachable_owner`` (probed dead by ``resume``), or the
        holder advertises this instance's own URL (a previous process on this address: never
        send a client to itself). Otherwise a dead owner's lease is taken over and the session
        loaded from its record (its KV restores through the tiers). Losing a take-over race
        raises ``SessionMovedError`` with the winner's URL.
        """
        session = self._sessions.get(session_id)
        if session is not None and not self._still_ours(session):
            self._forget(session)
            session = None
        loaded = session is None
        if session is None:
            record = self.records.load(session_id)
            if record is None:
                raise SessionNotFoundError(f"no session {session_id!r}")
            session = Session.from_record(record)
            session.owner = self.owner_keys.from_stored(session.owner)
        if session.owner != owner:
            raise SessionAccessError(f"no session {session_id!r}")
        if session.state is SessionState.CLOSED:
            raise SessionClosedError(f"session {session_id} is closed")
        if verify is not None:
            verify(session)
        if loaded:
            self._claim(session_id, migrate, unreachable_owner)
            self._sessions[session_id] = session
        self._refresh_state(session)
        session.last_active_at = time.monotonic()  # touched: not idle (``expire_idle``)
        return session

    def _check_capacity(self) -> None:
        if len(self._sessions) >= self.max_sessions:
            raise TooManySessionsError(
                f"the server holds its maximum of {self.max_sessions} sessions; close one, "
                "or retry later or on another instance"
            )

    def _still_ours(self, session: Session) -> bool:
        """False when the heartbeat found this session's lease taken by another instance (a
        session generating a turn here stays ours until the turn ends)."""
        if self.ownership is None or session.state is SessionState.ACTIVE:
            return True
        return self.ownership.leases.holds(session.session_id)

    def _confirm_ownership(self, session: Session) -> None:
        """Before a change to the session: if another instance took its lease (a forced
        take-over since our last heartbeat), drop our copy and raise SessionMovedError with
        the new owner's URL. One Redis GET; with Redis unavailable the change goes ahead."""
        if self.ownership is None:
            return
        leases = self.ownership.leases
        holder = leases.holder(session.session_id)
        if holder is None or holder == leases.me:
            return
        leases.forget(session.session_id)
        self._forget(session)
        url = self.ownership.registry.url_of(holder)
        raise SessionMovedError(f"session {session.session_id} was taken over by {url}", url)

    def _forget(self, session: Session) -> None:
        """Drop a session another instance took over: its local copy and device pin."""
        self.async_engine.submit(self.engine.unpin, session.session_id)
        self._sessions.pop(session.session_id, None)

    def _claim(self, session_id: str, migrate: bool, unreachable_owner: str | None) -> None:
        """Take the lease of a session loaded from its record, or raise SessionMovedError."""
        if self.ownership is None:
            return
        leases = self.ownership.leases
        holder = leases.owner_of(session_id)
        if holder is None:
            if leases.acquire(session_id):
                return
        elif holder.instance_id == leases.me:
            leases.acquire(session_id)
            return
        elif holder.alive and not migrate and not self._replaceable(holder, unreachable_owner):
            raise SessionMovedError(
                f"session {session_id} is owned by the instance at {holder.url}",
                holder.url,
                holder.instance_id,
            )
        elif leases.take_over(session_id, holder.instance_id):
            return
        winner = leases.owner_of(session_id)
        url = winner.url if winner is not None else None
        raise SessionMovedError(f"session {session_id} was taken over by {url}", url)

    def _replaceable(self, holder: Owner, unreachable_owner: str | None) -> bool:
        """A live-registered owner that is nevertheless taken over: it did not answer a probe,
        or it advertises our own URL (an earlier process on this address, now gone)."""
        assert self.ownership is not None
        return holder.instance_id == unreachable_owner or holder.url == self.ownership.url

    async def resume(
        self,
        session_id: str,
        owner: str,
        migrate: bool = False,
        verify: Callable[[Session], None] | None = None,
    ) -> Session:
        """``get`` for the event loop, with failover that does not wait for the lease TTL.

        When another instance that is alive by its registration holds the session, its
        address is probed off the loop (``SessionOwnership.owner_answers``). If it answers,
        SessionMovedError (its URL) is raised as before; if it refuses or times out, its lease
        is taken over at once (the same fenced compare-and-set as ``migrate``, so if yet
        another instance took the lease meanwhile, this raises SessionMovedError naming it).
        """
        try:
            return self.get(session_id, owner, migrate, verify)
        except SessionMovedError as exc:
            dead = exc.owner_id
            if self.ownership is None or dead is None or exc.owner_url is None:
                raise
            if await asyncio.to_thread(self.ownership.owner_answers, exc.owner_url):
                raise
            return self.get(session_id, owner, migrate, verify, unreachable_owner=dead)

    def all_sessions(self) -> list[Session]:
        return list(self._sessions.values())

    def sessions_of(self, owner: str) -> list[Session]:
        return [s for s in self._sessions.values() if s.owner == owner]

    def update(
        self,
        session: Session,
        *,
        instructions: str | None = None,
        tools: list[dict[str, Any]] | None = None,
        settings: dict[str, Any] | None = None,
    ) -> None:
        """Change an idle session's system instructions (replacing the leading system message,
        or inserting one), its tools, and/or top-level ``settings`` keys; then persist it.

        The KV after the first changed token is simply not reused by the next turn (its prompt
        is re-rendered and compared token by token). Raises like ``append``; on error nothing
        changes."""
        self._require_idle(session)
        self._confirm_ownership(session)
        if instructions is not None:
            system = {"role": "system", "content": instructions}
            if session.messages and session.messages[0]["role"] == "system":
                session.messages[0] = system
            else:
                session.messages.insert(0, system)
        if tools is not None:
            session.tools = list(tools)
        if settings:
            session.settings.update(settings)
        self.records.save(session.to_record())

    def append(self, session: Session, items: list[dict[str, Any]]) -> None:
        """Add messages (``{"role", "content"}``; tool results use role ``tool``).

        Raises InvalidSessionInputError for a malformed message and HistoryTooLongError
        (``context_length_exceeded``) when the history would outgrow ``budget``. Tokenizes the
        new items on the calling thread: event-loop callers use ``add_items``.
        """
        self._check_items(session, items)
        self._commit_items(session, items, count_item_tokens(self.tokenizer, items))

    async def add_items(self, session: Session, items: list[dict[str, Any]]) -> None:
        """``append`` for the event loop: the checks that need no tokenizer run at once, the
        new items are tokenized in the tokenizer pool (their size is bounded by then), and
        the session is checked again before it changes."""
        self._check_items(session, items)
        loop = asyncio.get_running_loop()
        num_tokens = await loop.run_in_executor(
            self._tokenize_pool, count_item_tokens, self.tokenizer, items
        )
        self._check_items(session, items)  # the session may have changed meanwhile
        self._commit_items(session, items, num_tokens)

    def _check_items(self, session: Session, items: list[dict[str, Any]]) -> None:
        self._require_idle(session)
        for item in items:
            _validate_message(item)
        history_bytes = sum(message_bytes(m) for m in session.messages)
        self.budget.check_bytes(history_bytes, items)

    def _commit_items(self, session: Session, items: list[dict[str, Any]], num_tokens: int) -> None:
        num_pending = session.num_pending_tokens + num_tokens
        self.budget.check_tokens(len(session.token_ids) + num_pending)
        self._confirm_ownership(session)
        session.messages.extend(dict(item) for item in items)
        session.num_pending_tool_results += sum(1 for item in items if item["role"] == "tool")
        session.num_pending_tokens = num_pending
        session.last_active_at = time.monotonic()
        self.records.save(session.to_record())

    async def prompt_for(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None
    ) -> list[int]:
        """Prompt token ids of a sessionless chat (OpenAI HTTP), under the same budget: the
        byte bound is checked first, rendering and tokenizing run in the tokenizer pool.
        Raises HistoryTooLongError, or InvalidSessionInputError (also when the chat template
        fails on the messages)."""
        for message in messages:
            if not isinstance(message.get("content"), str):
                raise InvalidSessionInputError("content must be a string")
        self.budget.check_bytes(0, messages)
        try:
            prompt = await asyncio.get_running_loop().run_in_executor(
                self._tokenize_pool, self._render_and_tokenize, messages, tools
            )
        except Exception as exc:  # jinja, KeyError, ...: the messages are the client's
            raise InvalidSessionInputError(
                f"the chat template cannot render these messages: {exc}"
            ) from exc
        self.budget.check_tokens(len(prompt))
        return prompt

    async def tokenize_text(self, text: str) -> list[int]:
        """A raw completion prompt's token ids (bounded like a history, tokenized off the loop)."""
        if utf8_len(text) > self.budget.max_bytes:
            raise HistoryTooLongError(f"the prompt is over {self.budget.max_bytes} bytes")
        ids = await asyncio.get_running_loop().run_in_executor(
            self._tokenize_pool, self.engine.tokenize, text
        )
        self.budget.check_tokens(len(ids))
        return ids

    def _render_and_tokenize(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None
    ) -> list[int]:
        text = render_conversation(self.tokenizer, messages, tools)
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def close_pool(self) -> None:
        """Stop the tokenizer threads (server shutdown)."""
        self._tokenize_pool.shutdown(wait=False, cancel_futures=True)

    async def generate(
        self,
        session: Session,
        params: SamplingParams,
        waiting_for_tool: bool = False,
        record: bool = True,
    ) -> AsyncIterator[RequestOutput]:
        """Generate the next assistant message; only tokens not already in KV are prefilled.

        The turn is recorded (assistant message, token ids, usage) when it finishes; if it is
        cancelled, the session keeps its previous history. Either way it ends PAUSED or
        OFFLOADED per the pause policy, and the record is persisted. With ``record=False``
        (prefill only) the output is discarded: only the prompt's KV is computed and kept.
        """
        self._require_idle(session)
        if not session.messages:
            raise InvalidSessionInputError("the session has no messages to answer")
        self._confirm_ownership(session)
        # Off the loop: rendering and tokenizing a history (bounded by the budget) takes time.
        prompt = await asyncio.get_running_loop().run_in_executor(
            self._tokenize_pool,
            turn_prompt,
            self.tokenizer,
            list(session.token_ids),
            list(session.messages),
            list(session.tools),
        )
        self._require_idle(session)  # another caller may have started a turn meanwhile
        self.budget.check_tokens(len(prompt))
        request_id = f"{session.session_id}-turn{session.num_turns}-{time.monotonic_ns()}"
        session.transition(SessionState.ACTIVE)
        produced: list[int] = []
        pieces: list[str] = []
        final: RequestOutput | None = None
        started = time.monotonic()
        ttft_s: float | None = None
        try:
            async for out in self.async_engine.generate(
                prompt, params, request_id, session.cache_salt
            ):
                if ttft_s is None:
                    ttft_s = time.monotonic() - started
                produced += out.new_token_ids
                pieces.append(out.new_text)
                if out.finished:
                    final = out
                yield out
        finally:
            if final is not None and record:
                self._record_turn(session, prompt, produced, "".join(pieces), final)
                self._add_turn_record(session, final, started, ttft_s)
            elif final is not None:
                session.last_usage = TurnUsage(
                    len(prompt), 0, final.num_cached_tokens, final.num_restored_tokens
                )
            session.last_active_at = time.monotonic()
            # Off the event loop: parking waits for the engine's current step, and the record
            # write is a Redis round trip; other sessions' streams must not wait on either.
            await asyncio.to_thread(
                self._end_turn, session, waiting_for_tool, None if record else prompt
            )

    def _record_turn(
        self,
        session: Session,
        prompt: list[int],
        produced: list[int],
        text: str,
        final: RequestOutput,
    ) -> None:
        session.token_ids = [*prompt, *produced]
        session.num_pending_tokens = 0
        session.messages.append({"role": "assistant", "content": text})
        session.num_turns += 1
        session.last_usage = TurnUsage(
            prompt_tokens=len(prompt),
            completion_tokens=len(produced),
            cached_tokens=final.num_cached_tokens,
            restored_tokens=final.num_restored_tokens,
        )

    def _add_turn_record(
        self, session: Session, final: RequestOutput, started: float, ttft_s: float | None
    ) -> None:
        """Append the finished turn's costs to ``session.turns`` (bounded, in memory only)."""
        usage = session.last_usage
        now = time.monotonic()
        ended = session.last_turn_ended_at
        session.turns.append(
            TurnRecord(
                turn=session.num_turns,
                started_at=time.time() - (now - started),
                prompt_tokens=usage.prompt_tokens,
                cached_tokens=usage.cached_tokens - usage.restored_tokens,
                restored_tokens=usage.restored_tokens,
                new_tokens=usage.prompt_tokens - usage.cached_tokens,
                output_tokens=usage.completion_tokens,
                ttft_s=ttft_s,
                duration_s=now - started,
                finish_reason=final.finish_reason,
                pause_before_s=None if ended is None else max(0.0, started - ended),
                num_tool_results=session.num_pending_tool_results,
            )
        )
        session.num_pending_tool_results = 0
        session.last_turn_ended_at = now

    def fork(self, session: Session) -> Session:
        """A copy-on-write child: same history, sharing every full KV block with the parent."""
        self._require_idle(session)
        self._check_capacity()
        self._confirm_ownership(session)
        child = Session(
            owner=session.owner,
            messages=[dict(m) for m in session.messages],
            token_ids=list(session.token_ids),
            tools=list(session.tools),
            settings=dict(session.settings),
            num_turns=session.num_turns,
        )
        self._sessions[child.session_id] = child
        if self.ownership is not None:
            self.ownership.leases.acquire(child.session_id)
        if session.state is SessionState.PAUSED:
            self._pin(child)
        else:
            child.transition(SessionState.OFFLOADED)
        self.records.save(child.to_record())
        return child

    def truncate(self, session: Session, num_items: int) -> None:
        """Drop the last ``num_items`` messages and the KV after what remains."""
        self._require_idle(session)
        if not 0 < num_items <= len(session.messages):
            raise InvalidSessionInputError(
                f"cannot truncate {num_items} of {len(session.messages)} items"
            )
        self._confirm_ownership(session)
        session.messages = session.messages[:-num_items]
        kept = session.messages
        rendered_ids = turn_prompt(self.tokenizer, [], kept, session.tools) if kept else []
        session.token_ids = session.token_ids[: common_prefix_len(session.token_ids, rendered_ids)]
        session.num_pending_tokens = max(0, len(rendered_ids) - len(session.token_ids))
        if session.state is SessionState.PAUSED:
            self._pin(session)
        self.records.save(session.to_record())

    def close(self, session: Session) -> None:
        """End the session: release its KV pin and delete its record."""
        self._require_idle(session)
        self._confirm_ownership(session)
        self.async_engine.submit(self.engine.unpin, session.session_id)
        session.transition(SessionState.CLOSED)
        self._sessions.pop(session.session_id, None)
        self.records.delete(session.session_id)
        if self.ownership is not None:
            self.ownership.leases.release(session.session_id)

    # -- KV placement ------------------------------------------------------------------------

    def _end_turn(
        self, session: Session, waiting_for_tool: bool, context: list[int] | None
    ) -> None:
        """Place the turn's KV per the pause policy and persist the record (worker thread)."""
        decision = self._apply_pause_policy(session, waiting_for_tool, context)
        session.transition(
            SessionState.PAUSED if decision is PauseDecision.KEEP else SessionState.OFFLOADED
        )
        self.records.save(session.to_record())

    def _apply_pause_policy(
        self, session: Session, waiting_for_tool: bool, context: list[int] | None = None
    ) -> PauseDecision:
        """Keep, offload or drop the KV of ``context`` (default: the session's token ids), in
        one engine critical section. Sets ``keep_until``; the caller sets the state."""
        context = session.token_ids if context is None else context
        decision = self.policy.decide(
            len(context),
            self.policy.expected_pause_s(waiting_for_tool),
            self.engine.kv_usage(),
        )
        self.async_engine.run_exclusive(
            self._place_kv, session.session_id, context, session.cache_salt, decision
        )
        keep = decision is PauseDecision.KEEP
        session.keep_until = time.monotonic() + self.policy.keep_ttl_s if keep else 0.0
        return decision

    def _place_kv(
        self, session_id: str, context: list[int], cache_salt: str, decision: PauseDecision
    ) -> None:
        """On the engine thread, between steps: write-through to the store, then pin / release
        the blocks."""
        if self.persist_kv or decision is PauseDecision.OFFLOAD:
            self.engine.save_tokens(context, cache_salt)  # no-op without a store
        if decision is PauseDecision.KEEP:
            self.engine.pin_tokens(session_id, context, cache_salt)
        else:
            self.engine.unpin(session_id)

    def _pin(self, session: Session, context: list[int] | None = None) -> None:
        context = session.token_ids if context is None else context
        self.async_engine.submit(
            self.engine.pin_tokens, session.session_id, context, session.cache_salt
        )
        session.keep_until = time.monotonic() + self.policy.keep_ttl_s
        session.transition(SessionState.PAUSED)

    def offload(self, session: Session) -> None:
        """Move a paused session's KV off the device (to the KV store, if there is one)."""
        if session.state is SessionState.ACTIVE:
            raise SessionBusyError(f"session {session.session_id} is generating")
        self.async_engine.run_exclusive(
            self.engine.pin_tokens, session.session_id, session.token_ids, session.cache_salt
        )
        self.async_engine.run_exclusive(self.engine.offload_pin, session.session_id)
        session.keep_until = 0.0
        session.transition(SessionState.OFFLOADED)

    def enforce_policy(self, now: float | None = None) -> list[str]:
        """Offload paused sessions whose keep TTL expired and, while the device pool is above
        the pressure threshold, the longest-idle paused ones. Returns the offloaded ids."""
        now = time.monotonic() if now is None else now
        paused = sorted(
            (s for s in self._sessions.values() if s.state is SessionState.PAUSED),
            key=lambda s: s.last_active_at,
        )
        offloaded = []
        for session in paused:
            expired = session.keep_until <= now
            pressure = self.engine.kv_usage() >= self.policy.pressure_threshold
            if expired or pressure:
                self.offload(session)
                offloaded.append(session.session_id)
        return offloaded

    async def enforce_policy_async(self, now: float | None = None) -> list[str]:
        """``enforce_policy`` for the event loop (the server runs it periodically): each
        session is marked OFFLOADED on the loop, so no turn can see it half-moved, and its KV
        is moved by the engine thread between steps while the loop keeps serving."""
        now = time.monotonic() if now is None else now
        paused = sorted(
            (s for s in self._sessions.values() if s.state is SessionState.PAUSED),
            key=lambda s: s.last_active_at,
        )
        offloaded = []
        for session in paused:
            if session.state is not SessionState.PAUSED:  # changed while we awaited
                continue
            expired = session.keep_until <= now
            pressure = self.engine.kv_usage() >= self.policy.pressure_threshold
            if not (expired or pressure):
                continue
            session.keep_until = 0.0
            session.transition(SessionState.OFFLOADED)
            await self.async_engine.run_exclusive_async(
                self._offload_kv, session.session_id, list(session.token_ids), session.cache_salt
            )
            offloaded.append(session.session_id)
        return offloaded

    def _offload_kv(self, session_id: str, token_ids: list[int], cache_salt: str) -> None:
        """On the engine thread: write the context's cached blocks down a tier, drop the pin."""
        self.engine.pin_tokens(session_id, token_ids, cache_salt)
        self.engine.offload_pin(session_id)

    async def expire_idle(self, now: float | None = None) -> list[str]:
        """Evict every session not generating and untouched for ``idle_timeout_s``; returns
        their ids (the caller closes their tool sandboxes).

        An evicted session releases its device pin and its lease and leaves this server's
        memory. Its record stays in a durable store (Redis: it can be resumed later, and
        expires with the record's TTL); an in-memory record is deleted with it (nothing else
        would ever free it), so it is gone like a closed session. A connection still bound to
        it gets ``session_closed`` and may ``session.resume`` it where the record is durable.
        """
        now = time.monotonic() if now is None else now
        idle = [
            s
            for s in self._sessions.values()
            if s.state is not SessionState.ACTIVE and now - s.last_active_at >= self.idle_timeout_s
        ]
        for session in idle:
            self.async_engine.submit(self.engine.unpin, session.session_id)
            session.keep_until = 0.0
            session.transition(SessionState.CLOSED)
            self._sessions.pop(session.session_id, None)
        if idle:
            await asyncio.to_thread(self._release_evicted, [s.session_id for s in idle])
        return [s.session_id for s in idle]

    def _release_evicted(self, session_ids: list[str]) -> None:
        """Redis round trips of ``expire_idle``, off the loop: leases, in-memory records."""
        for session_id in session_ids:
            if isinstance(self.records, MemoryRecordStore):
                self.records.delete(session_id)
            if self.ownership is not None:
                self.ownership.leases.release(session_id)

    def probe_unhealthy_tiers(self) -> None:
        """Ping each KV tier that reported a failure, so that its health recovers without
        waiting for traffic (blocking: call it off the loop)."""
        store = self.engine.kv_store
        for tier in getattr(store, "tiers", [store] if store is not None else []):
            ping = getattr(tier, "ping", None)
            if not getattr(tier, "healthy", True) and ping is not None:
                ping()

    async def kv_location(self, session: Session) -> dict[str, int]:
        """Tokens of the session's history cached on the device and, after those, in the store."""
        on_device, in_store = await self.async_engine.run_exclusive_async(
            self.engine.cached_tokens, session.token_ids, session.cache_salt
        )
        return {"device": on_device, "store": in_store, "total": len(session.token_ids)}

    def lease_holder(self, session_id: str) -> str | None:
        """With ownership: this instance's id while it holds the session's lease, else
        ``"lost"`` (another instance took it since the last heartbeat). None without ownership.
        Local knowledge only: no Redis call."""
        if self.ownership is None:
            return None
        if self.ownership.leases.holds(session_id):
            return self.ownership.instance_id
        return "lost"

    def tier_health(self) -> dict[str, bool]:
        """Whether each storage tier currently answers (False = degraded: the service keeps
        working, recomputing what the tier would have provided)."""
        health = {"session_records": self.records.healthy}
        if self.ownership is not None:
            health["ownership"] = self.ownership.healthy
        store = self.engine.kv_store
        tiers = getattr(store, "tiers", [store] if store is not None else [])
        for tier in tiers:
            health[tier.tier_name] = bool(getattr(tier, "healthy", True))
        return health

    def _refresh_state(self, session: Session) -> None:
        """A pin the engine released under pressure turns a PAUSED session OFFLOADED."""
        if session.state is SessionState.PAUSED and (not self.engine.is_pinned(session.session_id)):
            session.transition(SessionState.OFFLOADED)

    def _require_idle(self, session: Session) -> None:
        if session.state is SessionState.ACTIVE:
            raise SessionBusyError(f"session {session.session_id} already has an active response")
        if session.state is SessionState.CLOSED:
            raise SessionClosedError(f"session {session.session_id} is closed")

    async def integrity_report(self) -> dict[str, Any]:
        """Engine invariants and device pool counts, from one engine critical section (waits
        for the current step; for operators and soak benchmarks, not per request).
        ``ok`` is False when an invariant fails or a pin belongs to no live session."""

        def check() -> tuple[PoolStats, list[str], str | None]:
            error = None
            try:
                self.engine.check_integrity()
            except AssertionError as exc:
                error = str(exc) or "an engine invariant failed"
            return self.engine.pool_stats(), self.engine.pinned_owner_ids(), error

        stats, pinned, error = await self.async_engine.run_exclusive_async(check)
        orphans = sorted(
            owner_id
            for owner_id in pinned
            if owner_id not in self._sessions
            or self._sessions[owner_id].state is SessionState.CLOSED
        )
        return {
            "ok": error is None and not orphans,
            "error": error,
            "orphan_pins": orphans,
            "num_sessions": len(self._sessions),
            "pool": asdict(stats),
        }

    def check_integrity(self) -> None:
        """Every engine pin belongs to a live session; engine invariants hold."""
        self.async_engine.run_exclusive(self.engine.check_integrity)
        for owner_id in self.engine.pinned_owner_ids():
            session = self._sessions.get(owner_id)
            assert session is not None, f"pin held for unknown session {owner_id}"
            assert session.state is not SessionState.CLOSED, f"closed session {owner_id} pinned"


def _validate_message(item: Any) -> None:
    if not isinstance(item, dict):
        raise InvalidSessionInputError("each item must be an object with role and content")
    role, content = item.get("role"), item.get("content")
    if role not in MESSAGE_ROLES:
        raise InvalidSessionInputError(f"role must be one of {sorted(MESSAGE_ROLES)}, got {role!r}")
    if not isinstance(content, str):
        raise InvalidSessionInputError("content must be a string")
    unknown = set(item) - MESSAGE_FIELDS
    if unknown:
        raise InvalidSessionInputError(f"unknown message fields: {sorted(unknown)}")
