"""A parsed tool call, the tool-call formats, and what a streaming parser emits."""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Any, Literal

ToolCallFormat = Literal["hermes", "llama3_json", "mistral"]
TOOL_CALL_FORMATS: tuple[ToolCallFormat, ...] = ("hermes", "llama3_json", "mistral")


def new_call_id() -> str:
    """An unguessable, unique tool call id in OpenAI's style."""
    return "call_" + secrets.token_hex(12)


@dataclass(frozen=True, slots=True)
class ToolCall:
    call_id: str
    name: str
    arguments_json: str  # a JSON object, as OpenAI's ``function.arguments`` carries it


@dataclass(frozen=True, slots=True)
class TextDelta:
    """Plain text that is safe to show: it is certainly not part of a tool call."""

    text: str


@dataclass(frozen=True, slots=True)
class ToolCallDone:
    """A complete, valid tool call; ``index`` counts calls in this output from 0."""

    index: int
    call: ToolCall


ToolParserEvent = TextDelta | ToolCallDone


def tool_call_from_json(payload: Any) -> ToolCall | None:
    """A ``ToolCall`` from ``{"name": str, "arguments"|"parameters": object}``; None if invalid.

    Arguments may be an object or a string holding a JSON object; absent means ``{}``.
    """
    if not isinstance(payload, dict):
        return None
    name = payload.get("name")
    if not isinstance(name, str) or not name:
        return None
    arguments = payload.get("arguments", payload.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ToolCall(new_call_id(), name, json.dumps(arguments, ensure_ascii=False))
