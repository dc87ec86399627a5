"""REST view of a key's own sessions: open, list, get, delete."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from api.errors import APIError, session_moved
from api.openai_http import read_json
from api.session_open import open_session, session_info
from api.state import ServerState
from api.ws_protocol import ProtocolError, session_config
from sessions.errors import InvalidSessionInputError, SessionError, SessionMovedError
from sessions.session import Session


def session_summary(session: Session) -> dict[str, Any]:
    return {
        "id": session.session_id,
        "object": "session",
        "state": session.state.value,
        "created_at": int(session.created_at),
        "num_items": len(session.messages),
        "num_tokens": len(session.token_ids),
        "num_turns": session.num_turns,
    }


async def _owned(request: Request) -> tuple[ServerState, Session]:
    """The caller's session; raises APIError: 404, or 307 to the instance that owns it (an
    owner that does not answer is taken over instead: ``SessionManager.resume``)."""
    state: ServerState = request.app.state.tarry
    owner = state.owner_for(request.headers.get("authorization"))
    try:
        session = await state.sessions.resume(request.path_params["session_id"], owner)
    except SessionMovedError as exc:
        raise session_moved(exc, request) from exc
    except SessionError as exc:
        raise APIError(str(exc), code=exc.code, status=404) from exc
    return state, session


async def create_session(request: Request) -> Response:
    """``POST /v1/sessions``: open a session over HTTP. The body is what ``session.create``
    takes as its ``session`` (instructions, tools, tool_choice, sampling defaults); the
    answer is the session object of ``session.created``: its ``id`` (for the
    ``X-Tarry-Session-Id`` header of chat completions) and ``resume_token`` (for the
    WebSocket's ``session.resume``). 400 for a bad field, 429 at the key's session limit."""
    state: ServerState = request.app.state.tarry
    owner = state.owner_for(request.headers.get("authorization"))
    body = await read_json(request, state.limits.max_frame_bytes)
    try:
        config = session_config({"session": body})
    except ProtocolError as exc:
        raise APIError(exc.message, code=exc.code) from exc
    try:
        session, resume_token = open_session(state, owner, config)
    except InvalidSessionInputError as exc:
        raise APIError(str(exc), code=exc.code) from exc
    return JSONResponse(session_info(state, session, resume_token))


async def list_sessions(request: Request) -> Response:
    state: ServerState = request.app.state.tarry
    owner = state.owner_for(request.headers.get("authorization"))
    data = [session_summary(s) for s in state.sessions.sessions_of(owner)]
    return JSONResponse({"object": "list", "data": data})


async def get_session(request: Request) -> Response:
    _, session = await _owned(request)
    return JSONResponse({**session_summary(session), "items": session.messages})


async def delete_session(request: Request) -> Response:
    state, session = await _owned(request)
    try:
        state.sessions.close(session)
    except SessionMovedError as exc:  # taken over since it was loaded
        raise session_moved(exc, request) from exc
    except SessionError as exc:
        raise APIError(str(exc), code=exc.code, status=409) from exc
    state.tools.close_sandbox(session.session_id)
    return JSONResponse({"id": session.session_id, "object": "session.deleted", "deleted": True})
