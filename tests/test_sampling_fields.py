"""Every surface maps sampling fields the same way (``api.openai_params``): the session
protocol and the Responses WebSocket honour the fields chat completions does, with the same
output for the same fields (greedy or seeded)."""

from __future__ import annotations

import json

import openai
import pytest
from websockets.sync.client import connect

from api.server import ServeOptions
from api.state import Limits
from tests.api_helpers import ProtocolClient, live_server
from tests.scaleout_helpers import wait_for

KEY = "key-sampling"
SYSTEM = "You are a helpful assistant."
QUESTION = "Name three fruits and say why you like them."
MAX_SESSIONS = 4


@pytest.fixture(scope="module")
def server(smollm2):
    limits = Limits(max_output_tokens=256, max_sessions_per_key=MAX_SESSIONS)
    with live_server(smollm2, ServeOptions(api_keys=(KEY,), limits=limits)) as running:
        yield running


def _chat(server, **fields) -> tuple[str, int]:
    client = openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0)
    reply = client.chat.completions.create(
        model="tarry",
        messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}],
        extra_body={k: v for k, v in fields.items() if k in ("top_k", "ignore_eos")},
        **{k: v for k, v in fields.items() if k not in ("top_k", "ignore_eos")},
    )
    return reply.choices[0].message.content or "", reply.usage.completion_tokens


def _session_turn(server, **fields) -> tuple[str, dict]:
    ws = ProtocolClient(server[0], KEY)
    try:
        ws.create_session(SYSTEM)
        ws.user(QUESTION)
        text, done = ws.respond(**fields)
        ws.send({"type": "session.close"})
        ws.recv()
        return text, done
    finally:
        ws.close()


def _responses_ws(server, frames: list[dict], owner: str | None = None) -> list[list[dict]]:
    url = server[0].replace("http://", "ws://") + "/v1/responses"
    results = []
    with connect(url, additional_headers={"Authorization": f"Bearer {KEY}"}) as ws:
        for frame in frames:
            ws.send(json.dumps({"type": "response.create", **frame}))
            events = []
            while True:
                event = json.loads(ws.recv(timeout=120))
                events.append(event)
                if event["type"] in ("response.completed", "response.incomplete", "error"):
                    break
            results.append(events)
            if owner is not None:
                assert len(server[1].sessions.sessions_of(owner)) <= MAX_SESSIONS
    return results


def _text(events: list[dict]) -> str:
    return "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")


def test_session_protocol_honours_penalties_top_k_and_ignore_eos(server):
    greedy = {"temperature": 0, "max_tokens": 30}
    penalised = {**greedy, "presence_penalty": 2.0, "frequency_penalty": 1.0}
    chat_plain, _ = _chat(server, **greedy)
    chat_penalised, _ = _chat(server, **penalised)
    assert chat_penalised != chat_plain  # the penalties change this output
    text, _ = _session_turn(
        server, temperature=0, max_output_tokens=30, presence_penalty=2.0, frequency_penalty=1.0
    )
    assert text == chat_penalised
    # top_k=1 with a high temperature and a seed is greedy decoding.
    text, _ = _session_turn(server, temperature=1.5, top_k=1, seed=3, max_output_tokens=30)
    assert text == chat_plain
    text, done = _session_turn(server, temperature=0, max_output_tokens=12, ignore_eos=True)
    assert done["usage"]["output_tokens"] == 12 and done["status"] == "incomplete"
    # Session defaults set by session.update take the same fields.
    ws = ProtocolClient(server[0], KEY)
    try:
        ws.create_session(SYSTEM)
        ws.send(
            {
                "type": "session.update",
                "session": {"temperature": 0, "presence_penalty": 2.0, "frequency_penalty": 1.0},
            }
        )
        assert ws.recv()["type"] == "session.updated"
        ws.send({"type": "session.update", "session": {"top_k": "x"}})
        error = ws.recv()
        assert error["type"] == "error" and "top_k" in error["error"]["message"]
        ws.user(QUESTION)
        text, _ = ws.respond(max_output_tokens=30)
        assert text == chat_penalised
    finally:
        ws.close()


def test_responses_websocket_honours_seed_stop_and_session_limit(server):
    base = {"model": "tarry", "instructions": SYSTEM, "input": QUESTION, "max_output_tokens": 30}
    seeded = {**base, "temperature": 1.0, "seed": 11}
    runs = _responses_ws(
        server,
        [seeded, seeded, {**base, "temperature": 0, "stop": ["fruit"]}, {**base, "temperature": 0}],
    )
    chat_seeded, _ = _chat(server, temperature=1.0, seed=11, max_tokens=30)
    assert _text(runs[0]) == _text(runs[1]) == chat_seeded
    chat_stopped, _ = _chat(server, temperature=0, stop=["fruit"], max_tokens=30)
    assert _text(runs[2]) == chat_stopped and "fruit" not in _text(runs[2])
    assert _text(runs[3]).startswith(_text(runs[2]))

    # One connection making many responses stays within max_sessions_per_key, and a failed
    # request (input over the context) leaves no session behind.
    owner = server[1].owner_for(f"Bearer {KEY}")
    frames = [{**base, "max_output_tokens": 1}] * (MAX_SESSIONS + 3)
    frames.insert(2, {**base, "input": "word " * 40000})
    runs = _responses_ws(server, frames, owner)
    kinds = [events[-1]["type"] for events in runs]
    assert kinds.count("response.incomplete") == MAX_SESSIONS + 3
    assert runs[2][-1]["error"]["code"] == "context_length_exceeded"

    def no_response_sessions() -> bool:
        sessions = server[1].sessions.sessions_of(owner)
        return not [s for s in sessions if "responses" in s.settings]

    wait_for(no_response_sessions, 10, "the connection's sessions closed")
