"""The Starlette application: routes, error handling, health and metrics."""

from __future__ import annotations

import time

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute

from api import completions_http, inspector_routes, openai_http, responses_http, sessions_http
from api.body_limit import BodyLimitMiddleware
from api.errors import APIError
from api.inspector import InspectorHub
from api.maintenance import lifespan
from api.responses_ws import responses_socket
from api.state import ServerState
from api.surfaces import surface_app, surface_socket
from api.ws_sessions import session_socket
from sessions.session import SessionState


async def health(request: Request) -> Response:
    """Liveness and tier health; reads only snapshots, never waits for the engine (except
    with ``?integrity=1``: ``SessionManager.integrity_report``)."""
    state: ServerState = request.app.state.tarry
    tiers = state.sessions.tier_health()
    status = "ok" if all(tiers.values()) else "degraded"
    body = {
        "status": status,
        "model": state.model_name,
        "engine_running": state.async_engine.is_running,
        "tiers": tiers,
        "kv_pool_usage": round(state.async_engine.stats.kv_pool_usage, 4),
        "session_records_dirty": state.sessions.records.num_dirty,
        "time": time.time(),
    }
    ownership = state.sessions.ownership
    if ownership is not None:
        body["ownership"] = ownership.health()
        if not ownership.healthy:
            body["status"] = "degraded"
    if request.query_params.get("integrity") == "1":
        # Operators and soak runs: invariants and pool counts (waits for one engine step).
        state.owner_for(request.headers.get("authorization"))  # a valid key, when keys are set
        body["integrity"] = await state.sessions.integrity_report()
    return JSONResponse(body)


async def metrics(request: Request) -> Response:
    state: ServerState = request.app.state.tarry
    stats = state.async_engine.stats
    state.metrics.pool_usage.set(stats.kv_pool_usage)
    state.metrics.requests_running.set(stats.num_running)
    state.metrics.requests_waiting.set(stats.num_waiting)
    state.metrics.engine_steps.set(stats.num_steps)
    state.metrics.draft_tokens.set(stats.num_draft_tokens)
    state.metrics.accepted_draft_tokens.set(stats.num_accepted_draft_tokens)
    counts = {s.value: 0 for s in SessionState}
    for session in state.sessions.all_sessions():
        counts[session.state.value] += 1
    for name, count in counts.items():
        state.metrics.sessions.labels(name).set(count)
    for tier, up in state.sessions.tier_health().items():
        state.metrics.tier_up.labels(tier).set(1 if up else 0)
    ownership = state.sessions.ownership
    if ownership is not None:
        state.metrics.leases_held.set(len(ownership.leases.held))
    state.metrics.fenced_writes.set(state.sessions.records.fenced_writes)
    engine = state.async_engine.engine  # open_ended_load reads a copy: safe off the engine thread
    open_ended = engine.open_ended_load()
    state.metrics.open_ended_running.set(open_ended.num_requests)
    state.metrics.open_ended_max_output_tokens.set(open_ended.max_output_tokens)
    state.metrics.open_ended_oldest_age.set(open_ended.oldest_age_s)
    state.metrics.open_ended_admitted.set(engine.num_open_ended_requests)
    return Response(state.metrics.render(), media_type="text/plain; version=0.0.4")


async def api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    headers = {"Location": exc.location} if exc.location else {}
    if exc.status == 413:
        headers["Connection"] = "close"  # the rest of the body is not read
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


async def server_error(request: Request, exc: Exception) -> Response:
    """A bug: an OpenAI-shaped 500 (logged by uvicorn), never a plain-text page."""
    body = APIError("internal server error", code="server_error", status=500).body()
    return JSONResponse(body, status_code=500)


def build_app(state: ServerState) -> Starlette:
    """The HTTP + WebSocket app serving ``state``'s model."""
    app = Starlette(
        routes=[
            Route("/health", health),
            Route("/metrics", metrics),
            Route("/v1/models", openai_http.models),
            Route("/v1/models/{model_id:path}", openai_http.model),
            Route(
                "/v1/chat/completions",
                surface_app("chat", openai_http.chat_completions),
                methods=["POST"],
            ),
            Route(
                "/v1/completions",
                surface_app("completions", completions_http.completions),
                methods=["POST"],
            ),
            Route("/v1/sessions", sessions_http.list_sessions, methods=["GET"]),
            Route("/v1/sessions", sessions_http.create_session, methods=["POST"]),
            Route("/v1/sessions/{session_id}", sessions_http.get_session, methods=["GET"]),
            Route("/v1/sessions/{session_id}", sessions_http.delete_session, methods=["DELETE"]),
            WebSocketRoute("/v1/sessions", surface_socket("session_ws", session_socket)),
            Route(
                "/v1/responses",
                surface_app("responses", responses_http.create_response),
                methods=["POST"],
            ),
            Route("/v1/responses/{response_id}", responses_http.get_response, methods=["GET"]),
            Route(
                "/v1/responses/{response_id}",
                responses_http.delete_response_route,
                methods=["DELETE"],
            ),
            WebSocketRoute("/v1/responses", surface_socket("responses_ws", responses_socket)),
            Route("/ui", inspector_routes.page),
            Route("/ui/static/{name}", inspector_routes.static_file),
            WebSocketRoute("/ui/ws", inspector_routes.inspector_socket),
        ],
        exception_handlers={APIError: api_error, Exception: server_error},
        middleware=[Middleware(BodyLimitMiddleware, max_bytes=state.limits.max_frame_bytes)],
        lifespan=lifespan,  # periodic session upkeep (api.maintenance)
    )
    app.state.tarry = state
    app.state.inspector = InspectorHub(state)  # samples only while a /ui page is open
    return app
