"""Prometheus metrics of one server, in their own registry (no process-global state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class Metrics:
    """Counters for requests and tokens, a TTFT histogram, cache hits per tier, gauges."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "tarry_requests",
            "Requests by endpoint and outcome",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.prompt_tokens = Counter("tarry_prompt_tokens", "Prompt tokens", registry=self.registry)
        self.completion_tokens = Counter(
            "tarry_completion_tokens", "Generated tokens", registry=self.registry
        )
        self.cached_tokens = Counter(
            "tarry_cached_tokens",
            "Prompt tokens served from KV, by tier",
            ["tier"],
            registry=self.registry,
        )
        self.ttft = Histogram(
            "tarry_time_to_first_token_seconds",
            "Time to first token",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
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

    def record_usage(self, prompt: int, completion: int, cached: int, restored: int) -> None:
        self.prompt_tokens.inc(prompt)
        self.completion_tokens.inc(completion)
        self.cached_tokens.labels("device").inc(max(0, cached - restored))
        self.cached_tokens.labels("host_or_redis").inc(restored)

    def render(self) -> bytes:
        return generate_latest(self.registry)
