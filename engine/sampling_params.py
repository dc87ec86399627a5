"""Per-request sampling settings, validated on construction-time use (``validate``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
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

    ``max_tokens = None`` means the rest of the context: generation stops at the engine's
    ``max_model_len`` (as vLLM's default).

    Penalties follow vLLM (and, for presence/frequency, the OpenAI definition), applied in this
    order after the logits processors: ``logit_bias`` adds its value (in [-100, 100]) to each
    listed token id's logit; ``repetition_penalty`` (> 0, 1 = off) divides the positive logits
    and multiplies the negative ones of every token that occurs in the prompt or the output;
    ``frequency_penalty`` (in [-2, 2]) subtracts ``penalty * count`` for each token's count in
    the output so far and ``presence_penalty`` (in [-2, 2]) subtracts ``penalty`` once for
    every token present in the output. They apply to greedy requests too.
    """

    max_tokens: int | None = 256
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
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    logits_processors: list[LogitsProcessor] = field(default_factory=list)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        """True when a penalty or a logit bias changes the logits before sampling."""
        return bool(
            self.presence_penalty
            or self.frequency_penalty
            or self.repetition_penalty != 1.0
            or self.logit_bias
        )

    def for_sequence(self, index: int) -> SamplingParams:
        """The parameters of sequence ``index`` of an ``n``-sequence request: a copy whose
        seed is ``seed + index`` (wrapping at MAX_SEED) when a seed is given, so each choice
        is reproducible on its own and differs from its siblings."""
        seed = None if self.seed is None else (self.seed + index) % MAX_SEED
        return replace(self, seed=seed, stop=list(self.stop))

    def validate(self) -> None:
        """Raise InvalidRequestError naming the first invalid field."""
        _require(
            self.max_tokens is None
            or (
                isinstance(self.max_tokens, int)
                and not isinstance(self.max_tokens, bool)
                and self.max_tokens > 0
            ),
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
            isinstance(self.min_tokens, int)
            and 0 <= self.min_tokens <= (self.max_tokens or self.min_tokens),
            f"min_tokens must be in [0, max_tokens], got {self.min_tokens!r}",
        )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _require(
                _is_number(value) and -2.0 <= value <= 2.0,
                f"{name} must be in [-2, 2], got {value!r}",
            )
        _require(
            _is_number(self.repetition_penalty) and 0.0 < self.repetition_penalty <= 2.0,
            f"repetition_penalty must be in (0, 2], got {self.repetition_penalty!r}",
        )
        _require(
            isinstance(self.logit_bias, dict)
            and all(
                isinstance(token_id, int) and not isinstance(token_id, bool) and token_id >= 0
                for token_id in self.logit_bias
            )
            and all(_is_number(v) and -100.0 <= v <= 100.0 for v in self.logit_bias.values()),
            "logit_bias must map token ids (non-negative integers) to numbers in [-100, 100]",
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
