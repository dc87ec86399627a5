"""What an open /ui inspector page costs the engine: one agent workload with and without a viewer.

    python bench/inspector_bench.py [--agents 4] [--turns 6] [--max-tokens 24] [--rounds 3]
                                    [--screenshot docs/inspector.png]

One server (embedded SmolLM2, host KV tier, no Redis). Each round runs ``--agents`` WebSocket
agents of ``bench/ws_bench.py``'s workload (a question, tool results, follow-ups) for ``--turns``
turns, alternately without and with one inspector viewer (A B A B ...). The viewer is a
WebSocket client on ``/ui/ws`` doing what the page does (hello, select a session, take every
snapshot); a browser's rendering runs on the viewer's machine, so this measures what the
server pays. Every round's sessions get their own instructions, so no round reuses another's
KV. The sampler's linger is set to 0 s, so rounds without a viewer run without sampling.

Prints per mode: wall time, output tokens/s, TTFT mean / p50 / p90 over all turns, and the
sampler's own figures as the snapshots report them (time per snapshot, engine lock held).
With ``--screenshot``, a last round runs with a real headless Chromium on the page (Debian's
``chromium``, driven by playwright) and saves a screenshot of it with the sessions still open.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from websockets.sync.client import ClientConnection, connect
from ws_bench import (
    API_KEY,
    INSTRUCTIONS,
    TurnRecord,
    Workload,
    percentile,
    warm_up,
    ws_recv,
    ws_send,
    ws_turn,
)

from api.server import BackgroundServer, ServeOptions, build_state
from engine.llm_engine import LLMEngine
from engine.model_loader import load_model

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@dataclass
class RoundResult:
    viewer: bool
    records: list[TurnRecord]
    wall_s: float
    sampler: list[dict[str, Any]] = field(default_factory=list)
    snapshot_bytes: list[int] = field(default_factory=list)

    @property
    def throughput(self) -> float:
        return sum(r.output_tokens for r in self.records) / self.wall_s


def agent(
    base_url: str,
    round_idx: int,
    agent_idx: int,
    workload: Workload,
    barrier: threading.Barrier,
    keep_open: bool,
) -> tuple[list[TurnRecord], ClientConnection | None]:
    """One WebSocket session for all its turns; closed unless ``keep_open``."""
    url = base_url.replace("http://", "ws://") + "/v1/sessions"
    ws = connect(url, additional_headers={"Authorization": f"Bearer {API_KEY}"})
    instructions = f"Round {round_idx}, agent {agent_idx}. {INSTRUCTIONS}"
    ws_send(ws, {"type": "session.create", "session": {"instructions": instructions}})
    assert ws_recv(ws)["type"] == "session.created"
    barrier.wait()
    records = [ws_turn(ws, agent_idx, turn, workload) for turn in range(workload.turns)]
    if keep_open:
        return records, ws
    ws_send(ws, {"type": "session.close"})
    assert ws_recv(ws)["type"] == "session.closed"
    ws.close()
    return records, None


class Viewer(threading.Thread):
    """A /ui/ws client: hello, select the first session it sees, take every snapshot."""

    def __init__(self, base_url: str) -> None:
        super().__init__(daemon=True)
        self.url = base_url.replace("http://", "ws://") + "/ui/ws"
        self.stop = threading.Event()
        self.sampler: list[dict[str, Any]] = []
        self.sizes: list[int] = []

    def run(self) -> None:
        with connect(self.url, max_size=None) as ws:
            ws.send(json.dumps({"type": "hello", "api_key": API_KEY}))
            selected = False
            while not self.stop.is_set():
                try:
                    frame = ws.recv(timeout=0.5)
                except TimeoutError:
                    continue
                message = json.loads(frame)
                if message["type"] != "snapshot":
                    continue
                self.sampler.append(message["sampler"])
                self.sizes.append(len(frame))
                if not selected and message["sessions"]:
                    ws.send(
                        json.dumps({"type": "select", "session_id": message["sessions"][0]["id"]})
                    )
                    selected = True


def run_round(
    base_url: str, round_idx: int, workload: Workload, viewer: bool, keep_open: bool = False
) -> tuple[RoundResult, list[ClientConnection]]:
    watcher = Viewer(base_url) if viewer else None
    if watcher is not None:
        watcher.start()
    barrier = threading.Barrier(workload.agents + 1)
    with ThreadPoolExecutor(workload.agents) as pool:
        futures = [
            pool.submit(agent, base_url, round_idx, idx, workload, barrier, keep_open)
            for idx in range(workload.agents)
        ]
        barrier.wait()
        start = time.perf_counter()
        results = [f.result() for f in futures]
        wall_s = time.perf_counter() - start
    result = RoundResult(viewer, [r for records, _ in results for r in records], wall_s)
    if watcher is not None:
        watcher.stop.set()
        watcher.join()
        result.sampler, result.snapshot_bytes = watcher.sampler, watcher.sizes
    return result, [ws for _, ws in results if ws is not None]


def summarize(name: str, rounds: list[RoundResult]) -> None:
    ttfts = [r.ttft_s * 1000 for rnd in rounds for r in rnd.records if r.ttft_s is not None]
    walls = [rnd.wall_s for rnd in rounds]
    rates = [rnd.throughput for rnd in rounds]
    print(
        f"{name:>14}: wall {statistics.mean(walls):6.2f} s (rounds: "
        f"{', '.join(f'{w:.2f}' for w in walls)}), {statistics.mean(rates):6.1f} output tok/s, "
        f"TTFT mean / p50 / p90 {statistics.mean(ttfts):4.0f} / {percentile(ttfts, 50):4.0f} / "
        f"{percentile(ttfts, 90):4.0f} ms over {len(ttfts)} turns"
    )
    samples = [s for rnd in rounds for s in rnd.sampler]
    if samples:
        sample_ms = [s["sample_ms"] for s in samples]
        lock_ms = [s["engine_lock_ms"] for s in samples]
        wait_ms = [s["engine_lock_wait_ms"] for s in samples]
        cpu_ms = [s["cpu_ms"] + s["push_cpu_ms"] for s in samples]
        sizes = [n for rnd in rounds for n in rnd.snapshot_bytes]
        print(
            f"{'':>14}  {len(samples)} snapshots: sampled in {statistics.mean(sample_ms):.2f} ms "
            f"mean / {max(sample_ms):.2f} ms max; engine lock held {statistics.mean(lock_ms):.3f} "
            f"ms mean / {max(lock_ms):.3f} ms max (waited for it {statistics.mean(wait_ms):.0f} "
            f"ms mean: the step in flight); {statistics.mean(sizes) / 1024:.1f} KiB per snapshot"
        )
        print(
            f"{'':>14}  server CPU per snapshot (sampling + the viewer's push): "
            f"{statistics.mean(cpu_ms):.2f} ms mean / {max(cpu_ms):.2f} ms max"
        )


def screenshot(base_url: str, workload: Workload, round_idx: int, path: str) -> None:
    """A round with Chromium on the page; the sessions stay open for the picture."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS
        )
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(base_url + "/ui")
        page.wait_for_selector("#main:not([hidden])")
        _, sockets = run_round(base_url, round_idx, workload, viewer=False, keep_open=True)
        page.wait_for_selector("#sessions tbody tr[data-session-id]")
        page.click("#sessions tbody tr[data-session-id]:nth-child(2)")
        page.wait_for_selector("#turns tbody tr")
        page.wait_for_timeout(3000)
        page.screenshot(path=path, full_page=True)
        browser.close()
    for ws in sockets:
        ws.close()
    print(f"screenshot: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=4)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=3, help="rounds per mode (alternating)")
    parser.add_argument("--screenshot", default=None, help="save a Chromium screenshot here")
    args = parser.parse_args()
    workload = Workload(args.agents, args.turns, args.max_tokens)
    state = build_state(LLMEngine(load_model(None)), ServeOptions(port=0))
    server = BackgroundServer(state)
    base_url = server.start()
    server.server.config.app.state.inspector.linger_s = 0.0
    try:
        warm_up(base_url)
        results: dict[bool, list[RoundResult]] = {False: [], True: []}
        for round_idx in range(2 * args.rounds):
            with_viewer = round_idx % 2 == 1
            result, _ = run_round(base_url, round_idx, workload, with_viewer)
            results[with_viewer].append(result)
            print(f"round {round_idx}: viewer={with_viewer} wall {result.wall_s:.2f} s")
        print(
            f"\n{args.agents} agents x {args.turns} turns, {args.max_tokens} output tokens "
            f"per turn, {args.rounds} rounds per mode, alternating:"
        )
        summarize("no viewer", results[False])
        summarize("one viewer", results[True])
        base, watched = (statistics.mean(r.throughput for r in results[m]) for m in (False, True))
        print(f"throughput with a viewer / without: {watched / base:.3f}")
        if args.screenshot:
            screenshot(base_url, workload, 2 * args.rounds, args.screenshot)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
