"""``POST /v1/completions``: the legacy text-completions endpoint, as OpenAI and vLLM serve it.

- ``prompt``: a string, a list of token ids, a list of strings or a list of token-id lists;
  each prompt gets ``n`` choices, numbered ``prompt_idx * n + i`` (OpenAI's order).
- ``n``: served by ``AsyncEngine.generate_n`` (the prompt is computed once; choice ``i``
  samples with ``seed + i`` when a seed is given). ``best_of`` other than ``n`` is a 400.
- ``logprobs`` (an int): the legacy shape ``{tokens, token_logprobs, top_logprobs,
  text_offset}``, per chunk when streaming (``text_offset`` counts characters of the choice's
  text, the echoed prompt included).
- ``echo``: the prompt's text is prepended to each choice's text (to the first chunk when
  streaming). Prompt-token log-probabilities are not computed by the engine, so ``echo``
  with ``logprobs`` is a 400 rather than an answer with the prompt's entries missing.
- ``stream_options.include_usage``: every chunk carries ``"usage": null`` and a final chunk
  with no choices carries the usage.
- usage: prompt tokens counted once per prompt (not per choice), completion tokens summed
  over the choices, ``cached_tokens`` those of each prompt's first sequence.
- ``suffix`` is a 400 (no fill-in-the-middle).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from api.disconnect import StreamingUntilDisconnect, aclose_quietly, run_until_disconnect
from api.errors import APIError
from api.openai_http import _include_usage, _not_completed, read_json
from api.openai_params import MAX_CHOICES, num_choices, sampling_from_openai
from api.state import ServerState
from api.stream_merge import merge_streams
from engine.async_engine import EngineDeadError
from engine.errors import InvalidRequestError
from engine.outputs import RequestOutput, TokenLogprob
from sessions.errors import SessionError

Stream = AsyncIterator[tuple[int, RequestOutput]]


@dataclass
class _Prompt:
    token_ids: list[int]
    text: str  # what ``echo`` prepends


@dataclass
class _Choice:
    """One choice's accumulated text, logprobs and usage."""

    index: int
    echo: str
    text: str = ""
    tokens: list[str] = field(default_factory=list)
    token_logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[dict[str, float]] = field(default_factory=list)
    text_offset: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    last: RequestOutput | None = None
    num_outputs: int = 0
    next_offset: int = -1  # text_offset of the next token (set to len(echo) on first use)

    def add(self, out: RequestOutput, tokenizer: Any) -> tuple[str, dict[str, Any] | None]:
        """Fold ``out`` in; return its text (the echo first, for the first output) and its
        logprobs in the legacy shape (None without logprobs)."""
        text = (self.echo if self.num_outputs == 0 else "") + out.new_text
        self.num_outputs += 1
        start = len(self.tokens)
        if self.next_offset < 0:
            self.next_offset = len(self.echo)
        for entry in out.logprobs or []:
            self._add_logprob(entry, tokenizer, self.next_offset)
            self.next_offset += len(self.tokens[-1])
        self.text += text
        self.last = out
        if out.finished:
            self.finish_reason = "length" if out.finish_reason == "length" else "stop"
        if out.logprobs is None:
            return text, None
        return text, self.logprobs(start)

    def _add_logprob(self, entry: TokenLogprob, tokenizer: Any, offset: int) -> None:
        token = tokenizer.decode([entry.token_id])
        top = {tokenizer.decode([token_id]): logprob for token_id, logprob in entry.top}
        top.setdefault(token, entry.logprob)  # the sampled token is always listed (vLLM)
        self.tokens.append(token)
        self.token_logprobs.append(entry.logprob)
        self.top_logprobs.append(top)
        self.text_offset.append(offset)

    def logprobs(self, start: int = 0) -> dict[str, Any]:
        return {
            "tokens": self.tokens[start:],
            "token_logprobs": self.token_logprobs[start:],
            "top_logprobs": self.top_logprobs[start:],
            "text_offset": self.text_offset[start:],
        }


class _Result:
    """The choices of one request and the OpenAI objects built from them."""

    def __init__(self, model: str, prompts: list[_Prompt], n: int, echo: bool) -> None:
        self.id = f"cmpl-{secrets.token_hex(12)}"
        self.created = int(time.time())
        self.model = model
        self.n = n
        self.choices = [
            _Choice(prompt_idx * n + i, prompt.text if echo else "")
            for prompt_idx, prompt in enumerate(prompts)
            for i in range(n)
        ]

    def envelope(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def usage(self) -> dict[str, Any]:
        firsts = [c.last for c in self.choices[:: self.n] if c.last is not None]
        prompt = sum(out.num_prompt_tokens for out in firsts)
        completion = sum(c.last.num_output_tokens for c in self.choices if c.last is not None)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(o.num_cached_tokens for o in firsts)},
        }


