"""Parse client JSON (HTTP bodies, WebSocket text frames) so that anything odd is a ValueError.

``json.loads`` accepts two things the rest of the server cannot handle: nesting deep enough to
raise ``RecursionError``, and ``"\\ud800"`` escapes that decode to a lone surrogate, a ``str``
that cannot be encoded as UTF-8 (the tokenizer, msgpack and Redis records all fail on it).
Both are refused here, at the edge, with a message naming the problem.
"""

from __future__ import annotations

import json
from typing import Any


def loads_json(data: str | bytes) -> Any:
    """The parsed value; ValueError for malformed JSON, too deep nesting or a lone surrogate."""
    try:
        value = json.loads(data)
    except RecursionError as exc:
        raise ValueError("JSON nested too deeply") from exc
    reject_lone_surrogates(value)
    return value


def reject_lone_surrogates(value: Any) -> None:
    """ValueError if any string (or object key) in ``value`` holds a lone surrogate.

    Iterative, so a deep value cannot exhaust the stack.
    """
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
