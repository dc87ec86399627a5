"""One response as a stream of typed events, rendered by every surface.

Every surface (the session protocol's ``response.create``, the Responses API over WebSocket
and HTTP, chat completions) runs a response the same way::

    round ─ engine outputs ─> tool-call parser ─> TextDelta ... ToolCallDone ...
      │                                              (markup of calls is never shown as text)
      └─ all calls are server tools (``python``) and a runner is given?
            yes: run each ─> ServerToolOutput, next round (tool_choice reset to "auto")
            no:  Finished(finish_reason, usage)

and only *renders* the events: the session protocol as Realtime-style events, the Responses
API as output items, chat completions as a message or chunks. Surfaces differ in transport and
in what they may allow (only the session protocol runs server tools), not in this loop.

``finish_reason`` is ``"stop"``, ``"length"`` (the token budget ran out) or ``"tool_calls"``
(the last round made calls the client must run). Errors raised by the engine or the session
manager propagate unchanged; ``api.errors.to_api_error`` maps them for a surface.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from api.disconnect import aclose_quietly
from api.tool_runtime import PYTHON_TOOL_NAME
from engine.outputs import RequestOutput, TokenLogprob
from tools import tool_call as parsed
from tools.streaming_parser import StreamingToolParser
from tools.tool_call import ToolCall

MAX_SERVER_TOOL_ROUNDS = 8


@dataclass(slots=True)
class Usage:
    """Token counts of the last round (its prompt holds every earlier round)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    restored_tokens: int = 0

    @staticmethod
    def of(out: RequestOutput | None) -> Usage:
        if out is None:
            return Usage()
        return Usage(
            out.num_prompt_tokens,
            out.num_output_tokens,
            out.num_cached_tokens,
            out.num_restored_tokens,
        )


@dataclass(slots=True)
class TextDelta:
    """Visible text (possibly empty when only ``logprobs`` arrived) of one engine output."""

    text: str
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass(slots=True)
class ToolCallDone:
    """A complete tool call the model made (``index`` counts calls in this response)."""

    index: int
    call: ToolCall


@dataclass(slots=True)
class ServerToolOutput:
    """A server-side tool call ran; its output was added to the conversation."""

    call: ToolCall
    output: str


@dataclass(slots=True)
class Finished:
    """The last event of every response that did not raise."""

    finish_reason: str  # stop | length | tool_calls
    usage: Usage


ResponseEvent = TextDelta | ToolCallDone | ServerToolOutput | Finished
# One generation round: tool_choice in, engine outputs out (an async generator, closed on exit).
RoundSource = Callable[[Any], AsyncIterator[RequestOutput]]
# Runs a server tool call and records its output in the conversation; returns the output.
ServerToolRunner = Callable[[ToolCall], Awaitable[str]]


async def response_events(
    generate_round: RoundSource,
    parser_for: Callable[[Any], StreamingToolParser | None],
    tool_choice: Any,
    run_server_tool: ServerToolRunner | None = None,
) -> AsyncIterator[ResponseEvent]:
    """The events of one response; see the module docstring.

    ``parser_for(tool_choice)`` is the parser of a round (None: every output is text).
    ``run_server_tool`` (None: the surface runs no tools) is called for each call of a round
    whose calls all name the built-in ``python`` tool; the model then continues.
    """
    num_calls = 0
    for _ in range(MAX_SERVER_TOOL_ROUNDS):
        parser = parser_for(tool_choice)
        calls: list[ToolCall] = []
        final: RequestOutput | None = None
        outputs = generate_round(tool_choice)
        try:
            async for out in outputs:
                events: list[Any] = (
                    [parsed.TextDelta(out.new_text)]
                    if parser is None
                    else parser.feed(out.new_text)
                )
                if out.finished and parser is not None:
                    events += parser.finish()
                visible = "".join(e.text for e in events if isinstance(e, parsed.TextDelta))
                if visible or out.logprobs:
                    yield TextDelta(visible, list(out.logprobs or []))
                for event in events:
                    if isinstance(event, parsed.ToolCallDone):
                        calls.append(event.call)
                        yield ToolCallDone(num_calls, event.call)
                        num_calls += 1
                if out.finished:
                    final = out
        finally:
            await aclose_quietly(outputs)
        usage = Usage.of(final)
        if final is not None and final.finish_reason == "length" and not calls:
            yield Finished("length", usage)
            return
        if not calls:
            yield Finished("stop", usage)
            return
        if run_server_tool is None or any(c.name != PYTHON_TOOL_NAME for c in calls):
            yield Finished("tool_calls", usage)
            return
        for call in calls:
            yield ServerToolOutput(call, await run_server_tool(call))
        tool_choice = "auto"  # like the Agents SDK: do not force a call forever
    yield Finished("stop", usage)
