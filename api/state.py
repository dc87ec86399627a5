"""Everything a request handler needs, built once by ``tarry serve`` (or a test) and passed in."""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass, field
from typing import Any

from api.errors import APIError
from api.metrics import Metrics
from api.tool_runtime import ToolRuntime
from engine.async_engine import AsyncEngine
from sessions.manager import SessionManager


@dataclass
class Limits:
    """What one client may use. ``max_frame_bytes`` bounds WebSocket frames and HTTP bodies
    (both enforced while they arrive); the timeouts close connections that hold a slot while
    sending nothing: ``header_timeout_s`` for an HTTP request's headers,
    ``keep_alive_timeout_s`` between requests, ``first_event_timeout_s`` for a WebSocket's
    first frame and ``idle_timeout_s`` between its frames."""

    max_frame_bytes: int = 1 << 20
    max_items_per_session: int = 1000
    max_output_tokens: int = 4096
    max_sessions_per_key: int = 256
    idle_timeout_s: float = 600.0
    first_event_timeout_s: float = 30.0
    header_timeout_s: float = 10.0
    keep_alive_timeout_s: int = 5
    max_events_per_second: int = 200


@dataclass
class ServerState:
    """The served model and its session manager; ``api_keys`` empty = no authentication.

    ``model_name`` is the id responses report; ``served_model_names`` (``model_name`` first)
    are the ids ``/v1/models`` lists; a request may name any of them or an alias in
    ``model_aliases`` (``tarry`` unless ``--served-model-name`` is given). ``sampling_defaults``
    are SamplingParams field values for fields a request leaves unset.
    """

    async_engine: AsyncEngine
    sessions: SessionManager
    model_name: str
    tools: ToolRuntime
    api_keys: set[str] = field(default_factory=set)
    limits: Limits = field(default_factory=Limits)
    metrics: Metrics = field(default_factory=Metrics)
    # Set when the shutdown grace period is over: running HTTP requests end with a 503.
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    served_model_names: tuple[str, ...] = ()
    model_aliases: tuple[str, ...] = ()
    sampling_defaults: dict[str, Any] = field(default_factory=dict)
    maintenance_interval_s: float = 1.0  # session policy and idle expiry (api.maintenance)

    def check_model(self, model: Any) -> None:
        """Raise APIError(404, ``model_not_found``) unless ``model`` is None or served here."""
        if model is None:
            return
        served = self.served_model_names or (self.model_name,)
        if model not in served and model not in self.model_aliases:
            raise APIError(
                f"The model `{model}` does not exist (served: {', '.join(served)}).",
                code="model_not_found",
                status=404,
                param="model",
            )

    def owner_for(self, authorization: str | None) -> str:
        """The owner id (``sessions.owner_keys``) of a bearer token's tenant; raises
        APIError(401) for a bad or missing key."""
        token = None
        if authorization and authorization.lower().startswith("bearer "):
            token = authorization[7:].strip()
        owner_keys = self.sessions.owner_keys  # records store a keyed hash, never the key
        if not self.api_keys:
            return owner_keys.owner_for(token or "anonymous")
        if token is None or not any(secrets.compare_digest(token, key) for key in self.api_keys):
            raise APIError("invalid or missing API key", code="invalid_api_key", status=401)
        return owner_keys.owner_for(token)
