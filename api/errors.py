"""Client-visible API errors: one type, an HTTP status and an OpenAI-style body."""

from __future__ import annotations

from typing import Any


class APIError(Exception):
    """An error the client caused (or must be told about); nothing was changed by the call."""

    def __init__(
        self,
        message: str,
        code: str = "invalid_request",
        status: int = 400,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status
        self.param = param

    def body(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        if self.status in (401, 403):
            kind = "authentication_error"
        return {
            "error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}
        }
