"""What to do with a session's KV when it pauses: keep it on the device, offload it, or drop it.

In the spirit of InferCept's min-waste rule and Continuum's TTL pinning:

* keep (pin on the device) while the expected pause is short and memory is not scarce, for at
  most ``keep_ttl_s``;
* otherwise move it down a tier (host memory, Redis) when moving is cheaper than recomputing;
* drop it when recomputing is cheaper than moving it there and back (short contexts).

Under pressure the engine additionally releases pins, least recently pinned first.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class PauseDecision(enum.Enum):
    KEEP = "keep"
    OFFLOAD = "offload"
    DROP = "drop"


@dataclass
class PausePolicy:
    """Tunable costs. Defaults fit SmolLM2 on a small CPU machine.

    ``recompute_s_per_token``: prefill time per token; moving a context down a tier and back
    costs ``move_fixed_s`` (round trips) plus ``move_s_per_token`` per token.
    """

    keep_ttl_s: float = 30.0
    tool_pause_s: float = 2.0  # expected pause while a client tool runs
    turn_pause_s: float = 60.0  # expected pause while a person answers
    pressure_threshold: float = 0.75  # device pool usage above which pauses do not keep
    recompute_s_per_token: float = 2e-3
    move_s_per_token: float = 1e-4
    move_fixed_s: float = 0.02

    def expected_pause_s(self, waiting_for_tool: bool) -> float:
        return self.tool_pause_s if waiting_for_tool else self.turn_pause_s

    def decide(
        self, num_context_tokens: int, expected_pause_s: float, device_usage: float
    ) -> PauseDecision:
        """Keep, offload or drop a paused context of ``num_context_tokens`` tokens."""
        if expected_pause_s <= self.keep_ttl_s and device_usage < self.pressure_threshold:
            return PauseDecision.KEEP
        move_s = self.move_fixed_s + num_context_tokens * self.move_s_per_token
        if move_s < num_context_tokens * self.recompute_s_per_token:
            return PauseDecision.OFFLOAD
        return PauseDecision.DROP
