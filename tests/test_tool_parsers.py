"""Tool-call parsers: recorded outputs of each format, malformed calls, every chunk boundary."""

from __future__ import annotations

import json

import pytest

from tests.tool_parsing import parse_tool_calls
from tools.streaming_parser import StreamingToolParser
from tools.tool_call import TextDelta, ToolCallDone, ToolCallFormat, ToolParserEvent

# (format, model output as recorded, expected text, expected [(name, arguments)])
RECORDED: list[tuple[ToolCallFormat, str, str, list[tuple[str, dict]]]] = [
    (  # Qwen2.5 / Hermes-2-Pro style: text, then two calls on their own lines
        "hermes",
        "I'll look both up.\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n'
        "</tool_call>\n<tool_call>\n"
        '{"name": "get_time", "arguments": {"tz": "Europe/Paris"}}\n</tool_call>',
        "I'll look both up.",
        [
            ("get_weather", {"city": "Paris", "unit": "celsius"}),
            ("get_time", {"tz": "Europe/Paris"}),
        ],
    ),
    (  # arguments as a JSON string, braces and tags inside strings, unicode
        "hermes",
        '<tool_call>{"name": "python", "arguments": "{\\"code\\": \\"print(\'}</x>\')\\"}"}'
        "</tool_call>\nDone — résumé.",
        "Done — résumé.",
        [("python", {"code": "print('}</x>')"})],
    ),
    (  # unterminated last call (generation stopped at the closing tag)
        "hermes",
        'Checking. <tool_call>{"name": "search", "arguments": {"q": "tarry"}}',
        "Checking.",
        [("search", {"q": "tarry"})],
    ),
    (  # Llama 3.1 JSON tool call, the whole message
        "llama3_json",
        '{"name": "get_weather", "parameters": {"city": "San Francisco", "days": 3}}',
        "",
        [("get_weather", {"city": "San Francisco", "days": 3})],
    ),
    (  # Llama 3.2: python_tag, several calls separated by ';', trailing text
        "llama3_json",
        'Let me check.<|python_tag|>{"name": "a", "arguments": {"x": "{;}"}}; '
        '{"name": "b", "parameters": {}}\nOne moment.',
        "Let me check.One moment.",
        [("a", {"x": "{;}"}), ("b", {})],
    ),
    (  # Mistral: text before, an array with two calls
        "mistral",
        'Sure. [TOOL_CALLS] [{"name": "add", "arguments": {"a": 1, "b": [2, 3]}}, '
        '{"name": "now", "arguments": {}}]',
        "Sure.",
        [("add", {"a": 1, "b": [2, 3]}), ("now", {})],
    ),
    (  # Mistral: two separate markers
        "mistral",
        '[TOOL_CALLS][{"name": "a", "arguments": {"s": "]"}}]'
        '[TOOL_CALLS][{"name": "b", "arguments": {}}]',
        "",
        [("a", {"s": "]"}), ("b", {})],
    ),
    (  # Mistral, newer tokenizers: name[ARGS]{...}, one call per marker
        "mistral",
        'Checking. [TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "days": [1, 2]}'
        "[TOOL_CALLS]now[ARGS] {} Done.",
        "Checking.Done.",
        [("get_weather", {"city": "Paris", "days": [1, 2]}), ("now", {})],
    ),
]

# (format, model output): malformed calls come back as plain text, verbatim.
MALFORMED: list[tuple[ToolCallFormat, str]] = [
    ("hermes", 'a <tool_call>{"name": "f", "arguments": {oops}}</tool_call> b'),
    ("hermes", 'x <tool_call>{"arguments": {}}</tool_call>'),  # no name
    ("hermes", '<tool_call>{"name": "f", "arguments": [1]}</tool_call>'),  # not an object
    ("hermes", "Use <tool_call> tags like <tool_c"),  # unterminated, not JSON
    ("llama3_json", "{not json} and more"),
    ("llama3_json", 'Hello {"name": "f", "parameters": {}}'),  # not at start, no python_tag
    ("llama3_json", '<|python_tag|>print("hi")'),
    ("llama3_json", '{"name": "f", "parameters": {"x": 1}'),  # unterminated
    ("mistral", '[TOOL_CALLS] [{"name": "f", "arguments": {}}, {"arguments": {}}]'),
    ("mistral", "[TOOL_CALLS] not an array"),
    ("mistral", '[TOOL_CALLS][{"name": "f"'),
    ("mistral", "no calls, just [TOOL_C"),
    ("mistral", "[TOOL_CALLS]bad name[ARGS]{}"),  # a space in the name
    ("mistral", "[TOOL_CALLS]f[ARGS][1, 2] then text"),  # arguments not an object
    ("mistral", '[TOOL_CALLS]f[ARGS]{"x": 1'),  # unterminated
    ("mistral", "[TOOL_CALLS]f"),  # no [ARGS]
    ("mistral", "[TOOL_CALLS][ARGS]{}"),  # no name
]

PLAIN = "Paris is the capital of France.  \n\n<b>bold</b> [x] {y}\n"


