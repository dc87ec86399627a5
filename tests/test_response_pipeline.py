"""The shared response pipeline on scripted engine outputs (no model): text and tool calls
are separated, finish reasons and usage come from the last round, and server tool rounds
continue the response with ``tool_choice`` reset to "auto"."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from api.response_pipeline import (
    Finished,
    ResponseEvent,
    ServerToolOutput,
    TextDelta,
    ToolCallDone,
    response_events,
)
from engine.outputs import RequestOutput
from tools.streaming_parser import StreamingToolParser
from tools.tool_call import ToolCall

PYTHON_CALL = '<tool_call>\n{"name": "python", "arguments": {"code": "1+1"}}\n</tool_call>'
CLIENT_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def _outputs(pieces: list[str], finish_reason: str = "stop") -> list[RequestOutput]:
    return [
        RequestOutput(
            request_id="r",
            new_token_ids=[i],
            new_text=piece,
            finished=i == len(pieces) - 1,
            finish_reason=finish_reason if i == len(pieces) - 1 else None,
            num_prompt_tokens=10,
            num_cached_tokens=4,
            num_output_tokens=i + 1,
        )
        for i, piece in enumerate(pieces)
    ]


def _run(
    rounds: list[list[RequestOutput]], parse: bool = True, server_tools: bool = False
) -> tuple[list[ResponseEvent], list[Any], list[str]]:
    choices: list[Any] = []
    ran: list[str] = []

    async def generate_round(tool_choice: Any) -> AsyncIterator[RequestOutput]:
        choices.append(tool_choice)
        for out in rounds[len(choices) - 1]:
            yield out

    async def run_tool(call: ToolCall) -> str:
        ran.append(call.name)
        return "2"

    async def collect() -> list[ResponseEvent]:
        events = response_events(
            generate_round,
            lambda _choice: StreamingToolParser("hermes") if parse else None,
            "required",
            run_tool if server_tools else None,
        )
        return [event async for event in events]

    return asyncio.run(collect()), choices, ran


def test_text_then_stop_with_usage_of_the_last_output():
    events, _, _ = _run([_outputs(["The capital", " is Paris."])], parse=False)
    assert [e.text for e in events if isinstance(e, TextDelta)] == ["The capital", " is Paris."]
    final = events[-1]
    assert isinstance(final, Finished) and final.finish_reason == "stop"
    assert (final.usage.prompt_tokens, final.usage.completion_tokens) == (10, 2)
    assert final.usage.cached_tokens == 4


def test_length_and_client_tool_calls():
    events, _, _ = _run([_outputs(["a", "b"], finish_reason="length")])
    assert isinstance(events[-1], Finished) and events[-1].finish_reason == "length"
    events, choices, ran = _run([_outputs(["Sure. ", CLIENT_CALL])], server_tools=True)
    calls = [e for e in events if isinstance(e, ToolCallDone)]
    assert [c.call.name for c in calls] == ["get_weather"] and calls[0].index == 0
    assert "<tool_call>" not in "".join(e.text for e in events if isinstance(e, TextDelta))
    assert isinstance(events[-1], Finished) and events[-1].finish_reason == "tool_calls"
    assert choices == ["required"] and ran == []  # a client tool is never run here


def test_server_tool_rounds_continue_with_auto():
    events, choices, ran = _run(
        [_outputs([PYTHON_CALL]), _outputs(["It is ", "2."])], server_tools=True
    )
    assert choices == ["required", "auto"] and ran == ["python"]
    kinds = [type(e).__name__ for e in events]
    assert kinds == ["ToolCallDone", "ServerToolOutput", "TextDelta", "TextDelta", "Finished"]
    output = next(e for e in events if isinstance(e, ServerToolOutput))
    assert output.output == "2" and output.call.name == "python"
    assert isinstance(events[-1], Finished) and events[-1].finish_reason == "stop"
    # Without a runner (chat completions, the Responses API) the python call goes back.
    events, choices, ran = _run([_outputs([PYTHON_CALL])])
    assert choices == ["required"] and ran == []
    assert isinstance(events[-1], Finished) and events[-1].finish_reason == "tool_calls"
