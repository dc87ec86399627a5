"""Opening a session, shared by the WebSocket ``session.create`` and ``POST /v1/sessions``.

A session is created with its instructions, tools and sampling defaults, and a resume token
(returned once; only its SHA-256 is kept in the session's settings) that ``session.resume``
checks. The session id alone binds a chat completion to it (``X-Tarry-Session-Id``), for the
key that created it.
"""

from __future__ import annotations

import hashlib
import secrets
from typing import Any

from api.errors import APIError
from api.openai_params import sampling_from_fields
from api.state import ServerState
from api.tool_runtime import check_tool_choice, normalize_tools
from engine.sampling_params import SamplingParams
from sessions.session import Session


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def session_sampling(state: ServerState, config: dict[str, Any]) -> SamplingParams:
    """Sampling parameters of a session / response config; APIError for a bad value (so
    that a session default is refused when it is set, not at every later response)."""
    check_tool_choice(None, config.get("tool_choice"))
    return sampling_from_fields(config, state.limits.max_output_tokens, state.sampling_defaults)


def open_session(state: ServerState, owner: str, config: dict[str, Any]) -> tuple[Session, str]:
    """A new session of ``owner`` from a checked ``session`` config (``ws_protocol.
    session_config``) and its resume token. Raises APIError for a bad sampling value or tool
    (400) or when the key has too many sessions (429, ``too_many_sessions``); nothing is
    created then. Budget errors (``HistoryTooLongError``) propagate."""
    session_sampling(state, config)
    manager = state.sessions
    if len(manager.sessions_of(owner)) >= state.limits.max_sessions_per_key:
        raise APIError("this key has too many open sessions", code="too_many_sessions", status=429)
    tools = normalize_tools(config.get("tools"))
    resume_token = secrets.token_urlsafe(24)
    defaults = {k: v for k, v in config.items() if k not in ("instructions", "tools")}
    settings = {"resume_token_sha256": token_hash(resume_token), "defaults": defaults}
    return manager.create(owner, config.get("instructions"), tools, settings), resume_token


def session_info(state: ServerState, session: Session, resume_token: str | None) -> dict[str, Any]:
    """The session object of ``session.created`` / ``POST /v1/sessions`` (with the resume
    token when given) and of ``session.resumed`` / ``session.updated`` (without)."""
    limits = state.limits
    info: dict[str, Any] = {
        "id": session.session_id,
        "object": "session",
        "model": state.model_name,
        "state": session.state.value,
        "num_items": len(session.messages),
        "num_tokens": len(session.token_ids),
        "limits": {
            "max_frame_bytes": limits.max_frame_bytes,
            "max_items": limits.max_items_per_session,
            "max_output_tokens": limits.max_output_tokens,
            "max_history_tokens": state.sessions.budget.max_tokens,
            "max_history_bytes": state.sessions.budget.max_bytes,
            "idle_timeout_s": limits.idle_timeout_s,
        },
    }
    if resume_token is not None:
        info["resume_token"] = resume_token
    return info
