"""Turns next-token logits into tokens: greedy, temperature, top-k, top-p, min-p, seeds,
logit bias and presence / frequency / repetition penalties.

Rows are independent: each has its own ``SamplingParams`` and, for seeded requests, its own
``torch.Generator`` (so a seeded request samples the same tokens whatever else is batched).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, cast

import torch

from engine.outputs import TokenLogprob
from engine.sampling_params import SamplingParams


class SamplingRow(NamedTuple):
    params: SamplingParams
    generator: torch.Generator | None  # None: the global torch RNG
    banned_token_ids: list[int]  # e.g. EOS while fewer than min_tokens were generated
    output_token_ids: Sequence[int] = ()  # the request's tokens so far, for logits processors
    prompt_token_ids: Sequence[int] = ()  # for repetition_penalty (prompt and output tokens)


def sample(logits: torch.Tensor, rows: list[SamplingRow]) -> list[tuple[int, TokenLogprob | None]]:
    """Pick one token per row of ``logits`` ``[num_rows, vocab]`` (float32).

    Log-probabilities (when requested) are those of the raw logits, before logits processors,
    bans, temperature and filters, like vLLM's default.

    Greedy rows without processors or bans (the common case) take one batched argmax and one
    device-to-host copy for all of them; every other row is sampled on its own.
    """
    token_ids = _plain_greedy_tokens(logits, rows)
    for row_idx, row in enumerate(rows):
        if token_ids[row_idx] is None:
            token_ids[row_idx] = _pick(_constrain(logits[row_idx], row), row)
    picked = cast(list[int], token_ids)
    return list(zip(picked, _logprobs(logits, picked, rows), strict=True))


def _is_plain_greedy(row: SamplingRow) -> bool:
    """Greedy on the raw logits: no processor or ban can change the argmax."""
    params = row.params
    return (
        params.is_greedy
        and not params.logits_processors
        and not row.banned_token_ids
        and not params.has_penalties
    )


def _plain_greedy_tokens(logits: torch.Tensor, rows: list[SamplingRow]) -> list[int | None]:
    """The argmax of each plain-greedy row (one argmax over the batch, one host copy); None for
    the other rows."""
    plain = [_is_plain_greedy(row) for row in rows]
    if not any(plain):
        return [None] * len(rows)
    argmax = torch.argmax(logits, dim=-1).tolist()
    return [
        token_id if is_plain else None for token_id, is_plain in zip(argmax, plain, strict=True)
    ]


def _constrain(raw: torch.Tensor, row: SamplingRow) -> torch.Tensor:
    """Apply the row's logits processors (in order), its logit bias, its bans, then its
    penalties (vLLM's order) to a copy of ``raw``."""
    params = row.params
    if not params.logits_processors and not row.banned_token_ids and not params.has_penalties:
        return raw
    constrained = raw.clone()
    for processor in params.logits_processors:
        constrained = processor(row.output_token_ids, constrained)
    if params.logit_bias:
        token_ids = torch.tensor(list(params.logit_bias), device=constrained.device)
        bias = torch.tensor(list(params.logit_bias.values()), device=constrained.device)
        constrained[token_ids] += bias.to(constrained.dtype)
    if row.banned_token_ids:
        constrained[row.banned_token_ids] = float("-inf")
    return apply_penalties(
        constrained,
        row.prompt_token_ids,
        row.output_token_ids,
        params.presence_penalty,
        params.frequency_penalty,
        params.repetition_penalty,
    )


def apply_penalties(
    logits: torch.Tensor,  # [vocab]
    prompt_token_ids: Sequence[int],
    output_token_ids: Sequence[int],
    presence_penalty: float,
    frequency_penalty: float,
    repetition_penalty: float,
) -> torch.Tensor:
    """vLLM's penalties on one row: repetition (prompt and output tokens), then frequency and
    presence (output tokens only, the OpenAI definition). Returns ``logits`` (modified)."""
    vocab_size = logits.shape[-1]
    device = logits.device
    if repetition_penalty != 1.0:
        seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        for ids in (prompt_token_ids, output_token_ids):
            if len(ids):
                seen[torch.tensor(list(ids), device=device)] = True
        penalized = torch.where(
            logits > 0, logits / repetition_penalty, logits * repetition_penalty
        )
        logits = torch.where(seen, penalized, logits)
    if (presence_penalty or frequency_penalty) and len(output_token_ids):
        output_ids = torch.tensor(list(output_token_ids), device=device)
        counts = torch.bincount(output_ids, minlength=vocab_size)[:vocab_size].to(logits.dtype)
        logits = (
            logits - frequency_penalty * counts - presence_penalty * (counts > 0).to(logits.dtype)
        )
    return logits


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


def _logprobs(
    logits: torch.Tensor, token_ids: list[int], rows: list[SamplingRow]
) -> list[TokenLogprob | None]:
    """Raw log-probabilities of the picked tokens and the top alternatives, for the rows that
    asked for them: one log-softmax over those rows and one top-k per distinct count."""
    wanted = [row_idx for row_idx, row in enumerate(rows) if row.params.logprobs is not None]
    results: list[TokenLogprob | None] = [None] * len(rows)
    if not wanted:
        return results
    logprobs = torch.log_softmax(_select_rows(logits, wanted), dim=-1)  # [num_wanted, vocab]
    picked = torch.tensor([token_ids[row_idx] for row_idx in wanted], device=logits.device)
    chosen = logprobs.gather(1, picked.unsqueeze(1)).squeeze(1).tolist()
    tops = _top_logprobs(logprobs, [cast(int, rows[row_idx].params.logprobs) for row_idx in wanted])
    for pos, row_idx in enumerate(wanted):
        results[row_idx] = TokenLogprob(
            token_id=token_ids[row_idx], logprob=chosen[pos], top=tops[pos]
        )
    return results


def _top_logprobs(
    logprobs: torch.Tensor,  # [num_rows, vocab]
    num_top: list[int],  # per row, >= 0
) -> list[list[tuple[int, float]]]:
    """The ``num_top[i]`` most likely (token id, logprob) of each row, most likely first."""
    tops: list[list[tuple[int, float]]] = [[] for _ in num_top]
    for k in sorted(set(num_top) - {0}):
        rows = [pos for pos, n in enumerate(num_top) if n == k]
        values, indices = torch.topk(_select_rows(logprobs, rows), k)
        for pos, ids, vals in zip(rows, indices.tolist(), values.tolist(), strict=True):
            tops[pos] = list(zip(ids, vals, strict=True))
    return tops


def _select_rows(tensor: torch.Tensor, row_indices: list[int]) -> torch.Tensor:
    """``tensor[row_indices]`` (increasing indices); the tensor itself when that is all rows."""
    if len(row_indices) == tensor.shape[0]:
        return tensor
    return tensor.index_select(0, torch.tensor(row_indices, device=tensor.device))
