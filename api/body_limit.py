"""Request bodies are limited while they arrive, not after they were buffered.

``BodyLimitMiddleware`` (pure ASGI, HTTP only) answers ``413`` at once when the declared
``Content-Length`` is over the limit, without reading the body; for a chunked body (no length
given) it counts the bytes as the application receives them and raises ``APIError(413)`` as
soon as the count passes the limit. uvicorn stops reading the socket while the application
is not receiving (flow control), so at most about one chunk past the limit is ever held.
"""

from __future__ import annotations

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import APIError


def too_large(max_bytes: int) -> APIError:
    return APIError(f"request body over {max_bytes} bytes", code="request_too_large", status=413)


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            error = too_large(self.max_bytes)
            # "Connection: close": the unread body must not be parsed as a next request.
            response = JSONResponse(
                error.body(), status_code=error.status, headers={"Connection": "close"}
            )
            await response(scope, receive, send)
            return
        await self.app(scope, self._counting(receive), send)

    def _counting(self, receive: Receive) -> Receive:
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise too_large(self.max_bytes)
            return message

        return counted


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
