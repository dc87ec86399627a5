"""The WebSocket session protocol at ``/v1/sessions`` (see docs/PROTOCOL.md).

One connection drives one session at a time. Client events are handled in order; a response
runs as a task so that ``response.cancel`` (and everything else) stays responsive. A dropped
connection cancels the running response: the session keeps the history it had before that
response and, like every turn end, is placed by the pause policy (OFFLOADED by default, as its
client is gone), then can be resumed with ``session.resume`` from any connection of the same
key.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Mapping
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect

from api.response_run import ResponseRun
from api.session_open import open_session, session_info, session_sampling, token_hash
from api.state import ServerState
from api.tool_runtime import normalize_tools
from api.ws_auth import accept_authenticated
from api.ws_protocol import (
    AUTH_SUBPROTOCOL_PREFIX,
    MSGPACK_SUBPROTOCOL,
    ProtocolError,
    decode_frame,
    encode_frame,
    error_event,
    error_event_of,
    item_to_message,
    session_config,
)
from engine.sampling_params import SamplingParams
from sessions.session import Session

logger = logging.getLogger(__name__)

CLOSE_IDLE = 4000
CLOSE_RATE = 4008


class SessionConnection:
    """State of one WebSocket connection: the bound session and its running response."""

    def __init__(self, websocket: WebSocket, state: ServerState, owner: str, binary: bool) -> None:
        self.websocket = websocket
        self.state = state
        self.owner = owner
        self.binary = binary
        self.session: Session | None = None
        self.response_task: asyncio.Task[None] | None = None
        self._send_lock = asyncio.Lock()
        self._window_start = time.monotonic()
        self._window_events = 0

    async def send(self, event: dict[str, Any]) -> None:
        frame = encode_frame(event, self.binary)
        async with self._send_lock:
            if isinstance(frame, bytes):
                await self.websocket.send_bytes(frame)
            else:
                await self.websocket.send_text(frame)

    async def send_error(self, code: str, message: str, event_id: str | None = None) -> None:
        await self.send(error_event(code, message, event_id))

    # -- the receive loop -----------------------------------------------------------------

    async def serve(self) -> None:
        limits = self.state.limits
        timeout_s = limits.first_event_timeout_s  # a client that sends nothing is let go soon
        try:
            while True:
                try:
                    message = await asyncio.wait_for(self.websocket.receive(), timeout=timeout_s)
                    timeout_s = limits.idle_timeout_s
                except TimeoutError:
                    await self.websocket.close(CLOSE_IDLE, "idle timeout")
                    return
                if message["type"] == "websocket.disconnect":
                    return
                if not self._within_rate():
                    await self.send_error("rate_limited", "too many events per second")
                    if self._window_events > 2 * limits.max_events_per_second:
                        await self.websocket.close(CLOSE_RATE, "rate limit exceeded")
                        return
                    continue
                await self._handle_frame(message)
        except WebSocketDisconnect:
            return
        finally:
            if self.response_task is not None and not self.response_task.done():
                self.response_task.cancel()
                await asyncio.gather(self.response_task, return_exceptions=True)

    def _within_rate(self) -> bool:
        now = time.monotonic()
        if now - self._window_start >= 1.0:
            self._window_start, self._window_events = now, 0
        self._window_events += 1
        return self._window_events <= self.state.limits.max_events_per_second

    async def _handle_frame(self, message: Mapping[str, Any]) -> None:
        data = message.get("bytes") if message.get("bytes") is not None else message.get("text")
        if data is None:
            return
        if len(data) > self.state.limits.max_frame_bytes:
            await self.send_error(
                "frame_too_large",
                f"frames are limited to {self.state.limits.max_frame_bytes} bytes",
            )
            return
        event_id = None
        try:
            event = decode_frame(data, isinstance(data, bytes))
            event_id = event.get("event_id")
            await self._dispatch(event)
        except Exception as exc:
            error = error_event_of(exc, event_id)
            if error is None:  # a bug: report it, keep the connection and the session
                logger.exception("event %s failed", event_id)
                error = error_event("server_error", "the event failed", event_id, "server_error")
            await self.send(error)

    async def _dispatch(self, event: dict[str, Any]) -> None:
        kind = event["type"]
        handler = {
            "session.create": self._create,
            "session.resume": self._resume,
            "session.update": self._update,
            "conversation.item.create": self._item_create,
            "conversation.item.truncate": self._truncate,
            "response.create": self._response_create,
            "response.cancel": self._response_cancel,
            "session.fork": self._fork,
            "session.close": self._close,
        }[kind]
        if kind not in ("session.create", "session.resume") and self.session is None:
            raise ProtocolError(
                "no_session", "send session.create or session.resume first", event.get("event_id")
            )
        await handler(event)

    # -- session events -------------------------------------------------------------------

    def _session_info(self, session: Session, resume_token: str | None) -> dict[str, Any]:
        return session_info(self.state, session, resume_token)

    async def _create(self, event: dict[str, Any]) -> None:
        config = session_config(event)
        self._sampling(config)
        if self.session is not None:
            raise ProtocolError(
                "session_already_bound",
                "this connection already has a session",
                event.get("event_id"),
            )
        session, resume_token = open_session(self.state, self.owner, config)
        self.session = session
        await self.send(
            {"type": "session.created", "session": self._session_info(session, resume_token)}
        )

    async def _resume(self, event: dict[str, Any]) -> None:
        session_id, token = event.get("session_id"), event.get("resume_token")
        migrate = event.get("migrate", False)
        if not isinstance(session_id, str) or not isinstance(token, str):
            raise ProtocolError(
                "invalid_event",
                "session.resume needs session_id and resume_token",
                event.get("event_id"),
            )
        if not isinstance(migrate, bool):
            raise ProtocolError("invalid_event", "migrate must be a boolean", event.get("event_id"))

        def check_token(session: Session) -> None:
            expected = session.settings.get("resume_token_sha256", "")
            if not secrets.compare_digest(expected, token_hash(token)):
                raise ProtocolError(
                    "session_not_found", f"no session {session_id!r}", event.get("event_id")
                )

        # An owner that does not answer is taken over at once (failover without the TTL).
        session = await self.state.sessions.resume(session_id, self.owner, migrate, check_token)
        self.session = session
        await self.send({"type": "session.resumed", "session": self._session_info(session, None)})

    async def _update(self, event: dict[str, Any]) -> None:
        config = session_config(event)
        session = self._bound()
        self._sampling({**session.settings.get("defaults", {}), **config})
        if "instructions" in config:
            self.state.sessions.budget.check_bytes(
                0, [{"role": "system", "content": config["instructions"]}]
            )
        defaults = dict(session.settings.get("defaults", {}))
        defaults.update({k: v for k, v in config.items() if k not in ("instructions", "tools")})
        self.state.sessions.update(
            session,
            instructions=config.get("instructions"),
            tools=normalize_tools(config["tools"]) if "tools" in config else None,
            settings={"defaults": defaults},
        )
        await self.send({"type": "session.updated", "session": self._session_info(session, None)})

    async def _item_create(self, event: dict[str, Any]) -> None:
        session = self._bound()
        message = item_to_message(event)
        if len(session.messages) >= self.state.limits.max_items_per_session:
            raise ProtocolError(
                "too_many_items",
                "the session holds the maximum number of items",
                event.get("event_id"),
            )
        await self.state.sessions.add_items(session, [message])
        await self.send(
            {
                "type": "conversation.item.added",
                "item": {**event["item"], "id": f"item_{len(session.messages)}"},
            }
        )

    async def _truncate(self, event: dict[str, Any]) -> None:
        count = event.get("count")
        if not isinstance(count, int) or isinstance(count, bool):
            raise ProtocolError(
                "invalid_event",
                "conversation.item.truncate needs an integer count",
                event.get("event_id"),
            )
        session = self._bound()
        self.state.sessions.truncate(session, count)
        await self.send(
            {
                "type": "conversation.item.truncated",
                "count": count,
                "num_items": len(session.messages),
            }
        )

    async def _fork(self, event: dict[str, Any]) -> None:
        session = self._bound()
        child = self.state.sessions.fork(session)  # with the parent's settings and defaults
        token = secrets.token_urlsafe(24)
        self.state.sessions.update(child, settings={"resume_token_sha256": token_hash(token)})
        await self.send({"type": "session.forked", "session": self._session_info(child, token)})

    async def _close(self, event: dict[str, Any]) -> None:
        session = self._bound()
        self.state.sessions.close(session)
        self.state.tools.close_sandbox(session.session_id)
        self.session = None
        await self.send({"type": "session.closed", "session_id": session.session_id})

    def _bound(self) -> Session:
        assert self.session is not None
        return self.session

    # -- responses ------------------------------------------------------------------------

    async def _response_create(self, event: dict[str, Any]) -> None:
        config = session_config(event, "response")
        session = self._bound()
        if self.response_task is not None and not self.response_task.done():
            raise ProtocolError(
                "conversation_already_has_active_response",
                "a response is already in progress",
                event.get("event_id"),
            )
        merged = {**session.settings.get("defaults", {}), **config}
        params = self._sampling(merged)
        generate = config.get("generate", True)
        if not generate:
            params.max_tokens = 1  # prefill only: one token is computed, then discarded
        tool_choice = merged.get("tool_choice", "auto")
        self.state.tools.processors(session.tools, tool_choice)  # reject a bad choice now
        response = ResponseRun(self, session, f"resp_{secrets.token_hex(12)}", params, tool_choice)
        self.response_task = asyncio.create_task(response.run(generate))
        await asyncio.sleep(0)  # let response.created go out before the next event is read

    def _sampling(self, config: dict[str, Any]) -> SamplingParams:
        return session_sampling(self.state, config)

    async def _response_cancel(self, event: dict[str, Any]) -> None:
        task = self.response_task
        if task is None or task.done():
            raise ProtocolError(
                "no_active_response", "there is no response to cancel", event.get("event_id")
            )
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def session_socket(websocket: WebSocket) -> None:
    """Accept (auth + subprotocol negotiation), then serve the protocol until disconnect."""
    state: ServerState = websocket.app.state.tarry
    offered = list(websocket.scope.get("subprotocols", []))
    authorization = websocket.headers.get("authorization")
    for proto in offered:
        if proto.startswith(AUTH_SUBPROTOCOL_PREFIX) and authorization is None:
            authorization = "Bearer " + proto[len(AUTH_SUBPROTOCOL_PREFIX) :]
    binary = MSGPACK_SUBPROTOCOL in offered
    subprotocol = MSGPACK_SUBPROTOCOL if binary else None
    owner = await accept_authenticated(websocket, state, authorization, subprotocol)
    if owner is not None:
        await SessionConnection(websocket, state, owner, binary).serve()
