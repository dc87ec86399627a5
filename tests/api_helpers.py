"""Helpers for API tests: a live server on a free port, and a small session-protocol client."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import msgpack
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from api.server import BackgroundServer, ServeOptions, build_state
from api.state import ServerState
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.model_loader import LoadedModel


class ProtocolClient:
    """A real ``websockets`` client speaking the session protocol (JSON or msgpack frames)."""

    def __init__(self, base_url: str, api_key: str, binary: bool = False) -> None:
        url = base_url.replace("http://", "ws://") + "/v1/sessions"
        self.binary = binary
        self.ws: ClientConnection = connect(
            url,
            additional_headers={"Authorization": f"Bearer {api_key}"},
            subprotocols=["tarry.msgpack"] if binary else None,  # type: ignore[list-item]
            max_size=None,
        )

    def send(self, event: dict[str, Any]) -> None:
        self.ws.send(msgpack.packb(event) if self.binary else json.dumps(event))

    def send_raw(self, data: str | bytes) -> None:
        self.ws.send(data)

    def recv(self, timeout: float = 60) -> dict[str, Any]:
        frame = self.ws.recv(timeout=timeout)
        if self.binary:
            assert isinstance(frame, bytes), "msgpack sessions get binary frames"
            return msgpack.unpackb(frame)
        assert isinstance(frame, str), "JSON sessions get text frames"
        return json.loads(frame)

    def recv_until(self, event_type: str, timeout: float = 120) -> list[dict[str, Any]]:
        """Every event up to and including the first of ``event_type``."""
        events = []
        while True:
            event = self.recv(timeout)
            events.append(event)
            if event["type"] == event_type:
                return events

    def create_session(self, instructions: str | None = None) -> dict[str, Any]:
        self.send(
            {
                "type": "session.create",
                "session": {"instructions": instructions} if instructions else {},
            }
        )
        event = self.recv()
        assert event["type"] == "session.created", event
        return event["session"]

    def user(self, text: str) -> None:
        self.send(
            {
                "type": "conversation.item.create",
                "item": {
                    "type": "message",
                    "role": "user",
                    "content": [{"type": "input_text", "text": text}],
                },
            }
        )
        event = self.recv()
        assert event["type"] == "conversation.item.added", event

    def respond(self, **overrides: Any) -> tuple[str, dict[str, Any]]:
        """(streamed text, response.done's response) for one response.create."""
        self.send({"type": "response.create", "response": overrides})
        events = self.recv_until("response.done")
        text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
        done = events[-1]["response"]
        state = self.recv()
        assert state["type"] == "session.state", state
        return text, done

    def close(self) -> None:
        """Close; a connection the server already closed (e.g. 4008) is fine."""
        with contextlib.suppress(ConnectionClosed, TimeoutError):
            self.ws.close()


@contextmanager
def live_server(
    model: LoadedModel, options: ServeOptions, num_kv_blocks: int = 1024
) -> Iterator[tuple[str, ServerState]]:
    """A real server (uvicorn thread) on a free loopback port for ``model``; yields its base
    URL and state, and checks the session manager's invariants when it stops."""
    engine = LLMEngine(model, EngineConfig(num_kv_blocks=num_kv_blocks, check_integrity=True))
    state = build_state(engine, options)
    background = BackgroundServer(state)
    base_url = background.start()
    try:
        yield base_url, state
        # On a thread of its own: a test may leave an event loop running on this one
        # (Playwright's sync API does), and run_exclusive refuses to block a loop's thread.
        with concurrent.futures.ThreadPoolExecutor(1) as checker:
            checker.submit(state.sessions.check_integrity).result()
    finally:
        background.stop()
