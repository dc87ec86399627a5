"""A Responses API request (HTTP body or WebSocket ``response.create`` frame), checked once:
every bad field is an ``APIError`` (400) naming it, before any session is touched."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from api.errors import APIError
from api.openai_params import sampling_from_fields
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
    _check_text_format(body.get("text"))
    params = sampling_from_fields(body, state.limits.max_output_tokens, state.sampling_defaults)
    tools = normalize_tools(body.get("tools"))
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
        messages=messages,
        instructions=instructions,
        previous_response_id=previous,
        store=body.get("store") is not False,
        stream=bool(body.get("stream")),
    )


def _check_text_format(text: Any) -> None:
    """Only plain text output for now. Hook point: structured output (``json_object``,
    ``json_schema``) plugs in here once ``api.response_format`` builds logits processors
    from a format; until then those formats are refused, never ignored."""
    if text is None:
        return
    if not isinstance(text, dict):
        raise APIError("text must be an object", param="text")
    fmt = text.get("format")
    if fmt is None:
        return
    if not isinstance(fmt, dict) or fmt.get("type") != "text":
        kind = fmt.get("type") if isinstance(fmt, dict) else fmt
        raise APIError(
            f"text.format {kind!r} is not supported yet; only {{'type': 'text'}} is",
            code="unsupported_text_format",
            param="text.format",
        )
