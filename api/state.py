"""Everything a request handler needs, built once by ``tarry serve`` (or a test) and passed in."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from api.errors import APIError
from api.metrics import Metrics
from api.tool_runtime import ToolRuntime
from engine.async_engine import AsyncEngine
from sessions.manager import SessionManager


@dataclass
class Limits:
    max_frame_bytes: int = 1 << 20
    max_items_per_session: int = 1000
    max_output_tokens: int = 4096
    max_sessions_per_key: int = 256
    idle_timeout_s: float = 600.0
    max_events_per_second: int = 200


@dataclass
class ServerState:
    """The served model and its session manager; ``api_keys`` empty = no authentication.

    ``model_name`` is the id responses report; ``served_model_names`` (``model_name`` first)
    are the ids ``/v1/models`` lists; a request may name any of them or an alias in
    ``model_aliases`` (``tarry`` unless ``--served-model-name`` is given). ``sampling_defaults``
    are SamplingParams field values for fields a request leaves unset.
    """

    runner: AsyncEngine
    sessions: SessionManager
    model_name: str
    tools: ToolRuntime
    api_keys: set[str] = field(default_factory=set)
    limits: Limits = field(default_factory=Limits)
    metrics: Metrics = field(default_factory=Metrics)
    served_model_names: tuple[str, ...] = ()
    model_aliases: tuple[str, ...] = ()
    sampling_defaults: dict[str, Any] = field(default_factory=dict)

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
        """The tenant a bearer token belongs to; raises APIError(401) for a bad or missing key."""
        token = None
        if authorization and authorization.lower().startswith("bearer "):
            token = authorization[7:].strip()
        if not self.api_keys:
            return "key:" + (token or "anonymous")
        if token is None or token not in self.api_keys:
            raise APIError("invalid or missing API key", code="invalid_api_key", status=401)
        return "key:" + token
