"""Errors a session client can cause. Each leaves every session as it was."""

from __future__ import annotations


class SessionError(Exception):
    """Base class; ``code`` is a stable machine-readable name for protocol error events."""

    code = "session_error"


class SessionNotFoundError(SessionError):
    code = "session_not_found"


class SessionAccessError(SessionError):
    """The session belongs to another owner (reported like not-found to the caller)."""

    code = "session_not_found"


class SessionBusyError(SessionError):
    """A response is already running in this session."""

    code = "conversation_already_has_active_response"


class SessionClosedError(SessionError):
    code = "session_closed"


class InvalidSessionInputError(SessionError):
    code = "invalid_request"


class HistoryTooLongError(InvalidSessionInputError):
    """The conversation would no longer fit the model's context (or its byte budget)."""

    code = "context_length_exceeded"


class SessionMovedError(SessionError):
    """Another live instance owns the session; ``owner_url`` is where to send the client.

    ``owner_id`` is set when the owner is alive by its registration (the caller may probe
    ``owner_url`` and, if nobody answers there, take the session over)."""

    code = "session_moved"

    def __init__(self, message: str, owner_url: str | None, owner_id: str | None = None) -> None:
        super().__init__(message)
        self.owner_url = owner_url
        self.owner_id = owner_id


class TooManySessionsError(SessionError):
    """The server holds its maximum number of sessions (``--max-sessions``)."""

    code = "server_session_limit"
