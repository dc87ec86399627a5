"""The Responses API WebSocket mode at ``/v1/responses`` (what the OpenAI Agents SDK speaks
with ``use_responses_websocket=True``).

Each ``response.create`` frame carries a Responses request. With ``previous_response_id``
(a response of this connection) only the new input items are appended to that response's
session and its kept KV is reused; otherwise a new session is started from the full input
(the prefix cache still reuses what earlier requests computed). Events mirror OpenAI's:
``response.created``, ``response.output_item.added``, ``response.output_text.delta``, ...,
``response.completed`` (or ``response.incomplete``), and ``error``. Sessions created by a
connection are closed when it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect

from api.errors import APIError
from api.json_input import loads_json
from api.openai_params import sampling_from_openai
from api.responses_items import (
    function_call_item,
    input_to_messages,
    message_item,
    new_id,
    response_object,
)
from api.state import ServerState
from api.tool_runtime import normalize_tools
from api.ws_protocol import ProtocolError, error_event
from engine.errors import InvalidRequestError
from sessions.errors import SessionError
from sessions.session import Session
from tools.tool_call import TextDelta, ToolCall, ToolCallDone

CLOSE_AUTH = 4001


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
                    self.state.sessions.close(session)
                self.state.tools.close_sandbox(session.session_id)

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
        except ProtocolError as exc:
            await self.send(error_event(exc.code, exc.message, exc.event_id or event_id))
        except (SessionError, APIError, InvalidRequestError) as exc:
            code = getattr(exc, "code", "invalid_request")
            await self.send(error_event(code, str(exc), event_id))

    async def _session_for(self, request: dict[str, Any], tools: list[dict[str, Any]]) -> Session:
        messages = input_to_messages(request.get("input", []), request.get("event_id"))
        previous = request.get("previous_response_id")
        manager = self.state.sessions
        if previous is not None:
            session = self.sessions_by_response.get(previous)
            if session is None:
                raise ProtocolError(
                    "previous_response_not_found", f"no response {previous!r} on this connection"
                )
        else:
            session = manager.create(self.owner, request.get("instructions"))
        manager.update(session, tools=tools)
        if messages:
            await manager.add_items(session, messages)
        return session

    async def _respond(self, request: dict[str, Any]) -> None:
        body = {
            "max_tokens": request.get("max_output_tokens"),
            "temperature": request.get("temperature"),
            "top_p": request.get("top_p"),
        }
        params = sampling_from_openai(
            body, self.state.limits.max_output_tokens, self.state.sampling_defaults
        )
        tools = normalize_tools(request.get("tools"))
        tool_choice = request.get("tool_choice") or "auto"
        params.logits_processors = self.state.tools.processors(
            tools, tool_choice, params.max_tokens
        )
        session = await self._session_for(request, tools)
        turn = ResponsesTurn(self, new_id("resp"))
        await self.send(
            {
                "type": "response.created",
                "response": response_object(
                    turn.response_id, self.state.model_name, "in_progress", [], request, None
                ),
            }
        )
        parser = self.state.tools.parser() if tools and tool_choice != "none" else None
        status = "completed"
        async for out in self.state.sessions.generate(
            session, params, waiting_for_tool=parser is not None
        ):
            events: list[Any] = (
                [TextDelta(out.new_text)] if parser is None else parser.feed(out.new_text)
            )
            if out.finished and parser is not None:
                events += parser.finish()
            for event in events:
                if isinstance(event, TextDelta) and event.text:
                    await turn.text(event.text)
                elif isinstance(event, ToolCallDone):
                    await turn.function_call(event.call)
            if out.finished and out.finish_reason == "length":
                status = "incomplete"
        await turn.close_message()
        self.sessions_by_response[turn.response_id] = session
        await self.send(
            {
                "type": f"response.{status}",
                "response": response_object(
                    turn.response_id,
                    self.state.model_name,
                    status,
                    turn.output,
                    request,
                    session.last_usage,
                ),
            }
        )


class ResponsesTurn:
    """The output items of one response, announced with OpenAI's item/part events."""

    def __init__(self, connection: ResponsesConnection, response_id: str) -> None:
        self.connection = connection
        self.response_id = response_id
        self.output: list[dict[str, Any]] = []
        self.message_id: str | None = None
        self.message_text = ""

    async def text(self, delta: str) -> None:
        send = self.connection.send
        index = len(self.output)
        if self.message_id is None:
            self.message_id = new_id("msg")
            await send(
                {
                    "type": "response.output_item.added",
                    "output_index": index,
                    "item": message_item(self.message_id, "", "in_progress"),
                }
            )
            await send(
                {
                    "type": "response.content_part.added",
                    "item_id": self.message_id,
                    "output_index": index,
                    "content_index": 0,
                    "part": {"type": "output_text", "text": "", "annotations": []},
                }
            )
        self.message_text += delta
        await send(
            {
                "type": "response.output_text.delta",
                "item_id": self.message_id,
                "output_index": index,
                "content_index": 0,
                "delta": delta,
                "logprobs": [],
            }
        )

    async def close_message(self) -> None:
        if self.message_id is None:
            return
        send, index, text = self.connection.send, len(self.output), self.message_text
        part = {"type": "output_text", "text": text, "annotations": []}
        await send(
            {
                "type": "response.output_text.done",
                "item_id": self.message_id,
                "output_index": index,
                "content_index": 0,
                "text": text,
                "logprobs": [],
            }
        )
        await send(
            {
                "type": "response.content_part.done",
                "item_id": self.message_id,
                "output_index": index,
                "content_index": 0,
                "part": part,
            }
        )
        item = message_item(self.message_id, text, "completed")
        await send({"type": "response.output_item.done", "output_index": index, "item": item})
        self.output.append(item)
        self.message_id, self.message_text = None, ""

    async def function_call(self, call: ToolCall) -> None:
        await self.close_message()
        send, index, item_id = self.connection.send, len(self.output), new_id("fc")
        await send(
            {
                "type": "response.output_item.added",
                "output_index": index,
                "item": function_call_item(item_id, call.call_id, call.name, "", "in_progress"),
            }
        )
        await send(
            {
                "type": "response.function_call_arguments.delta",
                "item_id": item_id,
                "output_index": index,
                "delta": call.arguments_json,
            }
        )
        await send(
            {
                "type": "response.function_call_arguments.done",
                "item_id": item_id,
                "output_index": index,
                "name": call.name,
                "arguments": call.arguments_json,
            }
        )
        item = function_call_item(
            item_id, call.call_id, call.name, call.arguments_json, "completed"
        )
        await send({"type": "response.output_item.done", "output_index": index, "item": item})
        self.output.append(item)


async def responses_socket(websocket: WebSocket) -> None:
    state: ServerState = websocket.app.state.tarry
    try:
        owner = state.owner_for(websocket.headers.get("authorization"))
    except APIError:
        await websocket.accept()  # so that the client sees close code 4001 (PROTOCOL.md)
        await websocket.close(CLOSE_AUTH, "invalid or missing API key")
        return
    await websocket.accept()
    await ResponsesConnection(websocket, state, owner).serve()
