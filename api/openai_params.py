"""Translate OpenAI request fields into engine SamplingParams (and reject what we cannot honour)."""

from __future__ import annotations

from typing import Any

from api.errors import APIError
from engine.errors import InvalidRequestError
from engine.sampling_params import SamplingParams

UNSUPPORTED_NONZERO = ("presence_penalty", "frequency_penalty")


def sampling_from_openai(body: dict[str, Any], max_output_tokens: int) -> SamplingParams:
    """SamplingParams for a chat/completions body; raises APIError naming the bad field."""
    for name in UNSUPPORTED_NONZERO:
        if body.get(name) not in (None, 0, 0.0):
            raise APIError(f"{name} is not supported", param=name)
    if body.get("n") not in (None, 1):
        raise APIError("only n=1 is supported", param="n")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is None:
        max_tokens = max_output_tokens
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    num_logprobs = _num_logprobs(body.get("logprobs"), body.get("top_logprobs"))
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0),
        top_p=_number(body, "top_p", 1.0),
        top_k=body.get("top_k", 0),
        min_p=_number(body, "min_p", 0.0),
        seed=body.get("seed"),
        stop=stop or [],
        stop_token_ids=body.get("stop_token_ids") or [],
        min_tokens=body.get("min_tokens", 0),
        ignore_eos=bool(body.get("ignore_eos", False)),
        logprobs=num_logprobs,
    )
    try:
        params.validate()
    except InvalidRequestError as exc:
        raise APIError(str(exc)) from exc
    if params.max_tokens > max_output_tokens:
        raise APIError(f"max_tokens may be at most {max_output_tokens}", param="max_tokens")
    return params


def _number(body: dict[str, Any], name: str, default: float) -> Any:
    value = body.get(name)
    return default if value is None else value


def _num_logprobs(logprobs: Any, top_logprobs: Any) -> Any:
    """Chat sends a ``logprobs`` flag plus a ``top_logprobs`` count; completions a count."""
    if isinstance(logprobs, bool):
        return (top_logprobs or 0) if logprobs else None
    return logprobs
