"""The inspector page at /ui, as a person uses it: a real headless Chromium (Debian's
``chromium``, driven over the DevTools protocol by ``playwright``; nothing downloaded) against a
real server with live sessions; plus the push channel's access rules with a real client."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, sync_playwright
from starlette.testclient import TestClient
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from api.app import build_app
from api.inspector_routes import inspector_allowed
from api.server import ServeOptions
from tests.api_helpers import ProtocolClient, live_server

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
KEY_A, KEY_B = "inspect-alice", "inspect-bob"
# Long enough to fill several 16-token KV blocks, so each turn writes new blocks to the tiers.
LONG_QUESTION = (
    "Here are my notes on the trip: we leave Paris on Monday, reach Lyon by noon, spend two "
    "nights in Marseille, then drive along the coast to Nice and fly home on Friday evening. "
    "Which city do we spend the most nights in? Answer in one short sentence."
)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    assert shutil.which(CHROMIUM), "Debian's chromium is required (scripts/test.sh installs it)"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def open_server(smollm2, redis_server):
    """No API keys (loopback only), host + Redis tiers, session leases."""
    options = ServeOptions(redis_url=redis_server, ownership=True)
    with live_server(smollm2, options) as running:
        yield running


@pytest.fixture(scope="module")
def keyed_server(smollm2):
    with live_server(smollm2, ServeOptions(api_keys=(KEY_A, KEY_B))) as running:
        yield running


def _session_with_turn(base_url: str, key: str, text: str) -> tuple[ProtocolClient, str]:
    client = ProtocolClient(base_url, key)
    session_id = client.create_session("You are terse.")["id"]
    client.user(text)
    client.respond(max_output_tokens=12, temperature=0)
    return client, session_id


class ConsoleLog:
    """Every console error and uncaught page error of a page."""

    def __init__(self, page: Page) -> None:
        self.errors: list[str] = []
        page.on("console", self._console)
        page.on("pageerror", lambda exc: self.errors.append(f"pageerror: {exc}"))

    def _console(self, message: ConsoleMessage) -> None:
        if message.type in ("error", "assert"):
            self.errors.append(f"console.{message.type}: {message.text}")


def _row_ids(page: Page) -> set[str]:
    ids = page.eval_on_selector_all(
        "#sessions tbody tr[data-session-id]", "rows => rows.map(r => r.dataset.sessionId)"
    )
    return set(ids)


def test_page_shows_live_sessions_pool_tiers_and_a_session_timeline(open_server, browser, tmp_path):
    base_url, state = open_server
    clients, ids = [], []
    for text in ("What is the capital of France?", LONG_QUESTION, "Name a colour."):
        client, session_id = _session_with_turn(base_url, "anyone", text)
        clients.append(client)
        ids.append(session_id)

    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    console = ConsoleLog(page)
    page.goto(base_url + "/ui")
    page.wait_for_function(
        "ids => ids.every(id => document.querySelector(`tr[data-session-id='${id}']`))",
        arg=ids,
        timeout=20_000,
    )
    assert set(ids) <= _row_ids(page)
    assert page.inner_text("#conn") == "live"
    # The pool panel shows the engine's own figures (they partition the pool).
    figures = [
        int(page.inner_text(f"#pool-{n}").replace(",", ""))
        for n in ("in-use", "pinned", "cached", "empty")
    ]
    assert sum(figures) == 1024, figures
    # A turn with new full blocks writes them through to the host tier: the page shows it.
    written_before = page.inner_text("#tier-host-written")
    tokens_before = page.inner_text(f"tr[data-session-id='{ids[1]}'] td:nth-child(4)")
    clients[1].user(LONG_QUESTION.replace("Paris", "Lille"))
    clients[1].respond(max_output_tokens=12, temperature=0)
    page.wait_for_function(
        "before => document.getElementById('tier-host-written').textContent !== before",
        arg=written_before,
        timeout=20_000,
    )
    tokens_after = page.inner_text(f"tr[data-session-id='{ids[1]}'] td:nth-child(4)")
    assert int(tokens_after.replace(",", "")) > int(tokens_before.replace(",", ""))
    # A tool pause: a tool result, then the next turn.
    clients[1].send(
        {
            "type": "conversation.item.create",
            "item": {"type": "function_call_output", "call_id": "call_1", "output": "18 C"},
        }
    )
    assert clients[1].recv()["type"] == "conversation.item.added"
    clients[1].respond(max_output_tokens=8, temperature=0)

    # One session's view: three turns on the timeline, the third after a tool pause.
    page.click(f"tr[data-session-id='{ids[1]}']")
    page.wait_for_function(
        "() => document.querySelectorAll('#turns tbody tr').length === 3", timeout=20_000
    )
    assert page.inner_text("#detail-id") == ids[1]
    turn_rows = page.eval_on_selector_all(
        "#turns tbody tr", "rows => rows.map(r => [...r.cells].map(c => c.textContent))"
    )
    assert turn_rows[1][2] != "0", "the second turn reused the first turn's KV"
    assert turn_rows[2][9] == "1", "the third turn came after one tool result"
    assert page.locator("#timeline rect.f-pause").count() == 1
    roles = page.eval_on_selector_all("#items .role", "els => els.map(e => e.textContent)")
    assert roles[:2] == ["system", "user"] and "tool" in roles
    # Device, host and Redis blocks of the session are shown (its history is on every tier).
    for column in ("device", "host", "redis"):
        cell = page.inner_text(f"tr[data-session-id='{ids[1]}'] td[data-col='{column}']")
        assert int(cell) > 0, (column, cell)
    lease = page.inner_text(f"tr[data-session-id='{ids[1]}'] td:last-child")
    assert lease == state.sessions.ownership.instance_id

    page.wait_for_timeout(1500)  # a few more snapshots for the plots
    shot = page.screenshot(full_page=True)
    assert shot[:8] == b"\x89PNG\r\n\x1a\n" and len(shot) > 20_000
    target = os.environ.get("TARRY_INSPECTOR_SCREENSHOT")
    if target:
        Path(target).write_bytes(shot)
    assert console.errors == []
    page.close()
    for client in clients:
        client.close()


def test_page_asks_for_the_key_and_shows_only_that_tenants_sessions(keyed_server, browser):
    base_url, _ = keyed_server
    client_a, id_a = _session_with_turn(base_url, KEY_A, "Hello from Alice.")
    client_b, id_b = _session_with_turn(base_url, KEY_B, "Hello from Bob.")
    page = browser.new_page()
    console = ConsoleLog(page)
    page.goto(base_url + "/ui")
    page.wait_for_selector("#key-form:not([hidden])")
    page.fill("#key-input", "not-a-key")
    page.click("#key-form button")
    page.wait_for_function("() => document.getElementById('key-error').textContent !== ''")
    assert page.is_visible("#key-form")
    page.fill("#key-input", KEY_A)
    page.click("#key-form button")
    page.wait_for_selector(f"tr[data-session-id='{id_a}']", timeout=20_000)
    assert _row_ids(page) == {id_a}
    assert console.errors == []
    page.close()
    client_a.close()
    client_b.close()


def _channel(base_url: str, api_key: str | None) -> Any:
    ws = connect(base_url.replace("http://", "ws://") + "/ui/ws", max_size=None)
    ws.send(json.dumps({"type": "hello", "api_key": api_key}))
    return ws


def _next_snapshot(ws: Any) -> dict[str, Any]:
    while True:
        message = json.loads(ws.recv(timeout=20))
        if message["type"] == "snapshot":
            return message


def test_push_channel_shows_a_tenant_only_its_own_sessions(keyed_server):
    base_url, state = keyed_server
    client_a, id_a = _session_with_turn(base_url, KEY_A, "Alice again.")
    client_b, id_b = _session_with_turn(base_url, KEY_B, "Bob again.")
    all_ids = {s.session_id for s in state.sessions.all_sessions()}
    for key, own in ((KEY_A, id_a), (KEY_B, id_b)):
        ws = _channel(base_url, key)
        welcome = json.loads(ws.recv(timeout=20))
        assert welcome["type"] == "welcome" and welcome["auth"] == "api_key"
        seen = {row["id"] for row in _next_snapshot(ws)["sessions"]}
        tenant = {
            s.session_id for s in state.sessions.sessions_of(state.owner_for("Bearer " + key))
        }
        assert own in seen and seen == tenant and seen < all_ids
        # Selecting another tenant's session shows nothing of it.
        other = id_b if key == KEY_A else id_a
        ws.send(json.dumps({"type": "select", "session_id": other}))
        snapshot = _next_snapshot(ws)
        while snapshot["session"] is None:
            snapshot = _next_snapshot(ws)
        assert snapshot["session"] == {"id": other, "found": False}
        # Bad frames get a typed error each and the channel keeps going.
        for bad_frame in (
            "not json",
            b"\x00binary",
            json.dumps({"type": "select", "session_id": 7}),
        ):
            ws.send(bad_frame)
            message = json.loads(ws.recv(timeout=20))
            while message["type"] != "error":
                message = json.loads(ws.recv(timeout=20))
            assert message["code"] == "invalid_request"
        assert _next_snapshot(ws)["type"] == "snapshot"
        ws.close()
    for bad in ("wrong-key", None):
        ws = _channel(base_url, bad)
        error = json.loads(ws.recv(timeout=20))
        assert error == {
            "type": "error",
            "code": "invalid_api_key",
            "message": "invalid or missing API key",
        }
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=20)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4001
    client_a.close()
    client_b.close()


def test_without_keys_only_loopback_clients_reach_the_inspector(open_server, keyed_server):
    # The rule itself.
    assert inspector_allowed("127.0.0.1", set()) and inspector_allowed("::1", set())
    assert not inspector_allowed("10.1.2.3", set()) and not inspector_allowed(None, set())
    assert inspector_allowed("10.1.2.3", {"k"})
    # The real app, reached from a non-loopback client address (Starlette's "testclient").
    _, open_state = open_server
    with TestClient(build_app(open_state)) as client:
        for path in ("/ui", "/ui/static/inspector.js"):
            response = client.get(path)
            assert response.status_code == 403
            assert response.json()["error"]["code"] == "forbidden"
        with pytest.raises(Exception) as refused, client.websocket_connect("/ui/ws"):
            pass
        assert getattr(refused.value, "code", None) == 1008
    _, keyed_state = keyed_server
    with TestClient(build_app(keyed_state)) as client:
        page = client.get("/ui")
        assert page.status_code == 200 and "Tarry inspector" in page.text
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert client.get("/ui/static/inspector.js").status_code == 200
        assert client.get("/ui/static/../state.py").status_code == 404


def test_viewers_share_one_snapshot_per_second(keyed_server):
    """Two pages open: the server samples once per interval for both, not once per viewer."""
    base_url, _ = keyed_server
    first, second = _channel(base_url, KEY_A), _channel(base_url, KEY_B)
    for ws in (first, second):
        assert json.loads(ws.recv(timeout=20))["type"] == "welcome"
    seen_first = [_next_snapshot(first) for _ in range(5)]
    seen_second = [_next_snapshot(second) for _ in range(3)]
    times_first = [s["time"] for s in seen_first]
    assert len(set(times_first)) == len(times_first), "one push per new snapshot"
    assert {s["time"] for s in seen_second} <= set(times_first), "the same snapshots"
    span = times_first[-1] - times_first[0]
    assert 3.5 <= span <= 8, f"5 snapshots should span ~4 s at 1 s intervals, got {span:.2f}"
    assert seen_first[-1]["sampler"]["viewers"] == 2
    first.close()
    second.close()
