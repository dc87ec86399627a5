"""What the engine hands back for each request after each step."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class TokenLogprob:
    """Log-probability of a generated token and the ``top`` alternatives (id, logprob)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass(slots=True)
class RequestOutput:
    """A delta: the tokens and text produced for one request since its previous output.

    ``finish_reason`` is ``"stop"`` (EOS, stop token or stop string), ``"length"``
    (max_tokens or context limit), ``"abort"`` or ``"error"``; None while running.
    """

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    num_cached_tokens: int
    num_output_tokens: int
    num_restored_tokens: int = 0  # cached tokens that came from host memory or Redis
    # num_restored_tokens split by the tier that served them (``KVStore.tier_name``)
    restored_tokens_by_tier: dict[str, int] = field(default_factory=dict)
    stop_reason: int | str | None = None
    logprobs: list[TokenLogprob] | None = None
    error: str | None = None
