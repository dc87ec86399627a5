"""Response pipeline events rendered as the Responses API's streaming events (the same over
WebSocket frames and HTTP server-sent events): output items announced with
``response.output_item.added`` / ``response.content_part.added``, text deltas, function-call
arguments, then the ``.done`` events of each part and item."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from api.response_pipeline import ResponseEvent, TextDelta, ToolCallDone
from api.responses_items import function_call_item, message_item, new_id
from tools.tool_call import ToolCall

Send = Callable[[dict[str, Any]], Awaitable[None]]


class ResponsesEmitter:
    """The output items of one response; ``send`` receives each streaming event."""

    def __init__(self, send: Send) -> None:
        self.send = send
        self.output: list[dict[str, Any]] = []
        self.message_id: str | None = None
        self.message_text = ""

    async def render(self, event: ResponseEvent) -> None:
        """Emit the streaming events of one pipeline event (``Finished`` closes the message)."""
        if isinstance(event, TextDelta):
            if event.text:
                await self.text(event.text)
        elif isinstance(event, ToolCallDone):
            await self.function_call(event.call)
        else:
            await self.close_message()

    async def text(self, delta: str) -> None:
        send = self.send
        index = len(self.output)
        if self.message_id is None:
            self.message_id = new_id("msg")
            await send(
                {
                    "type": "response.output_item.added",
                    "output_index": index,
                    "item": message_item(self.message_id, "", "in_progress"),
                }
            )
            await send(
                {
                    "type": "response.content_part.added",
                    "item_id": self.message_id,
                    "output_index": index,
                    "content_index": 0,
                    "part": {"type": "output_text", "text": "", "annotations": []},
                }
            )
        self.message_text += delta
        await send(
            {
                "type": "response.output_text.delta",
                "item_id": self.message_id,
                "output_index": index,
                "content_index": 0,
                "delta": delta,
                "logprobs": [],
            }
        )

    async def close_message(self) -> None:
        if self.message_id is None:
            return
        send, index, text = self.send, len(self.output), self.message_text
        part = {"type": "output_text", "text": text, "annotations": []}
        await send(
            {
                "type": "response.output_text.done",
                "item_id": self.message_id,
                "output_index": index,
                "content_index": 0,
                "text": text,
                "logprobs": [],
            }
        )
        await send(
            {
                "type": "response.content_part.done",
                "item_id": self.message_id,
                "output_index": index,
                "content_index": 0,
                "part": part,
            }
        )
        item = message_item(self.message_id, text, "completed")
        await send({"type": "response.output_item.done", "output_index": index, "item": item})
        self.output.append(item)
        self.message_id, self.message_text = None, ""

    async def function_call(self, call: ToolCall) -> None:
        await self.close_message()
        send, index, item_id = self.send, len(self.output), new_id("fc")
        await send(
            {
                "type": "response.output_item.added",
                "output_index": index,
                "item": function_call_item(item_id, call.call_id, call.name, "", "in_progress"),
            }
        )
        await send(
            {
                "type": "response.function_call_arguments.delta",
                "item_id": item_id,
                "output_index": index,
                "delta": call.arguments_json,
            }
        )
        await send(
            {
                "type": "response.function_call_arguments.done",
                "item_id": item_id,
                "output_index": index,
                "name": call.name,
                "arguments": call.arguments_json,
            }
        )
        item = function_call_item(
            item_id, call.call_id, call.name, call.arguments_json, "completed"
        )
        await send({"type": "response.output_item.done", "output_index": index, "item": item})
        self.output.append(item)
