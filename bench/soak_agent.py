"""The clients of ``bench/soak.py``: one WebSocket agent per session, in a child process.

Each agent creates a session (a client function tool ``lookup`` and the built-in ``python``)
and, until the deadline, picks at random: a chat turn, a client tool turn (a forced ``lookup``
call, a pause of 0.5-4 s while "the tool runs", then the output and the next response), a
python turn (a forced ``python`` call the server runs in the session's sandbox), a disconnect
between turns, or a disconnect in the middle of a response; after a disconnect it reconnects
and sends ``session.resume``. Every user message and tool output carries a unique tag, so that
at the end each *acknowledged* turn (its ``response.done`` arrived) can be looked up in the
session's history: a turn whose tagged user message is missing there is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

LOOKUP = {
    "type": "function",
    "function": {
        "name": "lookup",
        "description": "Look up a fact in the team wiki.",
        "parameters": {
            "type": "object",
            "properties": {"query": {"type": "string"}},
            "required": ["query"],
        },
    },
}
TOOLS = [LOOKUP, {"type": "python"}]
QUESTIONS = [
    "Name a river in Europe.",
    "What is a good name for a cat?",
    "Give me one tip for writing tests.",
    "Which planet is the largest?",
]
ACTIONS = ("chat", "tool", "python", "drop_idle", "drop_mid")
WEIGHTS = (5, 2, 1, 1, 1)


@dataclass
class AgentStats:
    """What one agent saw; ``acked_tags`` are the tags of turns acknowledged by response.done."""

    session_id: str = ""
    key: str = ""
    acked_tags: list[str] = field(default_factory=list)
    actions: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    reconnects: int = 0
    turn_latencies_s: list[float] = field(default_factory=list)


class Agent:
    def __init__(self, base_url: str, idx: int, max_tokens: int, seed: int) -> None:
        self.ws_url = base_url.replace("http://", "ws://") + "/v1/sessions"
        self.idx = idx
        self.max_tokens = max_tokens
        self.rng = random.Random(seed * 1000 + idx)
        self.stats = AgentStats(key=f"soak-tenant-{idx}")
        self.ws: ClientConnection | None = None
        self.token = ""
        self.num_turns = 0

    async def _connect(self) -> ClientConnection:
        headers = {"Authorization": f"Bearer {self.stats.key}"}
        return await connect(self.ws_url, additional_headers=headers, max_size=None)

    async def send(self, event: dict[str, Any]) -> None:
        assert self.ws is not None
        await self.ws.send(json.dumps(event))

    async def recv(self, timeout_s: float = 600) -> dict[str, Any]:
        assert self.ws is not None
        event: dict[str, Any] = json.loads(await asyncio.wait_for(self.ws.recv(), timeout_s))
        return event

    async def until(self, *types: str) -> dict[str, Any]:
        """Events up to one of ``types``; an ``error`` event raises RuntimeError(code)."""
        while True:
            event = await self.recv()
            if event["type"] == "error":
                raise RuntimeError(event["error"]["code"])
            if event["type"] in types:
                return event

    async def start(self) -> None:
        self.ws = await self._connect()
        instructions = "You are a concise assistant. Answer in one short sentence."
        await self.send(
            {"type": "session.create", "session": {"instructions": instructions, "tools": TOOLS}}
        )
        created = await self.until("session.created")
        self.stats.session_id = created["session"]["id"]
        self.token = created["session"]["resume_token"]

    async def reconnect(self) -> None:
        if self.ws is not None:
            with contextlib.suppress(Exception):
                await self.ws.close()
        self.ws = await self._connect()
        await self.send(
            {
                "type": "session.resume",
                "session_id": self.stats.session_id,
                "resume_token": self.token,
            }
        )
        await self.until("session.resumed")
        self.stats.reconnects += 1

    def _tag(self) -> str:
        self.num_turns += 1
        return f"[s{self.idx}t{self.num_turns}]"

    async def user(self, text: str) -> None:
        item = {
            "type": "message",
            "role": "user",
            "content": [{"type": "input_text", "text": text}],
        }
        await self.send({"type": "conversation.item.create", "item": item})
        await self.until("conversation.item.added")

    async def respond(self, **overrides: Any) -> dict[str, Any]:
        await self.send(
            {
                "type": "response.create",
                "response": {"max_output_tokens": self.max_tokens, **overrides},
            }
        )
        done = await self.until("response.done")
        await self.until("session.state")
        return done["response"]  # type: ignore[no-any-return]

    async def turn(self, action: str) -> None:
        started = time.monotonic()
        tag = self._tag()
        question = self.rng.choice(QUESTIONS)
        if action == "python":
            await self.user(f"{tag} Use python to compute 6 * 7, then answer.")
            forced = {"type": "function", "function": {"name": "python"}}
            response = await self.respond(tool_choice=forced)
        elif action == "tool":
            await self.user(f"{tag} Look it up: {question}")
            forced = {"type": "function", "function": {"name": "lookup"}}
            response = await self.respond(tool_choice=forced)
            if response["status"] == "requires_action":
                self.stats.acked_tags.append(tag)  # the call itself is an acknowledged turn
                await asyncio.sleep(self.rng.uniform(0.5, 4.0))  # the client's tool runs
                calls = [o for o in response["output"] if o["type"] == "function_call"]
                for call in calls:
                    output = {
                        "type": "function_call_output",
                        "call_id": call["call_id"],
                        "output": f"{tag} wiki: nothing found",
                    }
                    await self.send({"type": "conversation.item.create", "item": output})
                    await self.until("conversation.item.added")
                tag = self._tag()  # the answer to the tool output is a turn of its own
                response = await self.respond(tool_choice="none")
        else:
            await self.user(f"{tag} {question}")
            response = await self.respond()
        if response["status"] in ("completed", "incomplete", "requires_action"):
            self.stats.acked_tags.append(tag)
        self.stats.turn_latencies_s.append(time.monotonic() - started)

    async def drop_mid_response(self) -> None:
        """Disconnect after ``response.created``: the turn is never acknowledged."""
        await self.user(f"{self._tag()} Tell me a long story about a river.")
        await self.send({"type": "response.create", "response": {"max_output_tokens": 64}})
        await self.until("response.created")
        await asyncio.sleep(self.rng.uniform(0.0, 0.5))
        await self.reconnect()

    async def step(self) -> None:
        action = self.rng.choices(ACTIONS, WEIGHTS)[0]
        self.stats.actions[action] = self.stats.actions.get(action, 0) + 1
        if action == "drop_idle":
            await self.reconnect()
        elif action == "drop_mid":
            await self.drop_mid_response()
        else:
            await self.turn(action)

    async def run(self, deadline: float) -> AgentStats:
        await asyncio.sleep(self.rng.uniform(0, 2))  # do not all start in the same instant
        while not self.stats.session_id and time.monotonic() < deadline:
            try:
                await self.start()
            except (RuntimeError, ConnectionClosed, OSError, TimeoutError) as exc:
                name = f"create: {exc}"
                self.stats.errors[name] = self.stats.errors.get(name, 0) + 1
                await asyncio.sleep(1.0)
        while time.monotonic() < deadline:
            try:
                await self.step()
            except RuntimeError as exc:  # an error event: counted, then carry on
                code = str(exc)
                self.stats.errors[code] = self.stats.errors.get(code, 0) + 1
                await asyncio.sleep(0.5)
            except (ConnectionClosed, OSError, TimeoutError) as exc:
                name = type(exc).__name__
                self.stats.errors[name] = self.stats.errors.get(name, 0) + 1
                await asyncio.sleep(0.5)
                with contextlib.suppress(Exception):
                    await self.reconnect()
            await asyncio.sleep(self.rng.uniform(0.0, 1.0))  # think time
        if self.ws is not None:
            with contextlib.suppress(Exception):
                await self.ws.close()
        return self.stats


def run_agents(
    base_url: str, num_sessions: int, duration_s: float, max_tokens: int, seed: int, out_path: str
) -> None:
    """Child process entry: run every agent until ``duration_s`` passed, write their stats
    as JSON to ``out_path``."""

    async def all_agents() -> list[AgentStats]:
        deadline = time.monotonic() + duration_s
        agents = [Agent(base_url, i, max_tokens, seed) for i in range(num_sessions)]
        return list(await asyncio.gather(*(a.run(deadline) for a in agents)))

    stats = asyncio.run(all_agents())
    with open(out_path, "w") as out:
        json.dump([s.__dict__ for s in stats], out)
