"""The authentication prologue of every WebSocket surface (session protocol, Responses API)."""

from __future__ import annotations

from starlette.websockets import WebSocket

from api.errors import APIError
from api.state import ServerState

CLOSE_AUTH = 4001  # PROTOCOL.md: invalid or missing API key


async def accept_authenticated(
    websocket: WebSocket,
    state: ServerState,
    authorization: str | None,
    subprotocol: str | None = None,
) -> str | None:
    """Accept the connection and return its owner id, or close it with ``CLOSE_AUTH`` and
    return None. The socket is accepted first even then, so that the client sees the close
    code (not a bare HTTP 403); no frame is read from it."""
    try:
        owner = state.owner_for(authorization)
    except APIError:
        await websocket.accept()
        await websocket.close(CLOSE_AUTH, "invalid or missing API key")
        return None
    await websocket.accept(subprotocol=subprotocol)
    return owner
