"""Per-request sampling settings, validated on construction-time use (``validate``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from engine.errors import InvalidRequestError

if TYPE_CHECKING:  # torch only for annotations: request/scheduler bookkeeping stays torch-free
    import torch

MAX_TOP_LOGPROBS = 20
MAX_SEED = 1 << 64  # torch.Generator.manual_seed takes a uint64


class LogitsProcessor(Protocol):
    """Rewrites one request's next-token logits before sampling (e.g. constrained decoding).

    Called once per sampled token with the request's output token ids so far (read-only; after
    a preemption the same ids are passed again) and its logits row ``[vocab]`` (float32, a
    private copy: modifying it in place is allowed). Returns the logits to sample from; set a
    token to ``-inf`` to forbid it. A processor is typically stateful, so give each request its
    own instance. Must not raise: an exception propagates out of ``LLMEngine.step`` after the
    scheduler has advanced, leaving that step half done.
    """

    def __call__(self, output_token_ids: Sequence[int], logits: torch.Tensor) -> torch.Tensor: ...


@dataclass(slots=True)
class SamplingParams:
    """How to pick each next token and when to stop.

    ``temperature == 0`` means greedy. ``top_k <= 0``, ``top_p == 1`` and ``min_p == 0`` disable
    those filters. ``logprobs = n`` returns the sampled token's log-probability and the ``n``
    most likely alternatives (``n = 0``: only the sampled token); log-probabilities are those of
    the model's raw distribution (before temperature and filters), as in vLLM.
    Stop strings are cut from the returned text unless ``include_stop_str_in_output``.
    ``logits_processors`` run in order on each step's logits before bans (``min_tokens``),
    temperature and filters; log-probabilities stay those of the raw logits.
    """

    max_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    min_tokens: int = 0
    ignore_eos: bool = False
    logprobs: int | None = None
    include_stop_str_in_output: bool = False
    logits_processors: list[LogitsProcessor] = field(default_factory=list)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self) -> None:
        """Raise InvalidRequestError naming the first invalid field."""
        _require(
            isinstance(self.max_tokens, int) and self.max_tokens > 0,
            f"max_tokens must be a positive integer, got {self.max_tokens!r}",
        )
        _require(
            _is_number(self.temperature) and 0.0 <= self.temperature <= 100.0,
            f"temperature must be in [0, 100], got {self.temperature!r}",
        )
        _require(
            isinstance(self.top_k, int) and self.top_k >= -1,
            f"top_k must be an integer >= -1 (-1 or 0 disables), got {self.top_k!r}",
        )
        _require(
            _is_number(self.top_p) and 0.0 < self.top_p <= 1.0,
            f"top_p must be in (0, 1], got {self.top_p!r}",
        )
        _require(
            _is_number(self.min_p) and 0.0 <= self.min_p <= 1.0,
            f"min_p must be in [0, 1], got {self.min_p!r}",
        )
        _require(
            self.seed is None or (isinstance(self.seed, int) and 0 <= self.seed < MAX_SEED),
            f"seed must be an integer in [0, 2**64), got {self.seed!r}",
        )
        _require(
            isinstance(self.stop, list) and all(isinstance(s, str) and s for s in self.stop),
            "stop must be a list of non-empty strings",
        )
        _require(
            isinstance(self.stop_token_ids, list)
            and all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
            "stop_token_ids must be a list of non-negative integers",
        )
        _require(
            isinstance(self.min_tokens, int) and 0 <= self.min_tokens <= self.max_tokens,
            f"min_tokens must be in [0, max_tokens], got {self.min_tokens!r}",
        )
        _require(
            self.logprobs is None
            or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= MAX_TOP_LOGPROBS),
            f"logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.logprobs!r}",
        )
        _require(
            isinstance(self.logits_processors, list)
            and all(callable(p) for p in self.logits_processors),
            "logits_processors must be a list of callables",
        )


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise InvalidRequestError(message)
