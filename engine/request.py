"""A generation request as the scheduler and engine see it."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from engine.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def is_finished(self) -> bool:
        return self in (
            RequestStatus.FINISHED_STOPPED,
            RequestStatus.FINISHED_LENGTH,
            RequestStatus.FINISHED_ABORTED,
        )


@dataclass(eq=False)
class Request:
    """Token state of one request.

    ``all_token_ids`` = prompt + generated tokens. ``num_computed_tokens`` of them have K/V in
    the pool; the rest are computed by the next scheduled steps. After preemption the count
    drops to 0 (or to what the prefix cache still holds) and the whole history is recomputed.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    cache_salt: str = ""
    eos_token_ids: frozenset[int] = frozenset()
    arrival_time: float = field(default_factory=time.monotonic)
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    all_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = -1  # prompt tokens served by the prefix cache at first admission
    num_restored_tokens: int = 0  # of which restored from a lower tier (host memory, Redis)
    restored_tokens_by_tier: dict[str, int] = field(default_factory=dict)  # tier name -> tokens
    num_preemptions: int = 0
    stop_reason: int | str | None = None
    # Draft tokens to verify in the next step (speculative decoding, set by the engine before
    # each step): scheduled and computed after the last token, but not in all_token_ids and
    # not counted in num_computed_tokens until the engine has verified them.
    spec_token_ids: list[int] = field(default_factory=list)
    draft_misses: int = 0  # verifications in a row that accepted no draft
    draft_pause: int = 0  # length of the last pause in drafting (output tokens), 0: none yet
    drafts_paused_until: int = 0  # no drafts before this many output tokens

    def __post_init__(self) -> None:
        if not self.all_token_ids:
            self.all_token_ids = list(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def banned_before_min_tokens(self) -> list[int]:
        """EOS and stop tokens: what may not be generated before ``min_tokens`` tokens."""
        return sorted({*self.eos_token_ids, *self.sampling_params.stop_token_ids})

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)
