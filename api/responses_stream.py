"""One Responses API response as its streaming events, shared by the WebSocket mode and HTTP.

``response_stream`` runs the shared pipeline (``api.response_pipeline``) in an opened session
and yields OpenAI's events (without ``sequence_number``; each surface numbers what it sends)::

    response.created, response.in_progress         (after the first output: errors before
                                                    it raise instead, so HTTP can answer 4xx)
      output items (``api.responses_render``)
    response.completed | response.incomplete       (the response object, stored first)

On success the response is stored in its session (``store``) or the session is closed; on an
error or cancellation ``abandon`` undoes the request's changes, then the exception propagates.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import Any

from api.disconnect import aclose_quietly
from api.openai_http import _generate as observed
from api.response_format import response_format_processors
from api.response_pipeline import Finished, response_events
from api.responses_items import response_object
from api.responses_render import ResponsesEmitter
from api.responses_request import ResponsesRequest
from api.responses_sessions import OpenedSession, abandon, close_session, store_response
from api.state import ServerState
from engine.outputs import RequestOutput
from tools.streaming_parser import StreamingToolParser


async def response_stream(
    state: ServerState,
    opened: OpenedSession,
    request: ResponsesRequest,
    response_id: str,
    endpoint: str,
) -> AsyncIterator[dict[str, Any]]:
    """See the module docstring; ``endpoint`` labels the request metrics."""
    session = opened.session
    pending: list[dict[str, Any]] = []

    async def buffer(event: dict[str, Any]) -> None:
        pending.append(event)

    def parser_for(tool_choice: Any) -> StreamingToolParser | None:
        return state.tools.parser() if request.tools and tool_choice != "none" else None

    def generate_round(tool_choice: Any) -> AsyncIterator[RequestOutput]:
        params = dataclasses.replace(
            request.params,
            logits_processors=state.tools.processors(
                request.tools, tool_choice, request.params.max_tokens
            )
            + response_format_processors(
                state.tools,
                request.text_format,
                request.tools,
                tool_choice,
                request.params.max_tokens,
                "text.format",
            ),
        )
        waiting = parser_for(tool_choice) is not None
        return observed(state, state.sessions.generate(session, params, waiting), endpoint)

    emitter = ResponsesEmitter(buffer)
    status = "completed"
    started = False
    events = response_events(generate_round, parser_for, request.tool_choice)
    try:
        async for event in events:
            if not started:
                started = True
                created = response_object(
                    response_id, state.model_name, "in_progress", [], request.body, None
                )
                yield {"type": "response.created", "response": created}
                yield {"type": "response.in_progress", "response": created}
            await emitter.render(event)
            if isinstance(event, Finished) and event.finish_reason == "length":
                status = "incomplete"
            for item in pending:
                yield item
            pending.clear()
        final = response_object(
            response_id, state.model_name, status, emitter.output, request.body, session.last_usage
        )
        final["store"] = request.store
        if request.store:
            store_response(state, opened, response_id, final)
        else:
            close_session(state, session)
    except BaseException:
        await aclose_quietly(events)
        abandon(state, opened)
        raise
    yield {"type": f"response.{status}", "response": final}
