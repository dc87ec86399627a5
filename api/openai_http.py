"""OpenAI-compatible HTTP endpoints: /v1/chat/completions, /v1/models (and the helpers
/v1/completions shares, see ``api.completions_http``)."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from api.chat_choices import signal_first_output, start_choices
from api.disconnect import StreamingUntilDisconnect, aclose_quietly, run_until_disconnect
from api.errors import APIError, session_moved, to_api_error
from api.json_input import check_storable, parse_json
from api.openai_params import MAX_CHOICES, num_choices, sampling_from_openai
from api.response_format import response_format_processors
from api.response_pipeline import (
    Finished,
    ResponseEvent,
    TextDelta,
    ToolCallDone,
    Usage,
    response_events,
)
from api.state import ServerState
from api.tool_runtime import normalize_tools
from engine.errors import InvalidRequestError
from engine.outputs import RequestOutput, TokenLogprob
from engine.sampling_params import SamplingParams
from sessions.errors import SessionError, SessionMovedError
from tools.tool_call import ToolCall


async def read_json(request: Request, max_bytes: int) -> dict[str, Any]:
    raw = await request.body()  # bounded while it streams in (api.body_limit)
    if len(raw) > max_bytes:
        raise APIError(f"request body over {max_bytes} bytes", code="request_too_large", status=413)
    try:
        body = parse_json(raw)
    except ValueError as exc:
        raise APIError(f"malformed JSON: {exc}") from exc
    try:
        check_storable(body)  # no lone surrogate nor 65-bit integer goes further
    except ValueError as exc:
        raise APIError(str(exc)) from exc
    if not isinstance(body, dict):
        raise APIError("the request body must be a JSON object")
    return body


def chat_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    """Validated chat messages with string content (text parts joined); assistant
    ``tool_calls`` and tool ``tool_call_id`` / ``name`` are kept."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError("messages must be a non-empty list", param="messages")
    result = []
    for message in messages:
        if not isinstance(message, dict) or message.get("role") not in (
            "system",
            "developer",
            "user",
            "assistant",
            "tool",
        ):
            raise APIError(
                "each message needs a role: system, user, assistant or tool", param="messages"
            )
        content = message.get("content") or ""
        if isinstance(content, list):
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        if not isinstance(content, str):
            raise APIError(
                "message content must be a string or a list of text parts", param="messages"
            )
        calls = message.get("tool_calls")
        if calls is not None and not (
            isinstance(calls, list) and all(isinstance(call, dict) for call in calls)
        ):
            raise APIError("tool_calls must be a list of objects", param="messages")
        for name in ("tool_call_id", "name"):
            if message.get(name) is not None and not isinstance(message[name], str):
                raise APIError(f"{name} must be a string", param="messages")
        role = "system" if message["role"] == "developer" else message["role"]
        kept = {k: message[k] for k in ("tool_calls", "tool_call_id", "name") if message.get(k)}
        result.append({"role": role, "content": content, **kept})
    return result


SESSION_HEADER = "x-tarry-session-id"
T = TypeVar("T")


class Completion:
    """Accumulates engine deltas of one request into OpenAI-shaped results."""

    def __init__(self, model: str, kind: str) -> None:
        self.id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{secrets.token_hex(12)}"
        self.created = int(time.time())
        self.model = model
        self.kind = kind
        self.text = ""
        self.finish_reason: str | None = None
        self.logprobs: list[TokenLogprob] = []
        self.tool_calls: list[ToolCall] = []
        self.last: RequestOutput | None = None

    def add(self, out: RequestOutput) -> None:
        self.text += out.new_text
        self.logprobs += out.logprobs or []
        self.last = out
        if out.finished:
            self.finish_reason = "length" if out.finish_reason == "length" else "stop"

    def message(self) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": self.text or None}
        if self.tool_calls:
            message["tool_calls"] = [openai_tool_call(call) for call in self.tool_calls]
        else:
            message["content"] = self.text
        return message

    def usage(self) -> dict[str, Any]:
        out = self.last
        prompt = out.num_prompt_tokens if out else 0
        completion = out.num_output_tokens if out else 0
        cached = out.num_cached_tokens if out else 0
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
        }


def openai_tool_call(call: ToolCall, index: int | None = None) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "id": call.call_id,
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments_json},
    }
    if index is not None:
        entry["index"] = index
    return entry


def _chat_logprobs(tokenizer: Any, entries: list[TokenLogprob]) -> dict[str, Any]:
    def item(token_id: int, logprob: float) -> dict[str, Any]:
        text = tokenizer.decode([token_id])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {
        "content": [
            {**item(e.token_id, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]}
            for e in entries
        ]
    }


async def _generate(
    state: ServerState, source: AsyncIterator[RequestOutput], endpoint: str
) -> AsyncIterator[RequestOutput]:
    """Pass ``source`` through, mapping request errors to APIError (metrics are recorded
    by the engine's observer, ``api.metrics.MetricsObserver``)."""
    try:
        async for out in source:
            yield out
    except (InvalidRequestError, SessionError) as exc:
        error = to_api_error(exc)
        assert error is not None  # every SessionError / InvalidRequestError maps
        raise error from exc
    finally:
        await aclose_quietly(source)


