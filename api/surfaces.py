"""Route wrappers that name the surface of each request for the metrics (``api.metrics``).

``surface_app(endpoint, handler)`` is an HTTP route's ASGI app: it sets a ``RequestScope`` for
the request (the engine's metrics observer reads it for the ``endpoint`` label of every
generation the request starts) and counts a request answered with a 4xx/5xx before it started
any generation. ``surface_socket(endpoint, handler)`` does the same for a WebSocket route
(its generations are counted by the observer; a refused event is answered on the socket).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import request_response, websocket_session
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from starlette.websockets import WebSocket

from api.metrics import CURRENT_SCOPE, RequestScope


class _SurfaceApp:
    def __init__(self, endpoint: str, app: ASGIApp) -> None:
        self.endpoint = endpoint
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request_scope = RequestScope(self.endpoint)
        token = CURRENT_SCOPE.set(request_scope)
        status = 500  # an exception before any response is a 500 (see api.app.server_error)

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            CURRENT_SCOPE.reset(token)
            if scope["type"] == "http" and status >= 400 and not request_scope.num_generations:
                scope["app"].state.tarry.metrics.record_refused(self.endpoint, status)


def surface_app(endpoint: str, handler: Callable[[Request], Awaitable[Response]]) -> ASGIApp:
    """The ASGI app of an HTTP route whose generations count under ``endpoint``."""
    return _SurfaceApp(endpoint, request_response(handler))


def surface_socket(endpoint: str, handler: Callable[[WebSocket], Awaitable[None]]) -> ASGIApp:
    """The ASGI app of a WebSocket route whose generations count under ``endpoint``."""
    return _SurfaceApp(endpoint, websocket_session(handler))
