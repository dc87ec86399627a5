"""Test helper: a whole model output into text and tool calls, through the streaming parser
(``tools/streaming_parser.py``) fed the whole text at once, as the server does."""

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
