"""Incremental tool-call parser: model text in, safe text deltas and complete calls out.

Formats (``ToolCallFormat``):

- ``hermes``: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, any number, anywhere
  in the text; an unterminated last call is accepted when its JSON is complete and valid.
- ``llama3_json``: after ``<|python_tag|>``, or at the very start of the message (only
  whitespace before it), a sequence of ``{"name": ..., "parameters"|"arguments": {...}}``
  objects separated by whitespace or ``;``; whatever follows the sequence is text.
- ``mistral``: ``[TOOL_CALLS]`` followed by a JSON array of ``{"name", "arguments"}`` objects,
  or (newer Mistral tokenizers) by ``name[ARGS]{...arguments...}``, one call per marker (the
  tokenizer must decode with special tokens kept for the markers to be visible).

Contract:

- A malformed call (bad JSON, no name, arguments not an object, unterminated) is returned as
  plain text, exactly as the model wrote it; the parser never raises on model output.
- Whitespace directly around a valid call is dropped; all other text is kept verbatim.
- Text that could still become part of a call (a trailing ``"<tool_c"``, the body of an open
  call, whitespace that may precede a call) is held back until it is decided, so emitted text
  is never retracted. ``finish()`` flushes everything.
- The concatenated events do not depend on how the text was split into deltas; the
  non-streaming parsing is ``feed(all) + finish()``.
"""

from __future__ import annotations

import json
from typing import Any

from tools.json_extent import JsonExtentScanner
from tools.tool_call import (
    TextDelta,
    ToolCall,
    ToolCallDone,
    ToolCallFormat,
    ToolParserEvent,
    tool_call_from_json,
)

HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"
MISTRAL_OPEN = "[TOOL_CALLS]"
MISTRAL_ARGS = "[ARGS]"
TOOL_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.")
OPENERS: dict[ToolCallFormat, str] = {
    "hermes": HERMES_OPEN,
    "llama3_json": PYTHON_TAG,
    "mistral": MISTRAL_OPEN,
}
LLAMA3_SEPARATORS = " \t\r\n;"


