"""Non-streaming tool-call parsing: a whole model output into text and tool calls.

Same formats and contract as ``tools/streaming_parser.py`` (it is that parser fed the whole
text at once): malformed calls stay in the text, whitespace around valid calls is dropped,
nothing raises on model output.
"""

from __future__ import annotations

from typing import NamedTuple

from tools.streaming_parser import StreamingToolParser
from tools.tool_call import TextDelta, ToolCall, ToolCallDone, ToolCallFormat


class ParsedOutput(NamedTuple):
    text: str  # everything that is not a valid tool call
    tool_calls: list[ToolCall]


def parse_tool_calls(text: str, format: ToolCallFormat) -> ParsedOutput:
    parser = StreamingToolParser(format)
    events = parser.feed(text) + parser.finish()
    plain = "".join(event.text for event in events if isinstance(event, TextDelta))
    calls = [event.call for event in events if isinstance(event, ToolCallDone)]
    return ParsedOutput(plain, calls)


def parse_hermes(text: str) -> ParsedOutput:
    """``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` (any number)."""
    return parse_tool_calls(text, "hermes")


def parse_llama3_json(text: str) -> ParsedOutput:
    """``{"name": ..., "parameters": {...}}`` objects, optionally after ``<|python_tag|>``."""
    return parse_tool_calls(text, "llama3_json")


def parse_mistral(text: str) -> ParsedOutput:
    """``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]``."""
    return parse_tool_calls(text, "mistral")
