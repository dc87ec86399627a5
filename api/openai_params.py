"""Translate OpenAI request fields into engine SamplingParams (and reject what we cannot honour).

A field the request leaves out (or sends as null) takes the server's default (``defaults``,
from the model's generation config, see ``engine.generation_config``), else the neutral value.
``max_tokens`` left out everywhere means the rest of the context, as in vLLM.
"""

from __future__ import annotations

from typing import Any

from api.errors import APIError
from engine.errors import InvalidRequestError
from engine.sampling_params import SamplingParams

NEUTRAL = {
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": 0,
    "min_p": 0.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "repetition_penalty": 1.0,
}


def sampling_from_openai(
    body: dict[str, Any], max_output_tokens: int, defaults: dict[str, Any] | None = None
) -> SamplingParams:
    """SamplingParams for a chat/completions body; raises APIError naming the bad field.

    An explicit ``max_tokens`` (or ``max_completion_tokens``) above ``max_output_tokens`` is a
    400; a default one is not capped here (the engine stops at the context limit).
    """
    defaults = defaults or {}
    if body.get("n") not in (None, 1):
        raise APIError("only n=1 is supported", param="n")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    explicit_max_tokens = max_tokens is not None
    if max_tokens is None:
        max_tokens = defaults.get("max_tokens")
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    num_logprobs = _num_logprobs(body.get("logprobs"), body.get("top_logprobs"))
    values = {name: _value(body, defaults, name) for name in NEUTRAL}
    params = SamplingParams(
        max_tokens=max_tokens,
        seed=body.get("seed"),
        stop=stop or [],
        stop_token_ids=body.get("stop_token_ids") or [],
        min_tokens=body.get("min_tokens", 0) if body.get("min_tokens") is not None else 0,
        ignore_eos=bool(body.get("ignore_eos", False)),
        logprobs=num_logprobs,
        logit_bias=_logit_bias(body.get("logit_bias")),
        **values,
    )
    try:
        params.validate()
    except InvalidRequestError as exc:
        raise APIError(str(exc), param=_field_named_in(str(exc))) from exc
    requested = params.max_tokens if explicit_max_tokens else None
    if requested is not None and requested > max_output_tokens:
        raise APIError(f"max_tokens may be at most {max_output_tokens}", param="max_tokens")
    return params


def _value(body: dict[str, Any], defaults: dict[str, Any], name: str) -> Any:
    value = body.get(name)
    if value is None:
        value = defaults.get(name, NEUTRAL[name])
    return value


def _logit_bias(value: Any) -> dict[int, float]:
    """OpenAI sends ``{"token id as a string": bias}``; integer keys are accepted too."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise APIError("logit_bias must be an object of token id -> bias", param="logit_bias")
    result: dict[int, float] = {}
    for key, bias in value.items():
        try:
            token_id = int(key)
        except (TypeError, ValueError):
            raise APIError(
                f"logit_bias keys must be token ids, got {key!r}", param="logit_bias"
            ) from None
        result[token_id] = bias
    return result


def _field_named_in(message: str) -> str | None:
    """The SamplingParams field a validation message starts with (for the error's param)."""
    name = message.split(" ", 1)[0]
    return name if name.isidentifier() else None


def _num_logprobs(logprobs: Any, top_logprobs: Any) -> Any:
    """Chat sends a ``logprobs`` flag plus a ``top_logprobs`` count; completions a count."""
    if isinstance(logprobs, bool):
        return (top_logprobs or 0) if logprobs else None
    return logprobs


# The sampling fields of the Responses API and the session protocol (``session.update``,
# ``response.create``): every one the chat API accepts, with ``max_output_tokens`` for
# ``max_tokens``.
RESPONSE_SAMPLING_FIELDS = (
    "max_output_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "min_tokens",
    "ignore_eos",
    "seed",
    "stop",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "logit_bias",
)


def sampling_from_fields(
    fields: dict[str, Any], max_output_tokens: int, defaults: dict[str, Any] | None = None
) -> SamplingParams:
    """SamplingParams for a Responses request or a session-protocol config: the same mapping
    (and the same 400s) as ``sampling_from_openai``; fields other than
    ``RESPONSE_SAMPLING_FIELDS`` are ignored here."""
    body = {name: fields.get(name) for name in RESPONSE_SAMPLING_FIELDS}
    body["max_tokens"] = body.pop("max_output_tokens")
    ignore_eos = body.get("ignore_eos")
    if ignore_eos is not None and not isinstance(ignore_eos, bool):
        raise APIError("ignore_eos must be a boolean", param="ignore_eos")
    try:
        return sampling_from_openai(body, max_output_tokens, defaults)
    except APIError as exc:
        if exc.param != "max_tokens":
            raise
        message = exc.message.replace("max_tokens", "max_output_tokens")  # this surface's name
        raise APIError(message, exc.code, exc.status, "max_output_tokens") from exc


MAX_CHOICES = 64  # choices per request: n (times the number of prompts on /v1/completions)


def num_choices(body: dict[str, Any]) -> int:
    """``n``: how many choices to sample for each prompt (1 when left out); APIError else."""
    n = body.get("n")
    if n is None:
        n = 1
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise APIError("n must be a positive integer", param="n")
    best_of = body.get("best_of")
    if best_of is not None and best_of != n:
        raise APIError("best_of is not supported (only best_of equal to n)", param="best_of")
    return n