async def _first_then_rest(stream: AsyncIterator[T]) -> tuple[T | None, AsyncIterator[T]]:
    """Pull the first output so that request errors surface before a 200 is sent."""
    try:
        first = await stream.__anext__()
    except StopAsyncIteration:
        return None, stream
    return first, stream


class ChatCompletion(Completion):
    """A chat completion accumulated from response pipeline events."""

    def __init__(self, model: str) -> None:
        super().__init__(model, "chat")
        self.pipeline_usage = Usage()

    def add_event(self, event: ResponseEvent) -> None:
        if isinstance(event, TextDelta):
            self.text += event.text
            self.logprobs += event.logprobs
        elif isinstance(event, ToolCallDone):
            self.tool_calls.append(event.call)
        elif isinstance(event, Finished):
            self.finish_reason = event.finish_reason
            self.pipeline_usage = event.usage

    @classmethod
    def choices(cls, model: str, n: int) -> list[ChatCompletion]:
        """``n`` accumulators sharing one completion id and creation time."""
        completions = [cls(model) for _ in range(n)]
        for completion in completions[1:]:
            completion.id, completion.created = completions[0].id, completions[0].created
        return completions


async def chat_completions(request: Request) -> Response:
    """Chat completions: the shared response pipeline (one round, the client runs every
    tool), rendered as a ``chat.completion`` or its chunks; ``n`` choices share the
    prompt's KV (``api.chat_choices``)."""
    state: ServerState = request.app.state.tarry
    owner = state.owner_for(request.headers.get("authorization"))
    body = await read_json(request, state.limits.max_frame_bytes)
    state.check_model(body.get("model"))
    n = num_choices(body)
    if n > MAX_CHOICES:
        raise APIError(f"n may be at most {MAX_CHOICES}", param="n")
    params = sampling_from_openai(
        {**body, "n": None}, state.limits.max_output_tokens, state.sampling_defaults
    )
    tools = normalize_tools(body.get("tools"))
    tool_choice = body.get("tool_choice", "auto")

    def choice_params(index: int) -> SamplingParams:
        """Choice ``index``'s parameters, with logits processors of its own (they keep state)."""
        choice = params.for_sequence(index)
        choice.logits_processors = state.tools.processors(tools, tool_choice, params.max_tokens)
        choice.logits_processors += response_format_processors(
            state.tools, body.get("response_format"), tools, tool_choice, params.max_tokens
        )
        return choice

    first_params = choice_params(0)  # checks tool_choice and response_format (400s)
    engine = state.async_engine.engine
    include_usage = _include_usage(body.get("stream_options"))
    messages = chat_messages(body)
    parse = bool(tools) and tool_choice != "none"
    session_id = request.headers.get(SESSION_HEADER)
    if session_id:
        if n > 1:
            raise APIError("n > 1 cannot continue a session (it keeps one reply)", param="n")
        try:
            first_source = await _session_source(
                state, owner, session_id, messages, tools, first_params, parse
            )
        except SessionMovedError as exc:
            raise session_moved(exc, request) from exc
    else:
        try:
            prompt = await state.sessions.prompt_for(messages, tools or None)
        except SessionError as exc:
            raise APIError(str(exc), code=exc.code, param="messages") from exc
        first_source = state.async_engine.generate(prompt, first_params, cache_salt=owner)
    prefilled = asyncio.Event()

    def open_choice(index: int) -> AsyncIterator[ResponseEvent]:
        source = (
            signal_first_output(first_source, prefilled)
            if index == 0
            else state.async_engine.generate(prompt, choice_params(index), cache_salt=owner)
        )
        return response_events(
            lambda _tool_choice: _generate(state, source, "chat"),
            lambda _tool_choice: state.tools.parser() if parse else None,
            tool_choice,
        )

    events = await run_until_disconnect(
        request.receive, start_choices(open_choice, n, prefilled), state.stopping
    )
    if events is None:
        return _not_completed(state)
    completions = ChatCompletion.choices(state.model_name, n)
    if body.get("stream"):
        return StreamingUntilDisconnect(
            _chat_sse(completions, events, include_usage, engine.tokenizer, params),
            media_type="text/event-stream",
            stop=state.stopping,
        )

    async def collect() -> Response:
        try:
            async for index, event in events:
                completions[index].add_event(event)
        finally:
            await aclose_quietly(events)
        choices = []
        for index, completion in enumerate(completions):
            choice: dict[str, Any] = {
                "index": index,
                "message": completion.message(),
                "finish_reason": completion.finish_reason,
                "logprobs": None,
            }
            if params.logprobs is not None:
                choice["logprobs"] = _chat_logprobs(engine.tokenizer, completion.logprobs)
            choices.append(choice)
        head = completions[0]
        return JSONResponse(
            {
                "id": head.id,
                "object": "chat.completion",
                "created": head.created,
                "model": state.model_name,
                "choices": choices,
                "usage": _chat_usage(completions),
            }
        )

    result = await run_until_disconnect(request.receive, collect(), state.stopping)
    return result or _not_completed(state)


