"""A Responses API request (HTTP body or WebSocket ``response.create`` frame), checked once:
every bad field is an ``APIError`` (400) naming it, before any session is touched."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from api.errors import APIError
from api.openai_params import sampling_from_fields
from api.response_format import response_format_processors
from api.responses_items import input_to_messages
from api.state import ServerState
from api.tool_runtime import check_tool_choice, normalize_tools
from api.ws_protocol import ProtocolError
from engine.sampling_params import SamplingParams


@dataclass
class ResponsesRequest:
    body: dict[str, Any]  # as received (echoed in the response object)
    params: SamplingParams
    tools: list[dict[str, Any]]  # chat format (``api.tool_runtime.normalize_tools``)
    tool_choice: Any
    text_format: Any  # ``text.format`` (json_object / json_schema constrain the output)
    messages: list[dict[str, Any]]  # the new input as chat messages
    instructions: str | None
    previous_response_id: str | None
    store: bool
    stream: bool


def parse_responses_request(body: dict[str, Any], state: ServerState) -> ResponsesRequest:
    """Check ``body``; raises APIError (404 for a model not served, else 400)."""
    state.check_model(body.get("model"))
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise APIError("instructions must be a string", param="instructions")
    previous = body.get("previous_response_id")
    if previous is not None and not isinstance(previous, str):
        raise APIError("previous_response_id must be a string", param="previous_response_id")
    for name in ("store", "stream"):
        if body.get(name) is not None and not isinstance(body[name], bool):
            raise APIError(f"{name} must be a boolean", param=name)
    params = sampling_from_fields(body, state.limits.max_output_tokens, state.sampling_defaults)
    tools = normalize_tools(body.get("tools"))
    text_format = _text_format(state, body.get("text"), tools)
    tool_choice = body.get("tool_choice") or "auto"
    check_tool_choice(tools, tool_choice)
    if "input" not in body and previous is None:
        raise APIError("input is required", param="input")
    try:
        messages = input_to_messages(body.get("input", []))
    except ProtocolError as exc:
        raise APIError(exc.message, param="input") from exc
    return ResponsesRequest(
        body=body,
        params=params,
        tools=tools,
        tool_choice=tool_choice,
        text_format=text_format,
        messages=messages,
        instructions=instructions,
        previous_response_id=previous,
        store=body.get("store") is not False,
        stream=bool(body.get("stream")),
    )


def _text_format(state: ServerState, text: Any, tools: list[dict[str, Any]]) -> Any:
    """The ``text.format`` object (None: plain text). A malformed format or a schema that
    cannot be compiled is refused here (APIError 400), before any session is touched."""
    if text is None:
        return None
    if not isinstance(text, dict):
        raise APIError("text must be an object", param="text")
    text_format = text.get("format")
    response_format_processors(state.tools, text_format, tools, "auto", None, "text.format")
    return text_format
