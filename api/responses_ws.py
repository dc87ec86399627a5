"""The Responses API WebSocket mode at ``/v1/responses`` (what the OpenAI Agents SDK speaks
with ``use_responses_websocket=True``).

Each ``response.create`` frame carries a Responses request, run exactly as over HTTP
(``api.responses_request``, ``api.responses_sessions``, ``api.responses_stream``): every
sampling field, tools and ``tool_choice``. ``previous_response_id`` names a response of this
connection; only the new input items are appended to that response's session and its kept
KV is reused. Events mirror OpenAI's: ``response.created``, ``response.output_item.added``,
``response.output_text.delta``, ..., ``response.completed`` (or ``response.incomplete``),
and ``error``. Whatever ``store`` says, a connection keeps its responses' sessions while it
lives (as OpenAI's WebSocket mode does) and closes them when it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect

from api.json_input import loads_json
from api.responses_request import parse_responses_request
from api.responses_sessions import close_session, find_response, open_session, response_id_for
from api.responses_stream import response_stream
from api.state import ServerState
from api.ws_auth import accept_authenticated
from api.ws_protocol import ProtocolError, error_event, error_event_of
from sessions.errors import SessionError
from sessions.session import Session

logger = logging.getLogger(__name__)


class ResponsesConnection:
    def __init__(self, websocket: WebSocket, state: ServerState, owner: str) -> None:
        self.websocket = websocket
        self.state = state
        self.owner = owner
        self.sessions_by_response: dict[str, Session] = {}
        self.sequence = 0

    async def send(self, event: dict[str, Any]) -> None:
        event["sequence_number"] = self.sequence
        self.sequence += 1
        await self.websocket.send_text(json.dumps(event))

    async def serve(self) -> None:
        """Answer ``response.create`` frames one at a time, in order. Frames are read while a
        response runs, so a dropped connection cancels it at once (its engine request is
        aborted before the next step), not at the next write."""
        frames: asyncio.Queue[str | bytes | None] = asyncio.Queue()
        reader = asyncio.create_task(self._read_frames(frames))
        try:
            while True:
                frame = await frames.get()
                if frame is None:
                    return
                work = asyncio.create_task(self._handle(frame))
                await asyncio.wait({work, reader}, return_when=asyncio.FIRST_COMPLETED)
                if reader.done():  # the client is gone: stop its response, answer no more
                    work.cancel()
                    await asyncio.gather(work, return_exceptions=True)
                    return
                await work  # an unexpected error ends the connection, as before
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
            for session in {id(s): s for s in self.sessions_by_response.values()}.values():
                with contextlib.suppress(SessionError):
                    close_session(self.state, session)

    async def _read_frames(self, frames: asyncio.Queue[str | bytes | None]) -> None:
        """Queue every client frame; None (and return) once the connection is gone."""
        try:
            while True:
                message = await self.websocket.receive()
                if message["type"] == "websocket.disconnect":
                    return
                data = message.get("text")
                frames.put_nowait(data if data is not None else message.get("bytes") or b"")
        except (WebSocketDisconnect, RuntimeError):
            return
        finally:
            frames.put_nowait(None)

    async def _handle(self, raw: str | bytes) -> None:
        event_id = None
        try:
            if len(raw) > self.state.limits.max_frame_bytes:
                raise ProtocolError("frame_too_large", "the frame is too large")
            if isinstance(raw, bytes):
                raise ProtocolError("invalid_frame", "frames must be JSON text")
            try:
                request = loads_json(raw)
            except ValueError as exc:
                raise ProtocolError("invalid_frame", f"not valid JSON: {exc}") from exc
            if not isinstance(request, dict) or request.get("type") != "response.create":
                raise ProtocolError("unknown_event", "only response.create is accepted")
            event_id = request.get("event_id")
            await self._respond(request)
        except Exception as exc:
            error = error_event_of(exc, event_id)
            if error is None:  # a bug: report it, keep the connection
                logger.exception("response.create failed")
                error = error_event("server_error", "the response failed", event_id, "server_error")
            await self.send(error)

    async def _respond(self, body: dict[str, Any]) -> None:
        request = dataclasses.replace(parse_responses_request(body, self.state), store=True)
        previous = None
        if request.previous_response_id is not None:
            if request.previous_response_id not in self.sessions_by_response:
                raise ProtocolError(
                    "previous_response_not_found",
                    f"no response {request.previous_response_id!r} on this connection",
                )
            previous = await find_response(
                self.state, self.owner, request.previous_response_id, "previous_response_id"
            )
        opened = await open_session(self.state, self.owner, request, previous)
        response_id = response_id_for(opened.session)
        async for event in response_stream(
            self.state, opened, request, response_id, "responses_ws"
        ):
            if event["type"] in ("response.completed", "response.incomplete"):
                self.sessions_by_response[response_id] = opened.session
            await self.send(event)


async def responses_socket(websocket: WebSocket) -> None:
    state: ServerState = websocket.app.state.tarry
    owner = await accept_authenticated(websocket, state, websocket.headers.get("authorization"))
    if owner is not None:
        await ResponsesConnection(websocket, state, owner).serve()
