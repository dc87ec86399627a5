"""Build a serving stack (engine, tiers, sessions, app) and run it with uvicorn."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import uvicorn

from api.app import build_app
from api.http_protocol import uvicorn_limits
from api.metrics import Metrics, MetricsObserver
from api.net import is_loopback
from api.state import Limits, ServerState
from api.tool_pool import DEFAULT_TOOL_WORKERS, DEFAULT_TOOL_WORKERS_PER_KEY
from api.tool_runtime import ToolRuntime
from engine.async_engine import AsyncEngine
from engine.generation_config import sampling_defaults
from engine.llm_engine import LLMEngine
from sessions.manager import SessionManager
from sessions.owner_keys import OwnerKeys
from sessions.ownership import SessionOwnership
from sessions.record_store import MemoryRecordStore, RedisRecordStore, SessionRecordStore
from sessions.redis_connect import connect_redis
from sessions.tiers.factory import build_kv_store
from tools.tool_call import ToolCallFormat


@dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    redis_url: str | None = None
    redis_cluster: bool = False  # redis_url names a node of a Redis Cluster
    api_keys: tuple[str, ...] = ()
    host_kv_bytes: int = 1 << 30
    limits: Limits | None = None
    # Several instances sharing the Redis: session leases (needs redis_url; off by default).
    ownership: bool = False
    advertise_url: str | None = None  # where other instances send this one's clients
    lease_ttl_s: float = 10.0
    # How long to wait for a lease holder's /health before taking its session over.
    owner_probe_timeout_s: float = 0.75
    # Keys the owner hash stored in session records (TARRY_OWNER_KEY_SECRET); None = a plain
    # namespaced SHA-256. Instances sharing a Redis need the same value.
    owner_key_secret: bytes | None = None
    # The model ids clients use (the first is reported); () = the model's name, plus "tarry".
    served_model_names: tuple[str, ...] = ()
    generation_config: str = "auto"  # auto | vllm | none | a directory (engine.generation_config)
    override_generation_config: dict[str, Any] = field(default_factory=dict)
    tool_call_parser: ToolCallFormat | None = None  # None: chosen from the chat template
    tool_workers: int = DEFAULT_TOOL_WORKERS  # threads for python tool calls
    tool_workers_per_key: int = DEFAULT_TOOL_WORKERS_PER_KEY  # most of them one key holds
    session_idle_timeout_s: float = 3600.0  # untouched sessions are evicted after this
    max_sessions: int = 4096  # sessions in memory, all tenants together


def build_state(engine: LLMEngine, options: ServeOptions) -> ServerState:
    """KV tiers + session manager around ``engine``; starts the engine's step loop.

    Raises ValueError when a non-loopback host is asked for without an API key, or when the
    generation config (``options.generation_config`` and its override) is unusable.
    """
    if not is_loopback(options.host) and not options.api_keys:
        raise ValueError(f"--api-key is required to listen on the non-loopback host {options.host}")
    loaded = engine.loaded
    defaults = sampling_defaults(
        loaded.source_dir,
        loaded.embedded,
        options.generation_config,
        options.override_generation_config,
    )
    url, cluster = options.redis_url, options.redis_cluster
    engine.attach_kv_store(
        build_kv_store(engine, options.host_kv_bytes, url, redis_cluster=cluster)
    )
    ownership = build_ownership(options)
    records: SessionRecordStore = MemoryRecordStore()
    if url:
        records = RedisRecordStore(
            connect_redis(url, cluster=cluster),
            instance_id=ownership.instance_id if ownership is not None else None,
        )
    metrics = Metrics()
    async_engine = AsyncEngine(engine, observer=MetricsObserver(metrics))
    async_engine.start()
    tools = ToolRuntime(
        engine.tokenizer,
        engine.vocab_size,
        sorted(engine.eos_token_ids),
        tool_call_parser=options.tool_call_parser,
        tool_workers=options.tool_workers,
        tool_workers_per_key=options.tool_workers_per_key,
    )
    served = options.served_model_names or (loaded.name,)
    return ServerState(
        async_engine=async_engine,
        sessions=SessionManager(
            async_engine,
            records,
            ownership=ownership,
            owner_keys=OwnerKeys(options.owner_key_secret),
            idle_timeout_s=options.session_idle_timeout_s,
            max_sessions=options.max_sessions,
        ),
        model_name=served[0],
        tools=tools,
        api_keys=set(options.api_keys),
        limits=options.limits or Limits(),
        served_model_names=served,
        model_aliases=() if options.served_model_names else ("tarry",),
        sampling_defaults=defaults,
        metrics=metrics,
    )


def build_ownership(options: ServeOptions) -> SessionOwnership | None:
    """Registered and heart-beating session ownership, or None (no Redis or not asked for).

    It has its own client with short socket timeouts, so a hung Redis delays a heartbeat or a
    session look-up by seconds at most; an unreachable Redis only marks it degraded.
    """
    if not options.ownership or not options.redis_url:
        return None
    client = connect_redis(options.redis_url, cluster=options.redis_cluster)
    url = options.advertise_url or f"http://{options.host}:{options.port}"
    ownership = SessionOwnership(
        client, url, ttl_s=options.lease_ttl_s, probe_timeout_s=options.owner_probe_timeout_s
    )
    ownership.start()
    return ownership


class BackgroundServer:
    """uvicorn in a thread (tests, benchmarks): ``start()`` returns once it accepts requests."""

    def __init__(self, state: ServerState, host: str = "127.0.0.1", port: int = 0) -> None:
        self.state = state
        config = uvicorn.Config(
            build_app(state),
            host=host,
            port=port,
            log_level="warning",
            ws="websockets-sansio",
            lifespan="on",  # the maintenance task (api.maintenance)
            **uvicorn_limits(state.limits),
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        sock = self.server.servers[0].sockets[0]
        host, port = sock.getsockname()[:2]
        return f"http://{host}:{port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.state.tools.close()
        self.state.sessions.close_pool()
        self.state.async_engine.shutdown()
        if self.state.sessions.ownership is not None:
            self.state.sessions.ownership.close()
        self.state.sessions.records.close()
