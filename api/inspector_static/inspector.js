// Tarry inspector: renders the snapshots the server pushes over /ui/ws (about one a second).
// No polling, no libraries; every piece of text from the server goes through textContent.
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";
const WINDOW_S = 300;
const KEY_STORE = "tarry.inspector.key";

const view = {
  ws: null,
  history: [],
  selected: null,
  authRefused: false,
  retryMs: 500,
  needsKey: false,
};

const $ = (id) => document.getElementById(id);

function el(tag, attrs, parent, text) {
  const node = tag.startsWith("svg:")
    ? document.createElementNS(SVG_NS, tag.slice(4))
    : document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, value);
  if (text !== undefined) node.textContent = text;
  if (parent) parent.appendChild(node);
  return node;
}

function clear(node) {
  while (node.firstChild) node.removeChild(node.firstChild);
}

// -- formatting -------------------------------------------------------------------------------

const fmtInt = (n) => (n === null || n === undefined ? "–" : Number(n).toLocaleString("en-US"));
const fmtPct = (x) => (x === null || x === undefined ? "–" : (100 * x).toFixed(1) + " %");
const fmtMs = (ms) => (ms === null || ms === undefined ? "–" : ms < 1000 ? ms.toFixed(0) + " ms" : (ms / 1000).toFixed(2) + " s");
function fmtDur(s) {
  if (s === null || s === undefined) return "–";
  if (s < 1) return (s * 1000).toFixed(0) + " ms";
  if (s < 90) return s.toFixed(1) + " s";
  if (s < 5400) return (s / 60).toFixed(1) + " min";
  return (s / 3600).toFixed(1) + " h";
}
function fmtBytes(b) {
  if (b === null || b === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (b >= 1024 && i < units.length - 1) { b /= 1024; i += 1; }
  return (i === 0 ? b.toFixed(0) : b.toFixed(1)) + " " + units[i];
}

// -- connection -------------------------------------------------------------------------------

function connect() {
  const scheme = location.protocol === "https:" ? "wss://" : "ws://";
  const ws = new WebSocket(scheme + location.host + "/ui/ws");
  view.ws = ws;
  ws.onopen = () => {
    ws.send(JSON.stringify({ type: "hello", api_key: sessionStorage.getItem(KEY_STORE) }));
  };
  ws.onmessage = (event) => onMessage(JSON.parse(event.data));
  ws.onclose = () => {
    setConn(false, view.authRefused ? "key needed" : "reconnecting…");
    if (view.authRefused) return;
    setTimeout(connect, view.retryMs);
    view.retryMs = Math.min(view.retryMs * 2, 10000);
  };
}

function onMessage(msg) {
  if (msg.type === "welcome") {
    view.retryMs = 500;
    view.history = msg.history || [];
    $("model").textContent = msg.model;
    $("scope").textContent = msg.auth === "api_key" ? "your sessions" : "all sessions (loopback)";
    $("key-form").hidden = true;
    $("main").hidden = false;
    setConn(true, "live");
    if (view.selected) select(view.selected);
  } else if (msg.type === "snapshot") {
    view.history.push(msg.point);
    const cutoff = msg.time - WINDOW_S;
    while (view.history.length && view.history[0].t < cutoff) view.history.shift();
    render(msg);
  } else if (msg.type === "error") {
    if (msg.code === "invalid_api_key") {
      view.authRefused = true;
      showKeyForm(sessionStorage.getItem(KEY_STORE) ? msg.message : "");
    } else {
      $("footer").textContent = "server: " + msg.message;
    }
  }
}

function setConn(up, text) {
  const conn = $("conn");
  conn.textContent = text;
  conn.className = "conn " + (up ? "up" : "down");
}

function showKeyForm(error) {
  $("main").hidden = true;
  $("key-form").hidden = false;
  $("key-error").textContent = error;
  $("key-input").focus();
}

function select(sessionId) {
  view.selected = sessionId;
  if (view.ws && view.ws.readyState === WebSocket.OPEN) {
    view.ws.send(JSON.stringify({ type: "select", session_id: sessionId }));
  }
  if (!sessionId) $("session-detail").hidden = true;
}

// -- rendering --------------------------------------------------------------------------------

function render(snap) {
  renderPool(snap.pool);
  renderTiers(snap.tiers);
  renderSessions(snap.sessions);
  renderDetail(snap.session);
  renderPlots(snap.time);
  const s = snap.sampler;
  $("footer").textContent =
    `snapshot ${new Date(snap.time * 1000).toLocaleTimeString()} · sampled in ${s.sample_ms} ms ` +
    `(${s.cpu_ms} ms CPU), engine lock held ${s.engine_lock_ms} ms · ${s.viewers} viewer(s)`;
}

const POOL_PARTS = [
  ["in_use", "num_in_use_blocks"],
  ["pinned", "num_pinned_blocks"],
  ["cached", "num_cached_blocks"],
  ["empty", "num_empty_blocks"],
];

function renderPool(pool) {
  $("pool-total").textContent =
    `${fmtInt(pool.num_blocks)} blocks of ${pool.block_size} tokens · ${fmtInt(pool.num_steps)} steps`;
  $("pool-in-use").textContent = fmtInt(pool.num_in_use_blocks);
  $("pool-pinned").textContent = fmtInt(pool.num_pinned_blocks);
  $("pool-cached").textContent = fmtInt(pool.num_cached_blocks);
  $("pool-empty").textContent = fmtInt(pool.num_empty_blocks);
  $("pool-requests").textContent = `${pool.num_running_requests} run · ${pool.num_waiting_requests} wait`;
  const bar = $("pool-bar");
  clear(bar);
  let x = 0;
  for (const [name, field] of POOL_PARTS) {
    const width = (1000 * pool[field]) / pool.num_blocks;
    el("svg:rect", { x: x, y: 0, width: Math.max(0, width), height: 18, class: "f-" + name }, bar);
    x += width;
  }
}

function renderTiers(tiers) {
  const body = $("tiers").tBodies[0];
  clear(body);
  for (const tier of tiers) {
    const row = el("tr", { "data-tier": tier.kind }, body);
    const name = el("td", {}, row);
    el("i", { class: "sw s-" + tier.kind }, name);
    name.appendChild(document.createTextNode(tier.kind === "redis" ? "Redis" : tier.kind));
    if (!tier.healthy) el("span", { class: "error" }, name, " down");
    let held;
    if (tier.kind === "device") held = `${fmtInt(tier.blocks_used)} / ${fmtInt(tier.num_blocks)} blocks`;
    else if (tier.kind === "redis" && !tier.capacity_bytes) held = "–";
    else held = fmtBytes(tier.bytes_used) + (tier.capacity_bytes ? " / " + fmtBytes(tier.capacity_bytes) : "");
    el("td", { id: `tier-${tier.kind}-bytes` }, row, held);
    el("td", { id: `tier-${tier.kind}-written` }, row,
      tier.kind === "device" ? "" : fmtBytes(tier.bytes_written));
    el("td", { class: "num", id: `tier-${tier.kind}-tokens` }, row, fmtInt(tier.hit_tokens));
    el("td", { class: "num", id: `tier-${tier.kind}-hit-rate` }, row, fmtPct(tier.hit_rate));
    el("td", { class: "num" }, row, fmtPct(tier.hit_rate_window));
  }
}

function renderSessions(sessions) {
  const body = $("sessions").tBodies[0];
  clear(body);
  $("session-count").textContent = `(${sessions.length})`;
  $("no-sessions").hidden = sessions.length > 0;
  for (const s of sessions) {
    const row = el("tr", { "data-session-id": s.id }, body);
    if (s.id === view.selected) row.className = "selected";
    row.addEventListener("click", () => select(s.id));
    el("code", {}, el("td", { title: s.id }, row), s.id);
    el("td", {}, row, s.owner);
    const state = el("td", {}, row);
    el("span", { class: "state state-" + s.state }, state, s.state);
    el("td", { class: "num" }, row, fmtInt(s.num_tokens));
    el("td", { class: "num" }, row, fmtInt(s.num_turns));
    const kv = s.kv || {};
    el("td", { class: "num" }, row, fmtInt(kv.num_blocks));
    el("td", { class: "num", "data-col": "device" }, row, fmtInt(kv.device));
    el("td", { class: "num", "data-col": "host" }, row, fmtInt(kv.host));
    el("td", { class: "num", "data-col": "redis" }, row, fmtInt(kv.redis));
    el("td", { class: "num" }, row, fmtMs(s.last_ttft_ms));
    el("td", { class: "num" }, row,
      s.num_turns ? `${fmtInt(s.last_cached_tokens)} / ${fmtInt(s.last_new_tokens)}` : "–");
    el("td", { class: "num" }, row, fmtDur(s.idle_s));
    el("td", {}, row, s.lease === null ? "–" : s.lease);
  }
}

function renderDetail(detail) {
  const panel = $("session-detail");
  if (!detail || !view.selected || detail.id !== view.selected) {
    panel.hidden = !view.selected;
    return;
  }
  panel.hidden = false;
  $("detail-id").textContent = detail.id;
  if (!detail.found) {
    $("detail-state").textContent = "not found (closed, or not yours)";
    clear($("timeline"));
    clear($("turns").tBodies[0]);
    clear($("items"));
    return;
  }
  $("detail-state").textContent = `${detail.state} · ${detail.turns.length} turn(s) recorded`;
  renderTimeline(detail.turns);
  renderTurnTable(detail.turns);
  const items = $("items");
  clear(items);
  $("items-count").textContent = `(${detail.num_items}${detail.num_items > detail.items.length ? ", newest " + detail.items.length + " shown" : ""})`;
  for (const item of detail.items) {
    const li = el("li", {}, items);
    el("span", { class: "role role-" + item.role }, li, item.role + (item.name ? ` (${item.name})` : ""));
    li.appendChild(document.createTextNode(item.content + (item.truncated ? ` … [${item.truncated} chars]` : "")));
  }
}

function renderTimeline(turns) {
  const svg = $("timeline");
  clear(svg);
  const rowH = 22;
  const height = Math.max(1, turns.length) * rowH + 6;
  svg.setAttribute("viewBox", `0 0 1000 ${height}`);
  if (!turns.length) {
    el("svg:text", { x: 4, y: 15 }, svg, "no finished turns yet");
    return;
  }
  const maxTokens = Math.max(1, ...turns.map((t) => t.prompt_tokens + t.output_tokens));
  const x0 = 48, width = 640;
  turns.forEach((turn, i) => {
    const y = i * rowH + 3;
    el("svg:text", { x: 4, y: y + 14, class: "label" }, svg, "#" + turn.turn);
    let x = x0;
    const parts = [
      ["cached", turn.cached_tokens], ["restored", turn.restored_tokens],
      ["new", turn.new_tokens], ["output", turn.output_tokens],
    ];
    for (const [name, tokens] of parts) {
      const w = (width * tokens) / maxTokens;
      if (w > 0) {
        const rect = el("svg:rect", { x: x, y: y, width: w, height: rowH - 6, class: "f-" + name }, svg);
        el("svg:title", {}, rect, `${name}: ${tokens} tokens`);
      }
      x += w;
    }
    const pauseTool = turn.num_tool_results > 0;
    if (pauseTool) el("svg:rect", { x: 36, y: y, width: 8, height: rowH - 6, class: "f-pause" }, svg);
    const notes = [`TTFT ${fmtMs(turn.ttft_s === null ? null : turn.ttft_s * 1000)}`,
      `${turn.output_tokens} out`];
    if (turn.pause_before_s !== null) {
      notes.push((pauseTool ? "tool pause " : "pause ") + fmtDur(turn.pause_before_s));
    }
    el("svg:text", { x: x0 + width + 10, y: y + 13 }, svg, notes.join(" · "));
  });
}

function renderTurnTable(turns) {
  const body = $("turns").tBodies[0];
  clear(body);
  for (const t of turns) {
    const row = el("tr", {}, body);
    const cells = [t.turn, t.prompt_tokens, t.cached_tokens, t.restored_tokens, t.new_tokens, t.output_tokens];
    for (const value of cells) el("td", { class: "num" }, row, fmtInt(value));
    el("td", { class: "num" }, row, fmtMs(t.ttft_s === null ? null : t.ttft_s * 1000));
    el("td", { class: "num" }, row, fmtDur(t.duration_s));
    el("td", { class: "num" }, row, fmtDur(t.pause_before_s));
    el("td", {}, row, t.num_tool_results ? String(t.num_tool_results) : "");
    el("td", {}, row, t.finish_reason || "");
  }
}

// -- plots: hand-drawn SVG, time on x over the last WINDOW_S seconds ---------------------------

function plotFrame(svg, now, height, yMax, yFormat) {
  clear(svg);
  const left = 46, right = 596, top = 6, bottom = height - 16;
  const xOf = (t) => left + ((t - (now - WINDOW_S)) / WINDOW_S) * (right - left);
  const yOf = (v) => bottom - (v / yMax) * (bottom - top);
  for (const frac of [0, 0.5, 1]) {
    const y = yOf(frac * yMax);
    el("svg:line", { x1: left, x2: right, y1: y, y2: y, class: "grid" }, svg);
    el("svg:text", { x: 2, y: y + 3 }, svg, yFormat(frac * yMax));
  }
  for (const minutes of [5, 4, 3, 2, 1, 0]) {
    const anchor = minutes === 5 ? "start" : minutes ? "middle" : "end";
    el("svg:text", { x: xOf(now - minutes * 60), y: height - 3, "text-anchor": anchor }, svg,
      minutes ? `-${minutes}m` : "now");
  }
  return { xOf, yOf, left, bottom };
}

function lines(svg, frame, points, series) {
  for (const [key, cls] of series) {
    let segment = [];
    const flush = () => {
      if (segment.length > 1) el("svg:polyline", { points: segment.join(" "), class: cls }, svg);
      else if (segment.length === 1) {
        const [x, y] = segment[0].split(",");
        el("svg:circle", { cx: x, cy: y, r: 1.8, class: cls.replace("l-", "f-") + " dot" }, svg);
      }
      segment = [];
    };
    for (const p of points) {
      const v = p[key];
      if (v === null || v === undefined) { flush(); continue; }
      segment.push(`${frame.xOf(p.t).toFixed(1)},${frame.yOf(v).toFixed(1)}`);
    }
    flush();
  }
}

function renderPlots(now) {
  const points = view.history.filter((p) => p.t >= now - WINDOW_S);
  // Pool: stacked areas of the four block groups.
  const total = points.length ? points[points.length - 1].empty + points[points.length - 1].cached +
    points[points.length - 1].pinned + points[points.length - 1].in_use : 1;
  const pool = plotFrame($("plot-pool"), now, 200, Math.max(1, total), fmtInt);
  const keys = ["in_use", "pinned", "cached", "empty"];
  let lower = points.map(() => 0);
  for (const key of keys) {
    const upper = points.map((p, i) => lower[i] + p[key]);
    if (points.length > 1) {
      const top = points.map((p, i) => `${pool.xOf(p.t).toFixed(1)},${pool.yOf(upper[i]).toFixed(1)}`);
      const bottom = points.map((p, i) => `${pool.xOf(p.t).toFixed(1)},${pool.yOf(lower[i]).toFixed(1)}`).reverse();
      el("svg:polygon", { points: top.concat(bottom).join(" "), class: "f-" + key }, $("plot-pool"));
    }
    lower = upper;
  }
  const hits = plotFrame($("plot-hits"), now, 110, 1, (v) => (100 * v).toFixed(0) + "%");
  lines($("plot-hits"), hits, points, [["hit_device", "l-device"], ["hit_host", "l-host"], ["hit_redis", "l-redis"]]);
  const maxBytes = Math.max(1024, ...points.map((p) => Math.max(p.host_bytes || 0, p.redis_bytes || 0)));
  const bytes = plotFrame($("plot-bytes"), now, 110, maxBytes * 1.1, fmtBytes);
  lines($("plot-bytes"), bytes, points, [["host_bytes", "l-host"], ["redis_bytes", "l-redis"]]);
}

// -- start ------------------------------------------------------------------------------------

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(KEY_STORE, $("key-input").value.trim());
  view.authRefused = false;
  $("key-error").textContent = "";
  connect();
});
$("detail-close").addEventListener("click", () => select(null));
connect();
