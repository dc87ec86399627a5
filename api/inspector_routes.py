"""The inspector page at ``/ui``: static files and the push channel ``/ui/ws``.

Access (the same rules as the rest of the server):

- without API keys: loopback clients only, for the page and the channel alike (403 / close
  1008 otherwise); a loopback viewer sees every session;
- with API keys: anyone may load the page, which asks for a key; the channel's first message
  must carry a valid key, and that tenant then sees only its own sessions (pool and tier
  figures are server-wide aggregates and shown to every valid key).

Channel protocol (JSON text frames)::

    client: {"type": "hello", "api_key": "..." | null}       first frame, within 10 s
    server: {"type": "welcome", "model", "auth": "api_key" | "loopback", "history": [points]}
    server: {"type": "snapshot", "pool", "tiers", "sessions", "point", "sampler", "session"}
            about once per second, and at once after a "select"
    client: {"type": "select", "session_id": "..." | null}   the session whose turns to show
    server: {"type": "error", "code", "message"}             bad key (then close 4001) or frame
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path
from typing import Any

from starlette.requests import HTTPConnection, Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.websockets import WebSocket, WebSocketDisconnect

from api.errors import APIError
from api.inspector import InspectorHub, Viewer
from api.net import is_loopback
from api.state import ServerState
from api.ws_auth import CLOSE_AUTH

STATIC_DIR = Path(__file__).parent / "inspector_static"
STATIC_FILES = {"inspector.js": "text/javascript", "inspector.css": "text/css"}
CLOSE_POLICY = 1008  # not loopback, and the server has no API keys

HELLO_TIMEOUT_S = 10.0
MAX_SESSION_ID_CHARS = 128
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}


def inspector_allowed(client_host: str | None, api_keys: set[str]) -> bool:
    """Whether a client may reach the inspector at all: anyone when the server has API keys
    (the key is checked on the channel), otherwise only loopback clients."""
    return bool(api_keys) or is_loopback(client_host)


def viewer_owner(state: ServerState, api_key: Any) -> str | None:
    """The owner whose sessions a viewer sees: None (all) without API keys, else the key's
    tenant. Raises APIError(401) for a missing or wrong key."""
    if not state.api_keys:
        return None
    if not isinstance(api_key, str):
        raise APIError("invalid or missing API key", code="invalid_api_key", status=401)
    return state.owner_for("Bearer " + api_key)


def _check_access(conn: HTTPConnection) -> ServerState:
    state: ServerState = conn.app.state.tarry
    client = conn.client.host if conn.client is not None else None
    if not inspector_allowed(client, state.api_keys):
        raise APIError(
            "the inspector is served to loopback clients only when the server has no API keys",
            code="forbidden",
            status=403,
        )
    return state


async def page(request: Request) -> Response:
    _check_access(request)
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers=SECURITY_HEADERS)


async def static_file(request: Request) -> Response:
    _check_access(request)
    name = request.path_params["name"]
    if name not in STATIC_FILES:
        return JSONResponse({"error": {"message": "not found", "code": "not_found"}}, 404)
    return FileResponse(STATIC_DIR / name, media_type=STATIC_FILES[name], headers=SECURITY_HEADERS)


async def inspector_socket(websocket: WebSocket) -> None:
    """Authenticate with the first frame, then push snapshots until the page goes away."""
    try:
        state = _check_access(websocket)
    except APIError:
        await websocket.close(CLOSE_POLICY, "loopback only")
        return
    hub: InspectorHub = websocket.app.state.inspector
    await websocket.accept()
    viewer = await _hello(websocket, state)
    if viewer is None:
        return
    hub.add(viewer)
    reader = asyncio.create_task(_read(websocket, viewer))
    try:
        await _push(websocket, hub, viewer, reader)
    finally:
        hub.remove(viewer)
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await reader


async def _hello(websocket: WebSocket, state: ServerState) -> Viewer | None:
    """The viewer, or None after refusing it (bad key, no hello) and closing the socket."""
    hub: InspectorHub = websocket.app.state.inspector
    try:
        hello = await asyncio.wait_for(websocket.receive_text(), HELLO_TIMEOUT_S)
        message = json.loads(hello)
        if not isinstance(message, dict) or message.get("type") != "hello":
            raise ValueError('the first frame must be {"type": "hello", "api_key": ...}')
        owner = viewer_owner(state, message.get("api_key"))
    except (TimeoutError, WebSocketDisconnect):
        with contextlib.suppress(Exception):
            await websocket.close(CLOSE_AUTH, "no hello")
        return None
    except APIError as exc:
        await _refuse(websocket, exc.code, exc.message)
        return None
    except ValueError as exc:  # bad JSON or not a hello
        await _refuse(websocket, "invalid_request", str(exc))
        return None
    await websocket.send_text(
        json.dumps(
            {
                "type": "welcome",
                "model": state.model_name,
                "auth": "api_key" if state.api_keys else "loopback",
                "interval_s": hub.interval_s,
                "history": list(hub.history),
            }
        )
    )
    return Viewer(owner)


async def _refuse(websocket: WebSocket, code: str, message: str) -> None:
    with contextlib.suppress(Exception):
        await websocket.send_text(json.dumps({"type": "error", "code": code, "message": message}))
        await websocket.close(CLOSE_AUTH, code)


async def _read(websocket: WebSocket, viewer: Viewer) -> None:
    """Take ``select`` frames; a bad frame gets an error event and changes nothing."""
    while True:
        frame = await websocket.receive()
        if frame["type"] == "websocket.disconnect":
            raise WebSocketDisconnect(frame.get("code", 1000))
        try:
            if frame.get("text") is None:
                raise ValueError("frames must be JSON text")
            message = json.loads(frame["text"])
            session_id = message.get("session_id") if isinstance(message, dict) else None
            if not isinstance(message, dict) or message.get("type") != "select":
                raise ValueError('expected {"type": "select", "session_id": ...}')
            if session_id is not None and (
                not isinstance(session_id, str) or len(session_id) > MAX_SESSION_ID_CHARS
            ):
                raise ValueError("session_id must be a short string or null")
        except ValueError as exc:
            error = {"type": "error", "code": "invalid_request", "message": str(exc)}
            await websocket.send_text(json.dumps(error))
            continue
        viewer.selected = session_id
        viewer.wake.set()


async def _push(
    websocket: WebSocket, hub: InspectorHub, viewer: Viewer, reader: asyncio.Task[None]
) -> None:
    """Send the latest snapshot each time the viewer is woken, until the reader ends."""
    while not reader.done():
        waiter = asyncio.ensure_future(viewer.wake.wait())
        await asyncio.wait({waiter, reader}, return_when=asyncio.FIRST_COMPLETED)
        if not waiter.done():
            waiter.cancel()
            return
        viewer.wake.clear()
        cpu = time.thread_time()
        view = hub.view_for(viewer)
        text = None if view is None else json.dumps(view)
        hub.note_push_cpu(time.thread_time() - cpu)
        if text is not None:
            try:
                await websocket.send_text(text)
            except (WebSocketDisconnect, RuntimeError):
                return