async def completions(request: Request) -> Response:
    state: ServerState = request.app.state.tarry
    owner = state.owner_for(request.headers.get("authorization"))
    body = await read_json(request, state.limits.max_frame_bytes)
    state.check_model(body.get("model"))
    n = num_choices(body)
    echo = _flag(body, "echo")
    if body.get("suffix") is not None:
        raise APIError("suffix is not supported", param="suffix")
    include_usage = _include_usage(body.get("stream_options"))
    params = sampling_from_openai(
        {**body, "n": None}, state.limits.max_output_tokens, state.sampling_defaults
    )
    if echo and params.logprobs is not None:
        raise APIError(
            "echo with logprobs is not supported: prompt-token log-probabilities are not computed",
            param="echo",
        )
    prompts = await _prompts(state, body.get("prompt"), echo)
    if len(prompts) * n > MAX_CHOICES:
        raise APIError(f"at most {MAX_CHOICES} choices (prompts times n) per request", param="n")
    streams = [
        state.async_engine.generate_n(p.token_ids, params, n, cache_salt=owner) for p in prompts
    ]
    started = await run_until_disconnect(request.receive, _start_all(streams), state.stopping)
    if started is None:
        return _not_completed(state)
    result = _Result(state.model_name, prompts, n, echo)
    outputs = merge_streams(started)
    tokenizer = state.async_engine.engine.tokenizer
    if body.get("stream"):
        sse = _sse(result, outputs, tokenizer, include_usage)
        return StreamingUntilDisconnect(sse, "text/event-stream", state.stopping)

    async def collect() -> Response:
        try:
            async for prompt_idx, (seq_idx, out) in outputs:
                result.choices[prompt_idx * n + seq_idx].add(out, tokenizer)
        finally:
            await aclose_quietly(outputs)
        choices = [
            {
                "index": c.index,
                "text": c.text,
                "logprobs": c.logprobs() if params.logprobs is not None else None,
                "finish_reason": c.finish_reason,
            }
            for c in result.choices
        ]
        return JSONResponse({**result.envelope(choices), "usage": result.usage()})

    response = await run_until_disconnect(request.receive, collect(), state.stopping)
    return response or _not_completed(state)


async def _sse(
    result: _Result,
    outputs: AsyncIterator[tuple[int, tuple[int, RequestOutput]]],
    tokenizer: Any,
    include_usage: bool,
) -> AsyncIterator[str]:
    try:
        async for prompt_idx, (seq_idx, out) in outputs:
            choice = result.choices[prompt_idx * result.n + seq_idx]
            text, logprobs = choice.add(out, tokenizer)
            entry = {
                "index": choice.index,
                "text": text,
                "logprobs": logprobs,
                "finish_reason": choice.finish_reason,
            }
            chunk = result.envelope([entry])
            if include_usage:
                chunk["usage"] = None
            yield f"data: {json.dumps(chunk)}\n\n"
    finally:
        await aclose_quietly(outputs)  # aborts the engine requests if the client left
    if include_usage:
        yield f"data: {json.dumps({**result.envelope([]), 'usage': result.usage()})}\n\n"
    yield "data: [DONE]\n\n"


async def _start_all(streams: list[Stream]) -> list[Stream]:
    """Pull every stream's first output (so that a request error is a 4xx before a 200 is
    sent); the streams with their first output put back. Closes them all on an error."""
    firsts = await asyncio.gather(*(_first(s) for s in streams), return_exceptions=True)
    errors = [f for f in firsts if isinstance(f, BaseException)]
    if errors:
        for stream in streams:
            await aclose_quietly(stream)
        raise _api_error(errors[0])
    return [
        _chain(first, stream)
        for first, stream in zip(firsts, streams, strict=True)
        if not isinstance(first, BaseException)
    ]


async def _first(stream: Stream) -> tuple[int, RequestOutput] | None:
    try:
        return await stream.__anext__()
    except StopAsyncIteration:
        return None


async def _chain(first: tuple[int, RequestOutput] | None, rest: Stream) -> Stream:
    try:
        if first is not None:
            yield first
        async for item in rest:
            yield item
    finally:
        await aclose_quietly(rest)


def _api_error(exc: BaseException) -> BaseException:
    if isinstance(exc, InvalidRequestError):
        return APIError(str(exc), param="prompt")
    if isinstance(exc, EngineDeadError):
        return APIError("the server is shutting down", code="server_shutting_down", status=503)
    return exc


def _flag(body: dict[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise APIError(f"{name} must be a boolean", param=name)
    return value


async def _prompts(state: ServerState, field_value: Any, echo: bool) -> list[_Prompt]:
    """The request's prompts: a string, token ids, or a non-empty list of either."""
    if isinstance(field_value, str) or _is_token_ids(field_value):
        items = [field_value]
    elif (
        isinstance(field_value, list)
        and field_value
        and all(isinstance(item, str) or _is_token_ids(item) for item in field_value)
    ):
        items = field_value
    else:
        raise APIError(
            "prompt must be a string, a list of token ids, or a non-empty list of either",
            param="prompt",
        )
    prompts = []
    for item in items:
        if isinstance(item, str):
            try:
                token_ids = await state.sessions.tokenize_text(item)
            except SessionError as exc:
                raise APIError(str(exc), code=exc.code, param="prompt") from exc
            prompts.append(_Prompt(token_ids, item))
        else:
            text = _decode(state, item) if echo else ""
            prompts.append(_Prompt(list(item), text))
    return prompts


def _is_token_ids(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(t, int) and not isinstance(t, bool) for t in value)
    )


def _decode(state: ServerState, token_ids: list[int]) -> str:
    engine = state.async_engine.engine
    if not all(0 <= t < engine.vocab_size for t in token_ids):
        raise APIError(f"prompt token ids must be in [0, {engine.vocab_size})", param="prompt")
    return str(engine.tokenizer.decode(token_ids))
