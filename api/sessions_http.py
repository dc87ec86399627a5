"""REST view of a key's own sessions: list, get, delete."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from api.errors import APIError, session_moved
from api.state import ServerState
from sessions.errors import SessionError, SessionMovedError
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
