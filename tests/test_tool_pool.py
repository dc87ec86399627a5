"""The tool pool: python calls run on bounded workers of their own with a per-key share, so one
key flooding long computations delays neither another key's python calls nor its turns."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from api.server import ServeOptions
from api.tool_pool import KeyFairPool, ToolPoolClosedError
from api.tool_runtime import ToolRuntime
from tests.api_helpers import ProtocolClient, live_server
from tools.sandbox import PythonSandbox, SandboxResult
from tools.sandbox_isolation import SandboxIsolation

KEY_A, KEY_B = "key-flood", "key-quiet"
A_SECONDS = 8.0  # each of A's computations
NUM_A_SESSIONS = 6  # more than the default executor's 6 workers on this 2-core machine
LATENCY_BOUND_S = 0.6 * A_SECONDS  # waiting behind A's computations would take A_SECONDS
FORCE_PYTHON = {"type": "function", "function": {"name": "python"}}


# ---------------------------------------------------------------- the pool alone


def test_one_key_holds_at_most_its_share_and_others_start_at_once() -> None:
    async def scenario() -> None:
        pool = KeyFairPool(num_workers=3, per_key=2)
        gate = threading.Event()
        flood = [asyncio.create_task(pool.run("a", gate.wait, 10)) for _ in range(5)]
        await asyncio.sleep(0.05)
        assert pool.num_running("a") == 2 and pool.num_waiting("a") == 3
        started = time.monotonic()
        assert await pool.run("b", lambda: "b ran") == "b ran"
        assert time.monotonic() - started < 1.0
        pool.check_integrity()
        gate.set()
        assert await asyncio.gather(*flood) == [True] * 5
        assert pool.num_running() == 0 and pool.num_waiting() == 0
        pool.check_integrity()
        pool.close()

    asyncio.run(scenario())


def test_waiting_keys_take_turns() -> None:
    async def scenario() -> None:
        pool = KeyFairPool(num_workers=1, per_key=1)
        order: list[str] = []
        gate = threading.Event()
        blocker = asyncio.create_task(pool.run("a", gate.wait, 10))
        await asyncio.sleep(0.05)
        calls = [
            asyncio.create_task(pool.run(key, order.append, f"{key}{idx}"))
            for key, idx in [("a", 1), ("a", 2), ("a", 3), ("b", 1), ("c", 1)]
        ]
        await asyncio.sleep(0.05)
        gate.set()
        await asyncio.gather(blocker, *calls)
        assert order == ["a1", "b1", "c1", "a2", "a3"]
        pool.close()

    asyncio.run(scenario())


def test_cancelled_waiter_gives_up_its_place_and_close_fails_waiters() -> None:
    async def scenario() -> None:
        pool = KeyFairPool(num_workers=1, per_key=1)
        gate = threading.Event()
        blocker = asyncio.create_task(pool.run("a", gate.wait, 10))
        await asyncio.sleep(0.05)
        cancelled = asyncio.create_task(pool.run("b", lambda: "never"))
        waiting = asyncio.create_task(pool.run("c", lambda: "c ran"))
        await asyncio.sleep(0.05)
        cancelled.cancel()
        await asyncio.sleep(0.05)
        pool.check_integrity()
        gate.set()
        assert await waiting == "c ran" and await blocker is True
        assert cancelled.cancelled()
        gate.clear()
        blocker = asyncio.create_task(pool.run("a", gate.wait, 10))
        await asyncio.sleep(0.05)
        late = asyncio.create_task(pool.run("b", lambda: "late"))
        await asyncio.sleep(0.05)
        pool.close()
        with pytest.raises(ToolPoolClosedError):
            await late
        gate.set()
        assert await blocker is True

    asyncio.run(scenario())


# ---------------------------------------------------------------- real sessions


class ScriptedSandbox(PythonSandbox):
    """A real sandbox that runs the test's program instead of the code the model wrote (the
    135M model's code is not ours to choose); everything else is the server's own path."""

    def __init__(self, workdir_root: Path, program: str) -> None:
        super().__init__(workdir_root)
        self.program = program

    def run(self, code: str) -> SandboxResult:
        return super().run(self.program)


class TimedSession(threading.Thread):
    """One WebSocket session on a thread of its own, stamping each event on arrival."""

    def __init__(self, client: ProtocolClient, response: dict[str, Any]) -> None:
        super().__init__(daemon=True)
        self.client = client
        self.response = response
        self.sent_at = 0.0
        self.stamps: dict[str, float] = {}
        self.events: list[dict[str, Any]] = []

    def run(self) -> None:
        self.sent_at = time.monotonic()
        self.client.send({"type": "response.create", "response": self.response})
        while True:
            event = self.client.recv(timeout=120)
            self.stamps.setdefault(event["type"], time.monotonic())
            self.events.append(event)
            if event["type"] == "response.done":
                self.client.recv()  # session.state
                return

    def tool_latency_s(self) -> float:
        """From the model's finished call to the tool's output: queueing plus the run."""
        return (
            self.stamps["response.tool_output.done"]
            - self.stamps["response.function_call_arguments.done"]
        )


def open_python_session(base_url: str, key: str) -> tuple[ProtocolClient, str]:
    client = ProtocolClient(base_url, key)
    client.send({"type": "session.create", "session": {"tools": [{"type": "python"}]}})
    created = client.recv()
    assert created["type"] == "session.created", created
    client.user("Use python to add two numbers.")
    return client, created["session"]["id"]


def test_flooding_key_does_not_delay_another_keys_python_call_or_turn(smollm2, tmp_path):
    options = ServeOptions(api_keys=(KEY_A, KEY_B), tool_workers=4, tool_workers_per_key=3)
    with live_server(smollm2, options) as (base_url, state):
        programs: dict[str, str] = {}
        state.tools.sandbox_factory = lambda session_id: ScriptedSandbox(
            tmp_path, programs[session_id]
        )
        python_turn = {"temperature": 0, "max_output_tokens": 40, "tool_choice": FORCE_PYTHON}
        flood = []
        for _ in range(NUM_A_SESSIONS):
            client, session_id = open_python_session(base_url, KEY_A)
            programs[session_id] = f"import time; time.sleep({A_SECONDS}); 'slow'"
            flood.append(TimedSession(client, python_turn))
        python_client, python_id = open_python_session(base_url, KEY_B)
        programs[python_id] = "6 * 7"
        plain_client = ProtocolClient(base_url, KEY_B)
        plain_client.create_session()
        plain_client.user("Say hello.")
        try:
            # B's sandbox starts before the flood: what is measured below is the pool alone.
            warm_up = TimedSession(python_client, python_turn)
            warm_up.run()
            assert any(e.get("output") == "42" for e in warm_up.events)
            python_client.user("Again, please.")
            for session in flood:
                session.start()
            # Wait until A's computations fill its share and the rest of its calls queue.
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not (
                state.tools.pool.num_running() == 3
                and state.tools.pool.num_waiting() == NUM_A_SESSIONS - 3
            ):
                time.sleep(0.02)
            assert state.tools.pool.num_waiting() == NUM_A_SESSIONS - 3
            # B's python call and a plain turn of B, while A's calls run and queue.
            quiet = TimedSession(python_client, python_turn)
            plain = TimedSession(plain_client, {"temperature": 0, "max_output_tokens": 8})
            for session in (quiet, plain):
                session.start()
            for session in (quiet, plain, *flood):
                session.join(timeout=120)
            output = next(e for e in quiet.events if e["type"] == "response.tool_output.done")
            assert output["output"] == "42"
            assert quiet.tool_latency_s() < LATENCY_BOUND_S, quiet.tool_latency_s()
            plain_s = plain.stamps["response.done"] - plain.sent_at
            assert plain_s < LATENCY_BOUND_S, plain_s
            # A held at most 3 workers: its 6 calls finished in 2 waves of A_SECONDS, the
            # last one after B's call had its output.
            first = min(s.stamps["response.function_call_arguments.done"] for s in flood)
            last = max(s.stamps["response.tool_output.done"] for s in flood)
            assert last - first >= 1.8 * A_SECONDS
            assert quiet.stamps["response.tool_output.done"] < last
            for session in flood:
                outputs = [e for e in session.events if e["type"] == "response.tool_output.done"]
                assert outputs[0]["output"] == "'slow'"
            state.tools.pool.check_integrity()
        finally:
            for client in (*(s.client for s in flood), python_client, plain_client):
                client.close()


def test_closing_a_sandbox_never_blocks_the_event_loop(tmp_path):
    """Without a tmpfs (the non-root layout) closing means an rmtree: it runs on the cleanup
    thread, so ``close_sandbox`` (called on the event loop) returns at once."""
    fallback = SandboxIsolation(unshare_path=None, separate_uid=False)
    runtime = ToolRuntime(None, 0, [], sandbox_root=tmp_path, tool_call_parser="hermes")
    runtime.sandbox_factory = lambda session_id: PythonSandbox(tmp_path, isolation=fallback)
    code = "import os\nfor idx in range(5000): open(f'f{idx}', 'w').write('x')\nlen(os.listdir())"

    async def scenario() -> float:
        output = await runtime.run_python("s1", json.dumps({"code": code}))
        assert output == "5000"
        started = time.monotonic()
        runtime.close_sandbox("s1")
        return time.monotonic() - started

    assert asyncio.run(scenario()) < 0.05
    runtime.close()  # waits for the cleanup thread
    assert list(tmp_path.iterdir()) == []


def test_close_removes_the_runtimes_own_sandbox_root_only(tmp_path):
    """A runtime without ``sandbox_root`` makes a temporary directory and removes it on close
    (a server restarted many times leaves nothing in /tmp); a given root stays."""
    own = ToolRuntime(None, 0, [], tool_call_parser="hermes")
    assert own.root.is_dir() and own.root.name.startswith("tarry-py-")
    (own.root / "leftover").mkdir()  # e.g. a sandbox directory a crash left behind
    own.close()
    assert not own.root.exists()

    given = ToolRuntime(None, 0, [], sandbox_root=tmp_path, tool_call_parser="hermes")
    assert given.root == tmp_path
    given.close()
    assert tmp_path.is_dir()
