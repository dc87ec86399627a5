"""The Responses API over HTTP: ``POST /v1/responses`` (JSON, or server-sent events with
``stream: true``), ``GET`` and ``DELETE /v1/responses/{id}``.

A request runs like every other surface's (``api.responses_request`` checks it,
``api.responses_sessions`` opens its session, ``api.responses_stream`` runs the shared
pipeline). Errors before the first output are OpenAI-shaped 4xx answers; a stream that fails
later ends with an ``error`` event. A session another instance owns answers 307 to it.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from api.disconnect import StreamingUntilDisconnect, aclose_quietly, run_until_disconnect
from api.errors import APIError, session_moved, to_api_error
from api.openai_http import _chain, _first_then_rest, _not_completed, read_json
from api.responses_request import parse_responses_request
from api.responses_sessions import (
    abandon,
    delete_response,
    find_response,
    open_session,
    response_id_for,
)
from api.responses_stream import response_stream
from api.state import ServerState
from sessions.errors import SessionMovedError

TERMINAL_EVENTS = ("response.completed", "response.incomplete")


def _api_error(exc: Exception, request: Request) -> Exception:
    """The APIError to answer for ``exc`` (``exc`` itself when it is a bug)."""
    if isinstance(exc, SessionMovedError):
        return session_moved(exc, request)
    return to_api_error(exc) or exc


async def _mapped(
    events: AsyncIterator[dict[str, Any]], request: Request
) -> AsyncIterator[dict[str, Any]]:
    try:
        async for event in events:
            yield event
    except Exception as exc:
        raise _api_error(exc, request) from exc
    finally:
        await aclose_quietly(events)


async def create_response(request: Request) -> Response:
    state: ServerState = request.app.state.tarry
    owner = state.owner_for(request.headers.get("authorization"))
    body = await read_json(request, state.limits.max_frame_bytes)
    parsed = parse_responses_request(body, state)
    try:
        previous = None
        if parsed.previous_response_id is not None:
            previous = await find_response(
                state, owner, parsed.previous_response_id, "previous_response_id"
            )
        opened = await open_session(state, owner, parsed, previous)
    except Exception as exc:
        raise _api_error(exc, request) from exc
    response_id = response_id_for(opened.session)
    events = _mapped(response_stream(state, opened, parsed, response_id, "responses"), request)
    pulled = await run_until_disconnect(request.receive, _first_then_rest(events), state.stopping)
    if pulled is None:  # stopped, perhaps before the stream ran: undo (idempotent) here too
        abandon(state, opened)
        return _not_completed(state)
    first, rest = pulled
    chained = _chain([first] if first else [], rest)
    if parsed.stream:
        return StreamingUntilDisconnect(_sse(chained), "text/event-stream", state.stopping)

    async def collect() -> Response:
        final: dict[str, Any] = {}
        async for event in chained:
            if event["type"] in TERMINAL_EVENTS:
                final = event["response"]
        return JSONResponse(final)

    result = await run_until_disconnect(request.receive, collect(), state.stopping)
    return result or _not_completed(state)


async def _sse(events: AsyncIterator[dict[str, Any]]) -> AsyncIterator[str]:
    """Server-sent events as OpenAI sends them: ``event:`` + ``data:`` with a
    ``sequence_number`` counting from 0; no ``[DONE]``."""
    sequence = 0

    def frame(event: dict[str, Any]) -> str:
        nonlocal sequence
        event["sequence_number"] = sequence
        sequence += 1
        return f"event: {event['type']}\ndata: {json.dumps(event)}\n\n"

    try:
        async for event in events:
            yield frame(event)
    except APIError as exc:
        error = exc.body()["error"]
        yield frame({"type": "error", **{k: error[k] for k in ("code", "message", "param")}})
    finally:
        await aclose_quietly(events)


async def get_response(request: Request) -> Response:
    state: ServerState = request.app.state.tarry
    owner = state.owner_for(request.headers.get("authorization"))
    try:
        _, entry = await find_response(state, owner, request.path_params["response_id"])
    except Exception as exc:
        raise _api_error(exc, request) from exc
    return JSONResponse(entry["response"])


async def delete_response_route(request: Request) -> Response:
    state: ServerState = request.app.state.tarry
    owner = state.owner_for(request.headers.get("authorization"))
    response_id = request.path_params["response_id"]
    try:
        session, _ = await find_response(state, owner, response_id)
        delete_response(state, session, response_id)
    except Exception as exc:
        raise _api_error(exc, request) from exc
    return JSONResponse({"id": response_id, "object": "response.deleted", "deleted": True})