def summarize(events: list[ToolParserEvent]) -> tuple[str, list[tuple[str, dict]]]:
    text = "".join(event.text for event in events if isinstance(event, TextDelta))
    calls = [event for event in events if isinstance(event, ToolCallDone)]
    assert [event.index for event in calls] == list(range(len(calls)))
    return text, [(event.call.name, json.loads(event.call.arguments_json)) for event in calls]


def stream(format: ToolCallFormat, chunks: list[str]) -> list[ToolParserEvent]:
    parser = StreamingToolParser(format)
    events: list[ToolParserEvent] = []
    for chunk in chunks:
        events += parser.feed(chunk)
    return events + parser.finish()


@pytest.mark.parametrize(("format", "output", "text", "calls"), RECORDED)
def test_recorded_outputs(
    format: ToolCallFormat, output: str, text: str, calls: list[tuple[str, dict]]
) -> None:
    parsed = parse_tool_calls(output, format)
    assert parsed.text == text
    assert [(call.name, json.loads(call.arguments_json)) for call in parsed.tool_calls] == calls
    call_ids = [call.call_id for call in parsed.tool_calls]
    assert len(set(call_ids)) == len(call_ids)
    assert all(call_id.startswith("call_") and len(call_id) == 29 for call_id in call_ids)


@pytest.mark.parametrize(("format", "output"), MALFORMED)
def test_malformed_calls_are_plain_text(format: ToolCallFormat, output: str) -> None:
    parsed = parse_tool_calls(output, format)
    assert parsed == (output, [])


@pytest.mark.parametrize("format", ["hermes", "llama3_json", "mistral"])
def test_plain_text_is_untouched(format: ToolCallFormat) -> None:
    assert parse_tool_calls(PLAIN, format) == (PLAIN, [])


def test_format_shortcuts() -> None:
    hermes = parse_tool_calls('<tool_call>{"name": "f"}</tool_call>', "hermes")
    assert hermes.tool_calls[0].name == "f"
    llama3 = parse_tool_calls('{"name": "g", "parameters": {}}', "llama3_json")
    assert llama3.tool_calls[0].name == "g"
    assert parse_tool_calls('[TOOL_CALLS][{"name": "h"}]', "mistral").tool_calls[0].name == "h"


ALL_CASES = [(f, o) for f, o, _, _ in RECORDED] + MALFORMED + [("hermes", PLAIN)]


@pytest.mark.parametrize(("format", "output"), ALL_CASES)
def test_every_two_chunk_split_gives_the_same_result(format: ToolCallFormat, output: str) -> None:
    expected = summarize(stream(format, [output]))
    for split_idx in range(len(output) + 1):
        chunks = [output[:split_idx], output[split_idx:]]
        assert summarize(stream(format, chunks)) == expected, chunks


@pytest.mark.parametrize(("format", "output"), ALL_CASES)
def test_every_three_chunk_split_gives_the_same_result(format: ToolCallFormat, output: str) -> None:
    expected = summarize(stream(format, [output]))
    step = max(1, len(output) // 40)  # all pairs for short outputs, a grid for long ones
    for first_idx in range(0, len(output) + 1, step):
        for second_idx in range(first_idx, len(output) + 1):
            chunks = [output[:first_idx], output[first_idx:second_idx], output[second_idx:]]
            assert summarize(stream(format, chunks)) == expected, chunks


@pytest.mark.parametrize(("format", "output"), ALL_CASES)
def test_character_by_character_stream(format: ToolCallFormat, output: str) -> None:
    assert summarize(stream(format, list(output))) == summarize(stream(format, [output]))


def test_partial_tag_is_held_back_until_decided() -> None:
    parser = StreamingToolParser("hermes")
    assert parser.feed("Hello <tool_c") == [TextDelta("Hello")]
    assert parser.feed("ar") == [TextDelta(" <tool_car")]  # clearly not a tag any more
    assert parser.feed("\n<tool_call>{") == []
    events = parser.feed('"name": "f"}</tool_call>')
    assert len(events) == 1 and isinstance(events[0], ToolCallDone)
    assert parser.finish() == []


def test_call_is_emitted_as_soon_as_it_closes() -> None:
    parser = StreamingToolParser("mistral")
    assert parser.feed('[TOOL_CALLS][{"name": "a", "arguments": {}}') == []
    events = parser.feed("] tail")
    assert isinstance(events[0], ToolCallDone) and events[0].call.name == "a"
    assert summarize(events + parser.finish())[0] == "tail"


def test_feed_after_finish_is_an_error() -> None:
    parser = StreamingToolParser("hermes")
    parser.finish()
    with pytest.raises(RuntimeError):
        parser.feed("x")
    with pytest.raises(ValueError):
        StreamingToolParser("unknown")  # type: ignore[arg-type]


def test_hermes_closing_tag_inside_a_json_string_does_not_end_the_call():

    text = (
        '<tool_call>{"name": "python", "arguments": '
        '{"code": "x = 1}}</tool_call> # y"}}</tool_call>'
    )
    parsed = parse_tool_calls(text, "hermes")
    assert parsed.text == ""
    (call,) = parsed.tool_calls
    assert call.name == "python"
    assert json.loads(call.arguments_json) == {"code": "x = 1}}</tool_call> # y"}
