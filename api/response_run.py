"""One ``response.create`` of the session protocol: the shared response pipeline
(``api.response_pipeline``) with the built-in ``python`` tool run on the server, rendered as
the protocol's events.

    response.created
      ├─ response.output_text.delta ...            (text, tool-call markup held back)
      ├─ response.function_call_arguments.done     (one per call the model made)
      ├─ response.tool_output.done                 (per python call, run on the server; the
      │                                             model then continues in the same response)
    response.done  status: completed | incomplete | requires_action | cancelled | failed
    session.state
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from api.response_pipeline import (
    Finished,
    ServerToolOutput,
    TextDelta,
    ToolCallDone,
    response_events,
)
from api.ws_protocol import error_event, error_event_of, usage_of
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from sessions.session import Session
from tools.streaming_parser import StreamingToolParser
from tools.tool_call import ToolCall

if TYPE_CHECKING:
    from api.ws_sessions import SessionConnection

logger = logging.getLogger(__name__)
STATUS_OF_FINISH = {"stop": "completed", "length": "incomplete", "tool_calls": "requires_action"}


class ResponseRun:
    def __init__(
        self,
        connection: SessionConnection,
        session: Session,
        response_id: str,
        params: SamplingParams,
        tool_choice: Any,
    ) -> None:
        self.connection = connection
        self.state = connection.state
        self.session = session
        self.response_id = response_id
        self.params = params
        self.tool_choice = tool_choice
        self.output: list[dict[str, Any]] = []
        self.status = "completed"
        self.text = ""

    async def send(self, event: dict[str, Any]) -> None:
        await self.connection.send(event)

    async def run(self, generate: bool) -> None:
        await self.send(
            {
                "type": "response.created",
                "response": {"id": self.response_id, "status": "in_progress"},
            }
        )
        try:
            await self._render(generate)
        except asyncio.CancelledError:
            self.status = "cancelled"
        except Exception as exc:  # a bug must still end the response, the session usable
            self.status = "failed"
            error = error_event_of(exc)
            if error is None:
                logger.exception("response %s failed", self.response_id)
                error = error_event("server_error", "the response failed", kind="server_error")
            await self.send(error)
        if (
            self.status == "cancelled"
            and self.connection.websocket.client_state.name != "CONNECTED"
        ):
            return
        await self.send(
            {
                "type": "response.done",
                "response": {
                    "id": self.response_id,
                    "status": self.status,
                    "output": self.output,
                    "usage": usage_of(self.session.last_usage),
                },
            }
        )
        await self.send(
            {
                "type": "session.state",
                "session_id": self.session.session_id,
                "state": self.session.state.value,
                "kv": await self.state.sessions.kv_location(self.session),
            }
        )

    async def _render(self, generate: bool) -> None:
        events = response_events(
            lambda tool_choice: self._round(tool_choice, generate),
            self._parser_for,
            self.tool_choice,
            self._run_python if generate else None,
        )
        async for event in events:
            if not generate:  # prefill only: nothing is shown
                continue
            if isinstance(event, TextDelta) and event.text:
                self.text += event.text
                await self.send(
                    {
                        "type": "response.output_text.delta",
                        "response_id": self.response_id,
                        "delta": event.text,
                    }
                )
            elif isinstance(event, ToolCallDone):
                self._close_message()
                await self._announce_call(event.call)
            elif isinstance(event, ServerToolOutput):
                await self._tool_output(event.call, event.output)
            elif isinstance(event, Finished):
                self._close_message()
                self.status = STATUS_OF_FINISH[event.finish_reason]
        if not generate:
            self.status = "completed"

    def _parser_for(self, tool_choice: Any) -> StreamingToolParser | None:
        parse = bool(self.session.tools) and tool_choice != "none"
        return self.state.tools.parser() if parse else None

    def _round(self, tool_choice: Any, generate: bool) -> AsyncIterator[RequestOutput]:
        params = dataclasses.replace(
            self.params,
            logits_processors=self.state.tools.processors(
                self.session.tools, tool_choice, self.params.max_tokens
            ),
        )
        return self.state.sessions.generate(
            self.session,
            params,
            waiting_for_tool=self._parser_for(tool_choice) is not None,
            record=generate,
        )

    async def _run_python(self, call: ToolCall) -> str:
        output = await self.state.tools.run_python(
            self.session.session_id, call.arguments_json, owner=self.session.owner
        )
        await self.state.sessions.add_items(
            self.session,
            [{"role": "tool", "content": output, "tool_call_id": call.call_id, "name": call.name}],
        )
        return output

    def _close_message(self) -> None:
        if self.text:
            self.output.append(
                {
                    "type": "message",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": self.text}],
                }
            )
            self.text = ""

    async def _tool_output(self, call: ToolCall, output: str) -> None:
        await self.send(
            {
                "type": "response.tool_output.done",
                "response_id": self.response_id,
                "call_id": call.call_id,
                "name": call.name,
                "output": output,
            }
        )
        self.output.append(
            {"type": "function_call_output", "call_id": call.call_id, "output": output}
        )

    async def _announce_call(self, call: ToolCall) -> None:
        item = {
            "type": "function_call",
            "call_id": call.call_id,
            "name": call.name,
            "arguments": call.arguments_json,
        }
        self.output.append(item)
        await self.send(
            {
                "type": "response.function_call_arguments.delta",
                "response_id": self.response_id,
                "call_id": call.call_id,
                "delta": call.arguments_json,
            }
        )
        await self.send(
            {
                "type": "response.function_call_arguments.done",
                "response_id": self.response_id,
                "call_id": call.call_id,
                "name": call.name,
                "arguments": call.arguments_json,
            }
        )
