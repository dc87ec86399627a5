"""One ``response.create`` of the session protocol: generate, parse tool calls, run the
built-in ``python`` tool, and loop until the model answers or a client tool is needed.

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
from typing import TYPE_CHECKING, Any

from api.tool_runtime import PYTHON_TOOL_NAME
from api.ws_protocol import error_event, usage_of
from engine.errors import InvalidRequestError
from engine.sampling_params import SamplingParams
from sessions.errors import SessionError, SessionMovedError
from sessions.session import Session
from tools.tool_call import TextDelta, ToolCall, ToolCallDone

if TYPE_CHECKING:
    from api.ws_sessions import SessionConnection

MAX_SERVER_TOOL_ROUNDS = 8
logger = logging.getLogger(__name__)


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
            await self._rounds(generate)
        except asyncio.CancelledError:
            self.status = "cancelled"
        except SessionMovedError as exc:  # taken over by another instance meanwhile
            self.status = "failed"
            await self.connection.send_session_error(exc)
        except SessionError as exc:
            self.status = "failed"
            await self.connection.send_error(exc.code, str(exc))
        except InvalidRequestError as exc:
            self.status = "failed"
            await self.connection.send_error("invalid_request", str(exc))
        except Exception:  # a bug must still end the response and leave the session usable
            logger.exception("response %s failed", self.response_id)
            self.status = "failed"
            await self.connection.send(
                error_event("server_error", "the response failed", kind="server_error")
            )
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

    async def _rounds(self, generate: bool) -> None:
        tool_choice = self.tool_choice
        for _ in range(MAX_SERVER_TOOL_ROUNDS):
            calls = await self._generate_once(generate, tool_choice)
            if not calls or not generate:
                return
            if any(call.name != PYTHON_TOOL_NAME for call in calls):
                self.status = "requires_action"  # the client runs its tools, then responds
                return
            for call in calls:
                output = await self.state.tools.run_python(
                    self.session.session_id, call.arguments_json, owner=self.session.owner
                )
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
                await self.state.sessions.add_items(
                    self.session,
                    [
                        {
                            "role": "tool",
                            "content": output,
                            "tool_call_id": call.call_id,
                            "name": call.name,
                        }
                    ],
                )
            tool_choice = "auto"  # like the Agents SDK: do not force a call forever

    async def _generate_once(self, generate: bool, tool_choice: Any) -> list[ToolCall]:
        tools = self.session.tools
        parse = bool(tools) and tool_choice != "none"
        parser = self.state.tools.parser() if parse else None
        params = dataclasses.replace(
            self.params,
            logits_processors=self.state.tools.processors(
                tools, tool_choice, self.params.max_tokens
            ),
        )
        text, calls = "", []
        stream = self.state.sessions.generate(
            self.session, params, waiting_for_tool=parse, record=generate
        )
        async for out in stream:
            events: list[Any] = (
                [TextDelta(out.new_text)] if parser is None else parser.feed(out.new_text)
            )
            if out.finished and parser is not None:
                events += parser.finish()
            for event in events if generate else []:
                if isinstance(event, TextDelta) and event.text:
                    text += event.text
                    await self.send(
                        {
                            "type": "response.output_text.delta",
                            "response_id": self.response_id,
                            "delta": event.text,
                        }
                    )
                elif isinstance(event, ToolCallDone):
                    calls.append(event.call)
                    await self._announce_call(event.call)
            if out.finished and out.finish_reason == "length":
                self.status = "incomplete"
        if text:
            self.output.append(
                {
                    "type": "message",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": text}],
                }
            )
        return calls

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
