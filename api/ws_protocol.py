"""The WebSocket session protocol's wire format: decoding, validation, event constructors.

Pure functions, no sockets: events are dicts with a ``type`` (names follow the OpenAI Realtime
API). Frames are JSON text by default, msgpack binary when the client negotiated the
``tarry.msgpack`` subprotocol. Every malformed event raises ``ProtocolError`` with a stable
``code``; the server answers with an ``error`` event and keeps the connection.
"""

from __future__ import annotations

import json
from typing import Any

import msgpack

from api.errors import to_api_error
from api.json_input import check_storable, parse_json
from api.openai_params import RESPONSE_SAMPLING_FIELDS
from sessions.errors import SessionMovedError

MSGPACK_SUBPROTOCOL = "tarry.msgpack"
AUTH_SUBPROTOCOL_PREFIX = "tarry.auth."

CLIENT_EVENTS = {
    "session.create",
    "session.resume",
    "session.update",
    "conversation.item.create",
    "conversation.item.truncate",
    "response.create",
    "response.cancel",
    "session.fork",
    "session.close",
}
SESSION_FIELDS = {"instructions", "tools", "tool_choice", *RESPONSE_SAMPLING_FIELDS}
RESPONSE_FIELDS = {"tool_choice", "generate", "instructions", *RESPONSE_SAMPLING_FIELDS}


class ProtocolError(Exception):
    def __init__(self, code: str, message: str, event_id: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.event_id = event_id


def decode_frame(data: str | bytes, binary: bool) -> dict[str, Any]:
    """One client frame -> an event dict with a known ``type`` whose strings are valid Unicode
    and whose integers fit in 64 bits (``api.json_input``)."""
    try:
        event = msgpack.unpackb(data) if binary else parse_json(data)
    except Exception as exc:
        encoding = "msgpack" if binary else "JSON"
        raise ProtocolError("invalid_frame", f"the frame is not valid {encoding}: {exc}") from exc
    if not isinstance(event, dict):
        raise ProtocolError("invalid_event", "an event must be an object")
    event_id = event.get("event_id")
    if event_id is not None and not isinstance(event_id, str):
        raise ProtocolError("invalid_event", "event_id must be a string")
    kind = event.get("type")
    if kind not in CLIENT_EVENTS:
        raise ProtocolError("unknown_event", f"unknown event type {kind!r}", event_id)
    try:
        check_storable(event)  # no lone surrogate nor 65-bit integer may reach a session
    except ValueError as exc:
        raise ProtocolError("invalid_event", str(exc), event_id) from exc
    return event


def encode_frame(event: dict[str, Any], binary: bool) -> str | bytes:
    return msgpack.packb(event) if binary else json.dumps(event)


def session_config(event: dict[str, Any], key: str = "session") -> dict[str, Any]:
    """The ``session`` (or ``response``) object of an event, checked field by field."""
    allowed = SESSION_FIELDS if key == "session" else RESPONSE_FIELDS
    config = event.get(key, {})
    if not isinstance(config, dict):
        raise ProtocolError("invalid_event", f"{key} must be an object", event.get("event_id"))
    unknown = set(config) - allowed
    if unknown:
        raise ProtocolError(
            "invalid_event", f"unknown {key} fields: {sorted(unknown)}", event.get("event_id")
        )
    for name, kinds in FIELD_TYPES.items():
        if name in config and not _has_type(config[name], kinds):
            raise ProtocolError(
                "invalid_event", f"{key}.{name} has the wrong type", event.get("event_id")
            )
    return config


FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "instructions": (str,),
    "tools": (list,),
    "seed": (int,),
    "generate": (bool,),
    "max_output_tokens": (int,),
    "temperature": (int, float),
    "top_p": (int, float),
    "stop": (str, list),
    "ignore_eos": (bool,),
    "logit_bias": (dict,),
}


def _has_type(value: Any, kinds: tuple[type, ...]) -> bool:
    """isinstance, except that a bool is not accepted as a number."""
    if isinstance(value, bool) and bool not in kinds:
        return False
    return isinstance(value, kinds)


def item_to_message(event: dict[str, Any]) -> dict[str, Any]:
    """A ``conversation.item.create`` item as a chat message (role + string content)."""
    event_id = event.get("event_id")
    item = event.get("item")
    if not isinstance(item, dict):
        raise ProtocolError("invalid_event", "item must be an object", event_id)
    if item.get("type") == "function_call_output":
        output = item.get("output")
        if not isinstance(item.get("call_id"), str) or not isinstance(output, str):
            raise ProtocolError(
                "invalid_event", "function_call_output needs string call_id and output", event_id
            )
        return {"role": "tool", "content": output, "tool_call_id": item["call_id"]}
    if item.get("type", "message") != "message":
        raise ProtocolError(
            "invalid_event", f"unsupported item type {item.get('type')!r}", event_id
        )
    role = item.get("role")
    if role not in ("system", "user", "assistant"):
        raise ProtocolError(
            "invalid_event", "message role must be system, user or assistant", event_id
        )
    content = item.get("content")
    if isinstance(content, str):
        return {"role": role, "content": content}
    if not isinstance(content, list) or not all(
        isinstance(p, dict) and isinstance(p.get("text"), str) for p in content
    ):
        raise ProtocolError(
            "invalid_event", "content must be a list of {type: input_text, text} parts", event_id
        )
    return {"role": role, "content": "".join(part["text"] for part in content)}


def error_event(
    code: str, message: str, event_id: str | None = None, kind: str = "invalid_request_error"
) -> dict[str, Any]:
    return {
        "type": "error",
        "error": {"type": kind, "code": code, "message": message, "event_id": event_id},
    }


def error_event_of(exc: Exception, event_id: str | None = None) -> dict[str, Any] | None:
    """The ``error`` event of an exception a client event can cause (``ProtocolError`` or
    anything ``api.errors.to_api_error`` maps), the same on every WebSocket surface;
    ``session_moved`` carries the owner's URL as ``owner``. None for a bug."""
    if isinstance(exc, ProtocolError):
        return error_event(exc.code, exc.message, exc.event_id or event_id)
    error = to_api_error(exc)
    if error is None:
        return None
    event = error_event(error.code, error.message, event_id)
    if isinstance(exc, SessionMovedError):
        event["error"]["owner"] = exc.owner_url
    return event


def usage_of(usage: Any) -> dict[str, Any]:
    """Realtime-style usage from a ``TurnUsage``."""
    return {
        "input_tokens": usage.prompt_tokens,
        "output_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "input_token_details": {
            "cached_tokens": usage.cached_tokens,
            "restored_tokens": usage.restored_tokens,
        },
    }