def _chat_usage(completions: list[ChatCompletion]) -> dict[str, Any]:
    """Usage of all choices: the prompt counted once (choice 0's cached tokens), the
    completion tokens summed."""
    head = completions[0].pipeline_usage
    completion_tokens = sum(c.pipeline_usage.completion_tokens for c in completions)
    return {
        "prompt_tokens": head.prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": head.prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": head.cached_tokens},
    }


def _not_completed(state: ServerState) -> Response:
    """What a handler returns when its request was stopped before it completed: a 503 when
    the server is shutting down, else nothing anyone reads (the client disconnected)."""
    if state.stopping.is_set():
        error = APIError("the server is shutting down", code="server_shutting_down", status=503)
        return JSONResponse(error.body(), status_code=503)
    return Response(status_code=499)


def _include_usage(stream_options: Any) -> bool:
    if stream_options is None:
        return False
    if not isinstance(stream_options, dict):
        raise APIError("stream_options must be an object", param="stream_options")
    return bool(stream_options.get("include_usage"))


async def _session_source(
    state: ServerState,
    owner: str,
    session_id: str,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]],
    params: SamplingParams,
    waiting_for_tool: bool,
) -> AsyncIterator[RequestOutput]:
    """Generation bound to a session: ``messages`` are the NEW messages, appended to the
    session's history (which the server keeps, with its KV); the reply is recorded too."""
    try:
        session = await state.sessions.resume(session_id, owner)
        if tools:
            state.sessions.update(session, tools=tools)
        await state.sessions.add_items(session, messages)
    except SessionMovedError:
        raise  # the caller answers 307 to the owner
    except SessionError as exc:
        raise to_api_error(exc) or exc from exc
    return state.sessions.generate(session, params, waiting_for_tool=waiting_for_tool)


async def _chat_sse(
    completions: list[ChatCompletion],
    events: AsyncIterator[tuple[int, ResponseEvent]],
    include_usage: bool,
    tokenizer: Any,
    params: SamplingParams,
) -> AsyncIterator[str]:
    """``chat.completion.chunk`` events: each choice's role first, then every choice's
    deltas as they arrive (tagged with its ``index``), then the usage chunk if asked."""
    head = completions[0]

    def chunk(index: int, delta: dict[str, Any], finish: str | None, logprobs: Any = None) -> str:
        payload = {
            "id": head.id,
            "object": "chat.completion.chunk",
            "created": head.created,
            "model": head.model,
            "choices": [
                {"index": index, "delta": delta, "finish_reason": finish, "logprobs": logprobs}
            ],
        }
        if include_usage:
            payload["usage"] = None
        return f"data: {json.dumps(payload)}\n\n"

    for index in range(len(completions)):
        yield chunk(index, {"role": "assistant", "content": ""}, None)
    try:
        async for index, event in events:
            completions[index].add_event(event)
            if isinstance(event, TextDelta):
                logprobs = None
                if params.logprobs is not None and event.logprobs:
                    logprobs = _chat_logprobs(tokenizer, event.logprobs)
                yield chunk(index, {"content": event.text}, None, logprobs)
            elif isinstance(event, ToolCallDone):
                call = openai_tool_call(event.call, event.index)
                yield chunk(index, {"tool_calls": [call]}, None)
            elif isinstance(event, Finished):
                yield chunk(index, {}, event.finish_reason)
    finally:
        await aclose_quietly(events)  # aborts the engine requests if the client left
    if include_usage:
        usage = {
            "id": head.id,
            "object": "chat.completion.chunk",
            "created": head.created,
            "model": head.model,
            "choices": [],
            "usage": _chat_usage(completions),
        }
        yield f"data: {json.dumps(usage)}\n\n"
    yield "data: [DONE]\n\n"


async def _chain(head: list[T], rest: AsyncIterator[T]) -> AsyncIterator[T]:
    try:
        for out in head:
            yield out
        async for out in rest:
            yield out
    finally:
        await aclose_quietly(rest)


def _model_card(state: ServerState, model_id: str) -> dict[str, Any]:
    return {
        "id": model_id,
        "object": "model",
        "created": 0,
        "owned_by": "tarry",
        "root": state.async_engine.engine.loaded.name,
        "max_model_len": state.async_engine.engine.max_model_len,
    }


async def models(request: Request) -> Response:
    state: ServerState = request.app.state.tarry
    state.owner_for(request.headers.get("authorization"))
    served = state.served_model_names or (state.model_name,)
    return JSONResponse({"object": "list", "data": [_model_card(state, m) for m in served]})


async def model(request: Request) -> Response:
    """``GET /v1/models/{model_id}``: the card of a served id (or alias), else 404."""
    state: ServerState = request.app.state.tarry
    state.owner_for(request.headers.get("authorization"))
    model_id = request.path_params["model_id"]
    state.check_model(model_id)
    return JSONResponse(_model_card(state, model_id))
