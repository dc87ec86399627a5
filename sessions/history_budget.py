"""How much conversation a session (or one HTTP chat request) may hold: bytes and tokens.

The model's context length bounds what can ever be answered, so history beyond it is only a
way to exhaust the server's memory (and, when it is rendered, its event loop). The budget is
checked in two steps, both when an item *arrives*:

1. bytes (cheap, no tokenizer): the UTF-8 size of every message's text must stay within
   ``max_bytes`` (default ``max_tokens * MAX_BYTES_PER_TOKEN``: text needing more bytes than
   that per token is practically never seen). This bounds what step 2 has to tokenize.
2. tokens: the new items are tokenized (in a worker thread when the caller is the event loop)
   and the session's estimated prompt, plus one token to generate, must fit ``max_tokens``.

The estimate is exact for everything up to the last turn (the session's token ids) and counts
the text of each newer message plus ``MESSAGE_OVERHEAD_TOKENS`` for its template markup; the
exact rendering is checked again when a turn starts (``SessionManager.generate``).
A string with a lone surrogate cannot be encoded (nor stored in Redis) and is rejected here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from sessions.errors import HistoryTooLongError, InvalidSessionInputError

MAX_BYTES_PER_TOKEN = 32
MESSAGE_OVERHEAD_TOKENS = 8  # role markers and separators the chat template adds per message


@dataclass(frozen=True)
class HistoryBudget:
    max_tokens: int  # the model's context length (prompt + at least one generated token)
    max_bytes: int

    @classmethod
    def for_context(cls, max_tokens: int, max_bytes: int | None = None) -> HistoryBudget:
        return cls(max_tokens, max_bytes or max_tokens * MAX_BYTES_PER_TOKEN)

    def check_bytes(self, num_history_bytes: int, items: list[dict[str, Any]]) -> int:
        """The UTF-8 size of ``items``; raises HistoryTooLongError when the history would then
        exceed ``max_bytes``, InvalidSessionInputError for text that is not valid Unicode."""
        num_bytes = sum(message_bytes(item) for item in items)
        if num_history_bytes + num_bytes > self.max_bytes:
            raise HistoryTooLongError(
                f"the conversation would hold {num_history_bytes + num_bytes} bytes of text; "
                f"this model's context ({self.max_tokens} tokens) allows at most "
                f"{self.max_bytes} bytes"
            )
        return num_bytes

    def check_tokens(self, num_tokens: int) -> None:
        """Raises HistoryTooLongError unless a prompt of ``num_tokens`` leaves room for one
        generated token."""
        if num_tokens + 1 > self.max_tokens:
            raise HistoryTooLongError(
                f"the conversation would need about {num_tokens} tokens; this model's context "
                f"is {self.max_tokens} tokens (prompt plus at least one generated token)"
            )


def count_item_tokens(tokenizer: Any, items: list[dict[str, Any]]) -> int:
    """Tokens of the items' text plus template overhead (blocking: tokenizes)."""
    total = 0
    for item in items:
        text = _message_text(item)
        total += MESSAGE_OVERHEAD_TOKENS
        if text:
            total += len(tokenizer.encode(text, add_special_tokens=False))
    return total


def message_bytes(item: dict[str, Any]) -> int:
    """UTF-8 bytes of a message's text (content and tool calls)."""
    return utf8_len(_message_text(item))


def utf8_len(text: str) -> int:
    """``len(text.encode())``; InvalidSessionInputError for a lone surrogate."""
    if text.isascii():
        return len(text)
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise InvalidSessionInputError(
            f"text is not valid Unicode (lone surrogate at position {exc.start})"
        ) from exc


def _message_text(item: dict[str, Any]) -> str:
    content = item.get("content")
    text = content if isinstance(content, str) else ""
    calls = item.get("tool_calls")
    if calls:
        text += json.dumps(calls, ensure_ascii=False)
    return text
