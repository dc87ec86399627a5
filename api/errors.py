"""Client-visible API errors: one type, an HTTP status and an OpenAI-style body."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request

from engine.errors import InvalidRequestError
from sessions.errors import (
    InvalidSessionInputError,
    SessionAccessError,
    SessionClosedError,
    SessionError,
    SessionMovedError,
    SessionNotFoundError,
)


class APIError(Exception):
    """An error the client caused (or must be told about); nothing was changed by the call."""

    def __init__(
        self,
        message: str,
        code: str = "invalid_request",
        status: int = 400,
        param: str | None = None,
        location: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status
        self.param = param
        self.location = location  # the Location header of a redirect (status 307)

    def body(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        if self.status in (401, 403):
            kind = "authentication_error"
        return {
            "error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}
        }


def session_moved(exc: SessionMovedError, request: Request) -> APIError:
    """``307`` to the same path and query on the owner instance, or ``409`` when the owner's
    URL is unknown (Redis unavailable, or it died and nobody took the session yet)."""
    if exc.owner_url is None:
        return APIError(str(exc), code=exc.code, status=409)
    location = exc.owner_url.rstrip("/") + request.url.path
    if request.url.query:
        location += f"?{request.url.query}"
    return APIError(str(exc), code=exc.code, status=307, location=location)


def to_api_error(exc: Exception) -> APIError | None:
    """The client-facing error of an exception a request can raise, for every surface (an
    HTTP status + OpenAI body, or a WebSocket ``error`` event with the same ``code``); None
    for anything else (a bug). ``session_moved`` is a 409 here: an HTTP handler that can
    redirect answers ``session_moved(exc, request)`` instead, a WebSocket event adds the
    owner's URL."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, InvalidRequestError | InvalidSessionInputError):
        return APIError(str(exc), code=getattr(exc, "code", "invalid_request"))
    if isinstance(exc, SessionNotFoundError | SessionAccessError | SessionClosedError):
        return APIError(str(exc), code=exc.code, status=404)
    if isinstance(exc, SessionError):  # busy, moved
        return APIError(str(exc), code=exc.code, status=409)
    return None
