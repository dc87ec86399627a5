"""A point-in-time view of the device KV pool and the engine's cumulative cache counters."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class PoolStats:
    """Device pool blocks by use, and counters since the engine started.

    Every block is in exactly one of the four groups::

        num_blocks = num_empty_blocks + num_cached_blocks + num_pinned_blocks + num_in_use_blocks

    - empty: free, holding nothing reusable;
    - cached: free (evictable) but still holding a hashed block a prefix hit can reuse;
    - pinned: held by at least one pin (a paused session's context), perhaps also by requests;
    - in use: held only by running requests.
    """

    block_size: int
    num_blocks: int
    num_empty_blocks: int
    num_cached_blocks: int
    num_pinned_blocks: int
    num_in_use_blocks: int
    num_running_requests: int
    num_waiting_requests: int
    prefix_query_tokens: int  # prompt tokens looked up in the prefix cache at admission
    prefix_hit_tokens: int  # of which found cached on the device (restored blocks included)
    restored_tokens: int  # tokens brought back from the KV store (host / Redis) to the device
    saved_tokens: int  # tokens written from the device to the KV store
    num_evictions: int  # cached blocks overwritten by new content
    num_pins_reclaimed: int  # pins released under memory pressure
    num_steps: int
