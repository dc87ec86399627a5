"""REST view of a key's own sessions: list, get, delete."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response

from api.errors import APIError
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


class _Moved(Exception):
    """The session lives on another instance: answer 307 to ``location``."""

    def __init__(self, location: str) -> None:
        super().__init__(location)
        self.location = location


def _owned(request: Request) -> tuple[ServerState, Session]:
    """The caller's session; raises APIError(404) or _Moved (another live instance owns it)."""
    state: ServerState = request.app.state.tarry
    owner = state.owner_for(request.headers.get("authorization"))
    try:
        session = state.sessions.get(request.path_params["session_id"], owner)
    except SessionMovedError as exc:
        if exc.owner_url is None:
            raise APIError(str(exc), code=exc.code, status=409) from exc
        target = exc.owner_url.rstrip("/") + request.url.path
        raise _Moved(target + (f"?{request.url.query}" if request.url.query else "")) from exc
    except SessionError as exc:
        raise APIError(str(exc), code=exc.code, status=404) from exc
    return state, session


def _redirect(moved: _Moved) -> Response:
    return RedirectResponse(moved.location, status_code=307)


async def list_sessions(request: Request) -> Response:
    state: ServerState = request.app.state.tarry
    owner = state.owner_for(request.headers.get("authorization"))
    data = [session_summary(s) for s in state.sessions.sessions_of(owner)]
    return JSONResponse({"object": "list", "data": data})


async def get_session(request: Request) -> Response:
    try:
        _, session = _owned(request)
    except _Moved as moved:
        return _redirect(moved)
    return JSONResponse({**session_summary(session), "items": session.messages})


async def delete_session(request: Request) -> Response:
    try:
        state, session = _owned(request)
    except _Moved as moved:
        return _redirect(moved)
    try:
        state.sessions.close(session)
    except SessionError as exc:
        raise APIError(str(exc), code=exc.code, status=409) from exc
    state.tools.close_sandbox(session.session_id)
    return JSONResponse({"id": session.session_id, "object": "session.deleted", "deleted": True})
