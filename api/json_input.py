"""Parse client JSON (HTTP bodies, WebSocket text frames) so that anything odd is a ValueError.

``json.loads`` accepts three things the rest of the server cannot handle: nesting deep enough
to raise ``RecursionError``; ``"\\ud800"`` escapes that decode to a lone surrogate, a ``str``
that cannot be encoded as UTF-8 (the tokenizer, msgpack and Redis records all fail on it); and
integers outside 64 bits, which msgpack (session records) cannot store. All are refused here,
at the edge, with a message naming the problem, so no such value reaches a session.
"""

from __future__ import annotations

import json
from typing import Any

MIN_INT, MAX_INT = -(1 << 63), 1 << 64  # what msgpack stores


def loads_json(data: str | bytes) -> Any:
    """The parsed value; ValueError for malformed JSON, too deep nesting, a lone surrogate or
    an integer outside [-2**63, 2**64)."""
    value = parse_json(data)
    check_storable(value)
    return value


def parse_json(data: str | bytes) -> Any:
    """``json.loads``, with too deep nesting a ValueError (call ``check_storable`` next)."""
    try:
        return json.loads(data)
    except RecursionError as exc:
        raise ValueError("JSON nested too deeply") from exc


def check_storable(value: Any) -> None:
    """ValueError if any string (or object key) in ``value`` holds a lone surrogate, or an
    integer does not fit in 64 bits. Iterative, so a deep value cannot exhaust the stack."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            _check_text(item)
        elif isinstance(item, dict):
            for key, child in item.items():
                if isinstance(key, str):
                    _check_text(key)
                pending.append(child)
        elif isinstance(item, list):
            pending.extend(item)
        elif isinstance(item, int) and not MIN_INT <= item < MAX_INT:
            raise ValueError(f"the integer {item} does not fit in 64 bits")


def _check_text(text: str) -> None:
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"a string holds a lone surrogate (\\u{ord(text[exc.start]):04x}); "
            "text must be valid Unicode"
        ) from exc
