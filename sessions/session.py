"""Session state: the durable record (messages + token ids) and the state machine.

    create ──> PAUSED ──generate──> ACTIVE ──turn ends──> PAUSED ──policy──> OFFLOADED
                 ^                                          │                   │
                 └──────────── generate (resume) <──────────┴───────────────────┘
    any state except ACTIVE ──close──> CLOSED

The token history is the truth; KV blocks on any tier are only a cache of it.
"""

from __future__ import annotations

import enum
import secrets
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from sessions.errors import SessionBusyError, SessionClosedError


class SessionState(enum.Enum):
    ACTIVE = "active"  # a response is being generated
    PAUSED = "paused"  # waiting for the client; its KV (none yet when new) pinned on the device
    OFFLOADED = "offloaded"  # waiting; KV released from the device (host / Redis / recompute)
    CLOSED = "closed"


_ALLOWED = {
    SessionState.PAUSED: {SessionState.ACTIVE, SessionState.OFFLOADED, SessionState.CLOSED},
    SessionState.OFFLOADED: {SessionState.ACTIVE, SessionState.PAUSED, SessionState.CLOSED},
    SessionState.ACTIVE: {SessionState.PAUSED, SessionState.OFFLOADED},
    SessionState.CLOSED: set(),
}


def new_session_id() -> str:
    """An unguessable id (128 bits of randomness)."""
    return "sess_" + secrets.token_urlsafe(16)


@dataclass
class TurnUsage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens served from KV on any tier
    restored_tokens: int = 0  # of which restored from host memory or Redis


MAX_TURN_RECORDS = 64  # per session, newest kept; in memory only (not in the record)


@dataclass(slots=True)
class TurnRecord:
    """What one finished turn cost, for the inspector page. Prompt tokens split three ways::

    prompt_tokens = cached_tokens (device) + restored_tokens (host / Redis) + new_tokens
    """

    turn: int  # 1-based turn number
    started_at: float  # wall clock (time.time())
    prompt_tokens: int
    cached_tokens: int  # reused from the device pool
    restored_tokens: int  # restored from host memory or Redis
    new_tokens: int  # prefilled by this turn
    output_tokens: int
    ttft_s: float | None  # request start -> first output token
    duration_s: float
    finish_reason: str | None
    pause_before_s: float | None  # gap since the previous turn ended (None for the first)
    num_tool_results: int  # tool results appended since the previous turn (a tool pause)


@dataclass
class Session:
    """One agent conversation. ``token_ids`` are exactly the tokens whose KV a resume reuses."""

    owner: str
    session_id: str = field(default_factory=new_session_id)
    messages: list[dict[str, Any]] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    tools: list[dict[str, Any]] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    state: SessionState = SessionState.PAUSED
    created_at: float = field(default_factory=time.time)
    last_active_at: float = field(default_factory=time.monotonic)
    keep_until: float = 0.0  # monotonic deadline of the device pin (TTL), 0 = not pinned
    last_usage: TurnUsage = field(default_factory=TurnUsage)
    num_turns: int = 0
    # In memory only (not in ``to_record``): a restarted or taken-over session starts empty.
    turns: deque[TurnRecord] = field(default_factory=lambda: deque(maxlen=MAX_TURN_RECORDS))
    num_pending_tool_results: int = 0  # tool results appended since the last turn
    last_turn_ended_at: float | None = None  # monotonic
    # Estimated tokens of the messages added since ``token_ids`` were last set (a turn's end
    # or a truncation): with ``len(token_ids)`` the history's size (sessions.history_budget).
    num_pending_tokens: int = 0

    @property
    def cache_salt(self) -> str:
        """Prefix-cache salt: sessions share KV only with sessions of the same owner."""
        return "owner:" + self.owner

    def transition(self, target: SessionState) -> None:
        """Move to ``target``; raises SessionBusyError / SessionClosedError if not allowed."""
        if target is self.state:
            return
        if target not in _ALLOWED[self.state]:
            if self.state is SessionState.CLOSED:
                raise SessionClosedError(f"session {self.session_id} is closed")
            raise SessionBusyError(
                f"session {self.session_id} is {self.state.value}; cannot become {target.value}"
            )
        self.state = target

    def to_record(self) -> dict[str, Any]:
        """The durable part, as plain data (messages, token ids, tools, settings)."""
        return {
            "version": 1,
            "session_id": self.session_id,
            "owner": self.owner,
            "messages": self.messages,
            "token_ids": self.token_ids,
            "tools": self.tools,
            "settings": self.settings,
            "created_at": self.created_at,
            "num_turns": self.num_turns,
            "num_pending_tokens": self.num_pending_tokens,
            "closed": self.state is SessionState.CLOSED,
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Session:
        """Rebuild a session from ``to_record`` output; its KV is wherever the tiers have it."""
        return cls(
            owner=record["owner"],
            session_id=record["session_id"],
            messages=list(record["messages"]),
            token_ids=list(record["token_ids"]),
            tools=list(record.get("tools", [])),
            settings=dict(record.get("settings", {})),
            state=SessionState.CLOSED if record.get("closed") else SessionState.OFFLOADED,
            created_at=float(record.get("created_at", time.time())),
            num_turns=int(record.get("num_turns", 0)),
            num_pending_tokens=int(record.get("num_pending_tokens", 0)),
        )
