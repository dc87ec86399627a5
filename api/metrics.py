"""Prometheus metrics of one server, in their own registry (no process-global state).

Generation metrics (requests by surface and status, tokens, cache hits per tier, TTFT,
inter-token and end-to-end latency) are recorded at ONE place, ``MetricsObserver``, which the
``AsyncEngine`` calls on its single output path: every surface (HTTP chat and completions,
the Responses API, the session and Responses WebSockets) passes through it, so none can
forget. The surface label comes from ``RequestScope``: ``api.app`` wraps every route in
``surface_app`` / ``surface_socket``, which set ``CURRENT_SCOPE`` for the request's task
(asyncio copies it into the tasks a handler starts). It is a ContextVar because the label
must cross the sessions layer, which knows nothing of HTTP.

Token counters satisfy, per engine sequence::

    tarry_prompt_tokens_total = sum over tier of tarry_prompt_tokens_cached_total{tier}
                                + tarry_prompt_tokens_computed_total

with ``tier`` one of ``device`` (a prefix-cache hit), ``host``, ``redis`` (restored).
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from engine.generation_observer import GenerationObserver, GenerationStatus, GenerationTrace
from engine.outputs import RequestOutput

ENDPOINTS = ("chat", "completions", "responses", "session_ws", "responses_ws")
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


@dataclass(slots=True)
class RequestScope:
    """The surface one API request (or WebSocket connection) came through, and how many
    generations it has started (a request refused before any generation is counted by its
    HTTP status instead)."""

    endpoint: str
    num_generations: int = 0


CURRENT_SCOPE: ContextVar[RequestScope | None] = ContextVar("tarry_request_scope", default=None)


class Metrics:
    """Counters for requests and tokens, latency histograms, cache hits per tier, gauges."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "tarry_requests",
            "Generations by surface (endpoint) and HTTP-style status: 200 finished, 400 "
            "rejected, 499 stopped by the client, 500 failed, 503 engine stopped; plus API "
            "requests refused before any generation, by their HTTP status",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "tarry_prompt_tokens", "Prompt tokens of engine sequences", registry=self.registry
        )
        self.completion_tokens = Counter(
            "tarry_completion_tokens", "Generated tokens", registry=self.registry
        )
        self.cached_tokens = Counter(
            "tarry_prompt_tokens_cached",
            "Prompt tokens not computed: served from KV by tier (device, host, redis)",
            ["tier"],
            registry=self.registry,
        )
        self.computed_tokens = Counter(
            "tarry_prompt_tokens_computed",
            "Prompt tokens computed: served by no KV tier (cache misses)",
            registry=self.registry,
        )
        self.ttft = Histogram(
            "tarry_time_to_first_token_seconds",
            "Time from a generation's start to its first output, as its caller saw it",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.inter_token_latency = Histogram(
            "tarry_inter_token_latency_seconds",
            "Time between consecutive outputs of one sequence, per generated token",
            buckets=ITL_BUCKETS,
            registry=self.registry,
        )
        self.e2e_latency = Histogram(
            "tarry_e2e_request_latency_seconds",
            "Time from a generation's start to its end (finished, aborted or failed)",
            buckets=E2E_BUCKETS,
            registry=self.registry,
        )
        self.sessions = Gauge(
            "tarry_sessions", "Sessions by state", ["state"], registry=self.registry
        )
        self.pool_usage = Gauge(
            "tarry_kv_pool_usage", "Fraction of device KV blocks in use", registry=self.registry
        )
        self.requests_running = Gauge(
            "tarry_requests_running",
            "Requests the engine is generating (scheduled in the running batch)",
            registry=self.registry,
        )
        self.requests_waiting = Gauge(
            "tarry_requests_waiting",
            "Requests queued in the engine, not yet scheduled (or preempted)",
            registry=self.registry,
        )
        self.engine_steps = Gauge(
            "tarry_engine_steps", "Engine steps run since start", registry=self.registry
        )
        self.draft_tokens = Gauge(
            "tarry_spec_draft_tokens",
            "Speculative draft tokens (prompt lookup) verified since start",
            registry=self.registry,
        )
        self.accepted_draft_tokens = Gauge(
            "tarry_spec_accepted_draft_tokens",
            "Speculative draft tokens the model agreed with since start (each saved a step)",
            registry=self.registry,
        )
        self.leases_held = Gauge(
            "tarry_session_leases_held",
            "Session leases this instance holds (several instances sharing Redis)",
            registry=self.registry,
        )
        self.fenced_writes = Gauge(
            "tarry_session_record_writes_fenced",
            "Session record writes refused since start: another instance owned the session",
            registry=self.registry,
        )
        self.tier_up = Gauge(
            "tarry_tier_up",
            "1 if a storage tier answers, 0 if degraded",
            ["tier"],
            registry=self.registry,
        )

        self.open_ended_running = Gauge(
            "tarry_open_ended_requests_running",
            "Unfinished requests without max_tokens (they may run to the context limit)",
            registry=self.registry,
        )
        self.open_ended_max_output_tokens = Gauge(
            "tarry_open_ended_request_max_output_tokens",
            "Most tokens generated so far by one unfinished request without max_tokens",
            registry=self.registry,
        )
        self.open_ended_oldest_age = Gauge(
            "tarry_open_ended_request_oldest_age_seconds",
            "Age of the oldest unfinished request without max_tokens",
            registry=self.registry,
        )
        self.open_ended_admitted = Gauge(
            "tarry_open_ended_requests_admitted",
            "Requests admitted without max_tokens since start",
            registry=self.registry,
        )

        for endpoint in ENDPOINTS:  # every surface shows from the start, at 0
            self.requests.labels(endpoint, GenerationStatus.FINISHED.value)
        for tier in ("device", "host", "redis"):
            self.cached_tokens.labels(tier)

    def record_usage(self, out: RequestOutput) -> None:
        """Count one sequence's tokens from its latest output (its usage fields cover the
        whole sequence so far). A request preempted and readmitted restores its prompt
        again; its prompt is still counted once (restores beyond its cached tokens, which
        are those of its first admission, are left out)."""
        prompt, cached = out.num_prompt_tokens, out.num_cached_tokens
        self.prompt_tokens.inc(prompt)
        self.completion_tokens.inc(out.num_output_tokens)
        left = cached
        for tier, num_tokens in out.restored_tokens_by_tier.items():
            counted = min(left, num_tokens)
            self.cached_tokens.labels(tier).inc(counted)
            left -= counted
        self.cached_tokens.labels("device").inc(left)
        self.computed_tokens.inc(max(0, prompt - cached))

    def record_refused(self, endpoint: str, status: int) -> None:
        """An API request answered ``status`` before it started any generation."""
        self.requests.labels(endpoint, str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsObserver(GenerationObserver):
    """Records every generation into ``metrics`` (see the module docstring)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def on_output(self, trace: GenerationTrace, out: RequestOutput, now: float) -> None:
        if trace.first_output_at is None:
            self.metrics.ttft.observe(now - trace.started_at)
            scope = CURRENT_SCOPE.get()
            if scope is not None:
                scope.num_generations += 1
            return
        previous = trace.last_output_at.get(out.request_id)
        num_tokens = len(out.new_token_ids)
        if previous is not None and num_tokens:
            gap = (now - previous) / num_tokens
            for _ in range(num_tokens):
                self.metrics.inter_token_latency.observe(gap)

    def on_end(self, trace: GenerationTrace, status: GenerationStatus, now: float) -> None:
        scope = CURRENT_SCOPE.get()
        if scope is not None and trace.first_output_at is None:
            scope.num_generations += 1  # rejected or aborted before any output
        endpoint = scope.endpoint if scope is not None else "other"
        self.metrics.requests.labels(endpoint, status.value).inc()
        self.metrics.e2e_latency.observe(now - trace.started_at)
        for out in trace.last_outputs.values():
            self.metrics.record_usage(out)