def parse_json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def partial_opener_len(text: str, opener: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``opener``."""
    for length in range(min(len(text), len(opener) - 1), 0, -1):
        if opener.startswith(text[-length:]):
            return length
    return 0


class StreamingToolParser:
    """Feed decoded model text; get ``TextDelta`` and ``ToolCallDone`` events (module doc)."""

    def __init__(self, format: ToolCallFormat) -> None:
        if format not in OPENERS:
            raise ValueError(f"unknown tool call format {format!r}")
        self.format: ToolCallFormat = format
        self._opener = OPENERS[format]
        self._buffer = ""  # input not decided yet; in a call it starts at the opener
        self._in_call = False
        self._held_ws = ""  # trailing whitespace of emitted text: shown unless a call follows
        self._skip_ws = False  # drop whitespace right after a valid call
        self._seen_text = False  # any non-whitespace text emitted (ends llama3's bare '{')
        self._call_prefix = ""  # whitespace (and llama3 separators) before the open call
        self._num_calls = 0
        self._scanner: JsonExtentScanner | None = None
        self._scan_idx = 0  # buffer index the scanner / closing-tag search has reached
        self._array_idx = 0  # mistral: buffer index of the call array's '[' (or the arguments)
        self._mistral_name: str | None = None  # mistral's name[ARGS]{...} form: the name
        self._sequence_num_calls = 0  # llama3: calls in the current sequence
        self._finished = False

    @property
    def num_calls(self) -> int:
        return self._num_calls

    def feed(self, delta: str) -> list[ToolParserEvent]:
        if self._finished:
            raise RuntimeError("feed() after finish()")
        self._buffer += delta
        return self._advance(final=False)

    def finish(self) -> list[ToolParserEvent]:
        """Decide everything still held back: open calls are parsed or become text."""
        if self._finished:
            return []
        events = self._advance(final=True)
        self._finished = True
        if self._held_ws:
            events.append(TextDelta(self._held_ws))
            self._held_ws = ""
        return events

    # ------------------------------------------------------------------ text mode

    def _advance(self, final: bool) -> list[ToolParserEvent]:
        events: list[ToolParserEvent] = []
        while True:
            if self._in_call:
                if not self._advance_call(final, events):
                    break
            elif not self._advance_text(final, events):
                break
        return events

    def _advance_text(self, final: bool, events: list[ToolParserEvent]) -> bool:
        """Emit decided text; True when a call opened (so the loop goes on)."""
        buffer = self._buffer
        start_idx = buffer.find(self._opener)
        if self.format == "llama3_json" and not self._seen_text and self._num_calls == 0:
            brace_idx = len(buffer) - len(buffer.lstrip())  # a bare '{' opens the message
            if buffer[brace_idx : brace_idx + 1] == "{" and not 0 <= start_idx < brace_idx:
                start_idx = brace_idx
        if start_idx >= 0:
            self._emit_text(buffer[:start_idx], events)
            self._open_call(buffer[start_idx:])
            return True
        keep = 0 if final else partial_opener_len(buffer, self._opener)
        self._emit_text(buffer[: len(buffer) - keep], events)
        self._buffer = buffer[len(buffer) - keep :]
        return False

    def _emit_text(self, text: str, events: list[ToolParserEvent]) -> None:
        if self._skip_ws:
            text = text.lstrip()
            if not text:
                return
            self._skip_ws = False
        body = text.rstrip()
        if not body:
            self._held_ws += text
            return
        events.append(TextDelta(self._held_ws + body))
        self._held_ws = text[len(body) :]
        self._seen_text = True

    def _open_call(self, buffer: str) -> None:
        self._in_call = True
        self._buffer = buffer
        self._call_prefix, self._held_ws = self._held_ws, ""
        self._scanner = None
        self._sequence_num_calls = 0
        opener_len = len(self._opener) if buffer.startswith(self._opener) else 0
        self._scan_idx = opener_len
        if self.format == "llama3_json":  # the sequence loop starts after the opener
            self._call_prefix += buffer[:opener_len]
            self._buffer = buffer[opener_len:]
            self._scan_idx = 0

    def _close_call(self, calls: list[ToolCall], rest: str, events: list[ToolParserEvent]) -> None:
        for call in calls:
            events.append(ToolCallDone(self._num_calls, call))
            self._num_calls += 1
        self._in_call = False
        self._buffer = rest
        self._call_prefix = ""
        self._skip_ws = True

    def _reject_call(self, raw: str, rest: str, events: list[ToolParserEvent]) -> None:
        """A malformed call: its text (with the whitespace before it) is plain text."""
        self._in_call = False
        prefix, self._call_prefix = self._call_prefix, ""
        self._emit_text(prefix + raw, events)
        self._buffer = rest

    # ------------------------------------------------------------------ call mode

    def _advance_call(self, final: bool, events: list[ToolParserEvent]) -> bool:
        """Progress the open call; False when it needs more input."""
        if self.format == "hermes":
            return self._advance_hermes(final, events)
        if self.format == "mistral":
            return self._advance_mistral(final, events)
        return self._advance_llama3(final, events)

    def _advance_hermes(self, final: bool, events: list[ToolParserEvent]) -> bool:
        # The first closing tag whose body is a valid call ends the call: a "</tool_call>"
        # inside a JSON string (small models write one into code) does not end it early.
        buffer = self._buffer
        close_idx = buffer.find(HERMES_CLOSE, self._scan_idx)
        while close_idx >= 0:
            call = tool_call_from_json(parse_json(buffer[len(HERMES_OPEN) : close_idx].strip()))
            if call is not None:
                self._close_call([call], buffer[close_idx + len(HERMES_CLOSE) :], events)
                return True
            close_idx = buffer.find(HERMES_CLOSE, close_idx + 1)
        if not final:
            self._scan_idx = max(len(HERMES_OPEN), len(buffer) - len(HERMES_CLOSE) + 1)
            return False
        call = tool_call_from_json(parse_json(buffer[len(HERMES_OPEN) :].strip()))
        if call is None:
            self._reject_call(buffer, "", events)
        else:
            self._close_call([call], "", events)
        return False

    def _advance_mistral(self, final: bool, events: list[ToolParserEvent]) -> bool:
        buffer = self._buffer
        if self._scanner is None:
            body = buffer[len(MISTRAL_OPEN) :]
            stripped = body.lstrip()
            if not stripped:
                if final:
                    self._reject_call(buffer, "", events)
                return False
            payload_idx = len(buffer) - len(stripped)
            self._mistral_name = None
            if stripped[0] != "[":
                start = self._mistral_named_payload(stripped, final)
                if start is None:  # not a call: the marker is text, the rest is read again
                    self._reject_call(MISTRAL_OPEN, body, events)
                    return True
                if start < 0:  # the name or what follows it is still arriving
                    if final:
                        self._reject_call(buffer, "", events)
                    return False
                payload_idx += start
            self._scanner = JsonExtentScanner()
            self._array_idx = payload_idx
            self._scan_idx = payload_idx
        length = self._scanner.feed(buffer[self._scan_idx :])
        if length is None:
            self._scan_idx = len(buffer)
            if final:
                self._reject_call(buffer, "", events)
            return False
        end_idx = self._scan_idx + length
        payload = parse_json(buffer[self._array_idx : end_idx])
        if self._mistral_name is not None:
            named = {"name": self._mistral_name, "arguments": payload}
            calls = [tool_call_from_json(named) if isinstance(payload, dict) else None]
        elif isinstance(payload, list):
            calls = [tool_call_from_json(item) for item in payload]
        else:
            calls = []
        valid_calls = [call for call in calls if call is not None]
        if valid_calls and len(valid_calls) == len(calls):
            self._close_call(valid_calls, buffer[end_idx:], events)
        else:
            self._reject_call(buffer[:end_idx], buffer[end_idx:], events)
        return True

    def _mistral_named_payload(self, text: str, final: bool) -> int | None:
        """``text`` follows the marker and does not start with ``[``: for ``name[ARGS]{``, the
        index of the ``{`` (and the name is kept); -1 while undecided; None if not a call."""
        args_idx = text.find(MISTRAL_ARGS)
        if args_idx < 0:
            if final:
                return None
            name = text[: len(text) - partial_opener_len(text, MISTRAL_ARGS)]
            return -1 if set(name) <= TOOL_NAME_CHARS else None
        name = text[:args_idx]
        if not name or not set(name) <= TOOL_NAME_CHARS:
            return None
        arguments = text[args_idx + len(MISTRAL_ARGS) :]
        first = arguments.lstrip()
        if not first:
            return None if final else -1
        if first[0] != "{":
            return None
        self._mistral_name = name
        return args_idx + len(MISTRAL_ARGS) + len(arguments) - len(first)

    def _advance_llama3(self, final: bool, events: list[ToolParserEvent]) -> bool:
        """One step of the object sequence; the buffer starts after the opener/last call."""
        buffer = self._buffer
        if self._scanner is None:
            body = buffer.lstrip(LLAMA3_SEPARATORS)
            separators = buffer[: len(buffer) - len(body)]
            if not body:
                if final:
                    self._end_llama3_sequence(events)
                return False
            if not self._sequence_num_calls:  # separators after a valid call are dropped
                self._call_prefix += separators
            if body[0] != "{":
                self._buffer = body
                self._end_llama3_sequence(events)
                return True
            self._buffer = buffer = body
            self._scanner = JsonExtentScanner()
            self._scan_idx = 0
        length = self._scanner.feed(buffer[self._scan_idx :])
        if length is None:
            self._scan_idx = len(buffer)
            if final:
                self._scanner = None
                self._reject_call(buffer, "", events)
            return False
        end_idx = self._scan_idx + length
        self._scanner = None
        call = tool_call_from_json(parse_json(buffer[:end_idx]))
        if call is None:
            self._reject_call(buffer[:end_idx], buffer[end_idx:], events)
            return True
        events.append(ToolCallDone(self._num_calls, call))
        self._num_calls += 1
        self._sequence_num_calls += 1
        self._call_prefix = ""  # separators between calls are dropped
        self._buffer = buffer[end_idx:]
        return True

    def _end_llama3_sequence(self, events: list[ToolParserEvent]) -> None:
        """The sequence met text: with calls it closes, without any it was plain text."""
        rest, self._buffer = self._buffer, ""
        if self._sequence_num_calls:
            self._close_call([], rest, events)
        else:
            self._reject_call("", rest, events)
