"""Responses API shapes: input items -> chat messages, and output items / response objects.

Pure functions (no sockets), shared by the Responses WebSocket mode.
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Any

from api.ws_protocol import ProtocolError
from sessions.session import TurnUsage


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


def _text_of(content: Any, event_id: str | None) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(p, dict) and isinstance(p.get("text"), str) for p in content
    ):
        return "".join(part["text"] for part in content)
    raise ProtocolError("invalid_request", "message content must be text", event_id)


def input_to_messages(value: Any, event_id: str | None = None) -> list[dict[str, Any]]:
    """The ``input`` of a response.create (a string or a list of items) as chat messages.

    Function calls the model made earlier become assistant messages with ``tool_calls``;
    function outputs become ``tool`` messages (the chat template or ``tools.render`` presents
    both the model's way).
    """
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list):
        raise ProtocolError(
            "invalid_request", "input must be a string or a list of items", event_id
        )
    messages: list[dict[str, Any]] = []
    for item in value:
        if not isinstance(item, dict):
            raise ProtocolError("invalid_request", "each input item must be an object", event_id)
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise ProtocolError("invalid_request", f"unsupported role {role!r}", event_id)
            role = "system" if role == "developer" else role
            messages.append({"role": role, "content": _text_of(item.get("content"), event_id)})
        elif kind == "function_call":
            if not all(isinstance(item.get(k), str) for k in ("call_id", "name", "arguments")):
                raise ProtocolError(
                    "invalid_request",
                    "a function_call item needs string call_id, name and arguments",
                    event_id,
                )
            call = {
                "id": item.get("call_id"),
                "type": "function",
                "function": {"name": item.get("name"), "arguments": item.get("arguments")},
            }
            if messages and messages[-1]["role"] == "assistant" and "tool_calls" in messages[-1]:
                messages[-1]["tool_calls"].append(call)  # parallel calls: one assistant turn
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            if not isinstance(item.get("call_id"), str) or "output" not in item:
                raise ProtocolError(
                    "invalid_request",
                    "a function_call_output item needs a string call_id and an output",
                    event_id,
                )
            output = item.get("output")
            if not isinstance(output, str):
                output = json.dumps(output)
            messages.append(
                {"role": "tool", "content": output, "tool_call_id": item.get("call_id")}
            )
        else:
            raise ProtocolError(
                "invalid_request", f"unsupported input item type {kind!r}", event_id
            )
    return messages


def message_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    return {
        "type": "message",
        "id": item_id,
        "role": "assistant",
        "status": status,
        "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
        if status == "completed"
        else [],
    }


def response_object(
    response_id: str,
    model: str,
    status: str,
    output: list[dict[str, Any]],
    request: dict[str, Any],
    usage: TurnUsage | None,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": response_id,
        "object": "response",
        "created_at": int(time.time()),
        "model": model,
        "status": status,
        "output": output,
        "parallel_tool_calls": False,
        "tool_choice": request.get("tool_choice", "auto"),
        "tools": request.get("tools", []),
        "instructions": request.get("instructions"),
        "temperature": request.get("temperature"),
        "top_p": request.get("top_p"),
        "previous_response_id": request.get("previous_response_id"),
        "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "metadata": {},
        "usage": None,
    }
    if usage is not None:
        body["usage"] = {
            "input_tokens": usage.prompt_tokens,
            "input_tokens_details": {"cached_tokens": usage.cached_tokens},
            "output_tokens": usage.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        }
    return body


def function_call_item(
    item_id: str, call_id: str, name: str, arguments: str, status: str
) -> dict[str, Any]:
    return {
        "type": "function_call",
        "id": item_id,
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": status,
    }
