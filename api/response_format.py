"""``response_format`` (chat) and ``text.format`` (Responses): JSON output through xgrammar.

Accepted shapes (anything else is a 400 naming the field):

- chat: ``{"type": "text"}``, ``{"type": "json_object"}``,
  ``{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": ...}}``;
- Responses ``text.format``: ``{"type": "text"}``, ``{"type": "json_object"}``,
  ``{"type": "json_schema", "name": ..., "schema": {...}, "strict": ...}``.

The output is then one compact JSON value (any object for ``json_object``; for ``json_schema``
a value valid against the schema, within the subset of ``tools.json_schema_grammar``: declared
properties in order, no additional ones; ``strict`` changes nothing). The constraint guarantees
a valid value only when generation ends by itself: near ``max_tokens`` the processor closes what
is open, but a value cut by ``max_tokens`` is not valid JSON (finish_reason ``length``).

Together with tools (as vLLM does, a forced call wins): ``tool_choice`` "required" or a named
function constrains the output to that call and ``response_format`` applies to nothing (it is
still validated); with "auto" the model writes either one tool call or the JSON answer; with
"none" (or no tools) the JSON answer.
"""

from __future__ import annotations

from typing import Any

from api.errors import APIError
from api.tool_runtime import ToolRuntime, call_token_budget
from tools.constrained import JsonAnswer
from tools.json_schema_grammar import ToolSchemaError

FORMAT_TYPES = ("text", "json_object", "json_schema")


def json_answer_from_format(value: Any, param: str = "response_format") -> JsonAnswer | None:
    """The JSON answer a ``response_format`` / ``text.format`` asks for; None for text.

    Raises APIError (400, ``param``) on a malformed format."""
    if value is None:
        return None
    if not isinstance(value, dict) or value.get("type") not in FORMAT_TYPES:
        raise APIError(
            f'{param} must be an object with "type" one of {", ".join(FORMAT_TYPES)}', param=param
        )
    kind = value["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return JsonAnswer(None)
    # Chat nests the schema under "json_schema"; the Responses API puts it beside "type".
    spec = value.get("json_schema", value)
    where = f"{param}.json_schema" if "json_schema" in value else param
    if not isinstance(spec, dict):
        raise APIError(f"{where} must be an object", param=param)
    name = spec.get("name")
    if name is not None and not isinstance(name, str):
        raise APIError(f"{where}.name must be a string", param=param)
    strict = spec.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise APIError(f"{where}.strict must be a boolean", param=param)
    schema = spec.get("schema")
    if schema is None:
        schema = {"type": "object"} if "schema" not in spec else schema
    if not isinstance(schema, dict):
        raise APIError(f"{where}.schema must be a JSON schema object", param=param)
    return JsonAnswer(schema)


def response_format_processors(
    runtime: ToolRuntime,
    response_format: Any,
    tools: list[dict[str, Any]] | None = None,
    tool_choice: Any = "auto",
    max_tokens: int | None = None,
    param: str = "response_format",
) -> list[Any]:
    """Logits processors that make the output follow ``response_format`` (module docstring).

    ``tools`` are the request's normalized tools and ``tool_choice`` its choice (validated by
    ``runtime.processors``). [] for text, or when a forced call already constrains the output.
    Raises APIError (400, ``param``) on a malformed format or a schema that cannot be compiled.
    """
    answer = json_answer_from_format(response_format, param)
    if answer is None:
        return []
    call_tools = tools if tools and tool_choice in (None, "auto") else None
    try:
        processor = runtime.constrainer.answer_processor(
            answer,
            call_tools,
            max_call_tokens=call_token_budget(max_tokens),
        )
    except ToolSchemaError as exc:
        raise APIError(f"{param}: the schema cannot be used: {exc}", param=param) from exc
    forced_call = bool(tools) and tool_choice not in (None, "auto", "none")
    return [] if forced_call else [processor]
