"""The Tarry sessions behind Responses API requests, and stored responses.

A response id names its session: ``resp_<16 hex>-<session id>``; the session's
``settings["responses"]`` maps each stored response id to ``{"response": the response object,
"num_items": messages in the session when it ended}``. Both live in the session record, so
they go to Redis with ``--redis-url`` and a stored response is found after a restart and on
any instance (``SessionManager.get`` loads the record and takes the lease).

Continuing ``previous_response_id`` appends only the new input to that response's session and
reuses its KV, when the response is the session's latest and the instructions and tools are
unchanged; otherwise (or with ``store: false``) a copy-on-write fork of the session, cut back
to that response, is continued. A request that fails or is cancelled leaves nothing behind:
its new session is closed, or the items it appended are truncated away. Sessions behind
responses count toward ``max_sessions_per_key``; at the limit, the least recently used idle
one of the key is closed to make room (its responses are gone).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

from api.errors import APIError
from api.responses_request import ResponsesRequest
from api.state import ServerState
from sessions.errors import SessionAccessError, SessionClosedError, SessionNotFoundError
from sessions.session import Session, SessionState

RESPONSES_KEY = "responses"


def response_id_for(session: Session) -> str:
    return f"resp_{secrets.token_hex(8)}-{session.session_id}"


def session_id_of(response_id: str) -> str | None:
    prefix, _, session_id = response_id.partition("-")
    if not prefix.startswith("resp_") or not session_id.startswith("sess_"):
        return None
    return session_id


@dataclass
class OpenedSession:
    """The session a request runs in; ``created``: made for this request (closed on failure
    or with ``store: false``); else ``num_items_before`` is where its appended input starts."""

    session: Session
    created: bool
    num_items_before: int


async def find_response(
    state: ServerState, owner: str, response_id: str, param: str | None = None
) -> tuple[Session, dict[str, Any]]:
    """The session and stored entry of ``response_id``; APIError 404 if there is none for
    ``owner`` (another tenant's response is not found either). SessionMovedError passes
    through (the HTTP handler redirects to the owner instance)."""
    not_found = APIError(
        f"no response {response_id!r}",
        code="previous_response_not_found" if param else "response_not_found",
        status=404,
        param=param,
    )
    session_id = session_id_of(response_id)
    if session_id is None:
        raise not_found
    try:
        session = await state.sessions.resume(session_id, owner)
    except (SessionNotFoundError, SessionAccessError, SessionClosedError):
        raise not_found from None
    entry = session.settings.get(RESPONSES_KEY, {}).get(response_id)
    if entry is None:
        raise not_found
    return session, entry


def make_room(state: ServerState, owner: str) -> None:
    """Keep ``owner`` under ``max_sessions_per_key`` before a session is created: close its
    least recently used idle response session, or raise APIError 429 ``too_many_sessions``."""
    manager = state.sessions
    sessions = manager.sessions_of(owner)
    if len(sessions) < state.limits.max_sessions_per_key:
        return
    idle = [
        s for s in sessions if RESPONSES_KEY in s.settings and s.state is not SessionState.ACTIVE
    ]
    if not idle:
        raise APIError("this key has too many open sessions", code="too_many_sessions", status=429)
    close_session(state, min(idle, key=lambda s: s.last_active_at))


def close_session(state: ServerState, session: Session) -> None:
    state.sessions.close(session)
    state.tools.close_sandbox(session.session_id)


async def open_session(
    state: ServerState,
    owner: str,
    request: ResponsesRequest,
    previous: tuple[Session, dict[str, Any]] | None,
) -> OpenedSession:
    """The session ``request`` runs in, its input appended (see the module docstring)."""
    manager = state.sessions
    if previous is None:
        make_room(state, owner)
        session = manager.create(owner, request.instructions, settings={RESPONSES_KEY: {}})
        opened = OpenedSession(session, True, 0)
    else:
        base, entry = previous
        if request.store and _continues_in_place(base, entry, request):
            opened = OpenedSession(base, False, len(base.messages))
        else:
            make_room(state, owner)
            fork = manager.fork(base)
            opened = OpenedSession(fork, True, 0)
            try:
                manager.update(fork, settings={RESPONSES_KEY: {}})
                extra = len(fork.messages) - entry["num_items"]
                if extra > 0:
                    manager.truncate(fork, extra)
                if request.instructions is not None:
                    manager.update(fork, instructions=request.instructions)
            except BaseException:
                abandon(state, opened)
                raise
    try:
        manager.update(opened.session, tools=request.tools)
        if request.messages:
            await manager.add_items(opened.session, request.messages)
    except BaseException:
        abandon(state, opened)
        raise
    return opened


def _continues_in_place(session: Session, entry: dict[str, Any], request: ResponsesRequest) -> bool:
    if entry["num_items"] != len(session.messages) or session.state is SessionState.ACTIVE:
        return False
    if request.tools != session.tools:
        return False
    if request.instructions is None:
        return True
    first = session.messages[0] if session.messages else {}
    return first.get("role") == "system" and first.get("content") == request.instructions


def abandon(state: ServerState, opened: OpenedSession) -> None:
    """Undo what a failed or cancelled request did to its session (best effort: the session
    may have been closed or taken over meanwhile)."""
    try:
        if opened.created:
            close_session(state, opened.session)
            return
        extra = len(opened.session.messages) - opened.num_items_before
        if extra > 0:
            state.sessions.truncate(opened.session, extra)
    except Exception:  # noqa: BLE001  (nothing more can be undone; the record is the truth)
        return


def store_response(
    state: ServerState, opened: OpenedSession, response_id: str, response: dict[str, Any]
) -> None:
    """Keep ``response`` in its session's record (it can be continued and fetched)."""
    session = opened.session
    entries = dict(session.settings.get(RESPONSES_KEY, {}))
    entries[response_id] = {"response": response, "num_items": len(session.messages)}
    state.sessions.update(session, settings={RESPONSES_KEY: entries})


def delete_response(state: ServerState, session: Session, response_id: str) -> None:
    """Forget a stored response; the session goes with its last response."""
    entries = dict(session.settings.get(RESPONSES_KEY, {}))
    entries.pop(response_id, None)
    if entries:
        state.sessions.update(session, settings={RESPONSES_KEY: entries})
    else:
        close_session(state, session)
