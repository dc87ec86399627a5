"""Turns next-token logits into tokens: greedy, temperature, top-k, top-p, min-p, seeds.

Rows are independent: each has its own ``SamplingParams`` and, for seeded requests, its own
``torch.Generator`` (so a seeded request samples the same tokens whatever else is batched).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from engine.outputs import TokenLogprob
from engine.sampling_params import SamplingParams


class SamplingRow(NamedTuple):
    params: SamplingParams
    generator: torch.Generator | None  # None: the global torch RNG
    banned_token_ids: list[int]  # e.g. EOS while fewer than min_tokens were generated
    output_token_ids: Sequence[int] = ()  # the request's tokens so far, for logits processors


def sample(logits: torch.Tensor, rows: list[SamplingRow]) -> list[tuple[int, TokenLogprob | None]]:
    """Pick one token per row of ``logits`` ``[num_rows, vocab]`` (float32).

    Log-probabilities (when requested) are those of the raw logits, before logits processors,
    bans, temperature and filters, like vLLM's default.
    """
    results: list[tuple[int, TokenLogprob | None]] = []
    for row_idx, row in enumerate(rows):
        raw = logits[row_idx]
        token_id = _pick(_constrain(raw, row), row)
        logprob = _logprob(raw, token_id, row.params.logprobs)
        results.append((token_id, logprob))
    return results


def _constrain(raw: torch.Tensor, row: SamplingRow) -> torch.Tensor:
    """Apply the row's logits processors (in order), then its bans, to a copy of ``raw``."""
    processors = row.params.logits_processors
    if not processors and not row.banned_token_ids:
        return raw
    constrained = raw.clone()
    for processor in processors:
        constrained = processor(row.output_token_ids, constrained)
    if row.banned_token_ids:
        constrained[row.banned_token_ids] = float("-inf")
    return constrained


def _pick(logits: torch.Tensor, row: SamplingRow) -> int:
    params = row.params
    if params.is_greedy:
        return int(torch.argmax(logits))
    logits = logits / params.temperature
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        probs = _top_p_filter(probs, params.top_p)
    if params.min_p > 0.0:
        probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
    return int(torch.multinomial(probs, 1, generator=row.generator))


def _top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches ``top_p``."""
    sorted_probs, sorted_idx = torch.sort(probs, descending=True)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
    return torch.zeros_like(probs).scatter_(0, sorted_idx, sorted_probs)


def _logprob(raw: torch.Tensor, token_id: int, num_top: int | None) -> TokenLogprob | None:
    if num_top is None:
        return None
    logprobs = torch.log_softmax(raw, dim=-1)
    top: list[tuple[int, float]] = []
    if num_top > 0:
        values, indices = torch.topk(logprobs, num_top)
        top = list(zip(indices.tolist(), values.tolist(), strict=True))
    return TokenLogprob(token_id=token_id, logprob=float(logprobs[token_id]), top=top)
