"""Speculative decoding by prompt lookup, for greedy requests: which requests draft, how many
tokens, and how a step's logits are split between sampled rows and verified drafts.

A request that drafts ``k`` tokens computes ``1 + k`` tokens in one step (its last token and
the drafts) and gets ``1 + k`` rows of logits. Row ``i`` is the model's next token after the
``i``-th of them; the drafts are accepted while each equals the argmax before it, and the
argmax after the last accepted one is one more token. Greedy output is unchanged: every
emitted token is the argmax the model gives for exactly the tokens before it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch

from engine.ngram_proposer import propose_ngram_drafts
from engine.request import Request

# A request whose drafts were all wrong MISSES_BEFORE_PAUSE verifications in a row stops
# drafting for a while: first FIRST_PAUSE output tokens, twice as long after each further
# failed try, at most MAX_PAUSE. A wrong draft costs a query row for nothing (measured,
# SmolLM2 on 2 cores: 8 sequences x 1800 keys, 1 token each ~160 ms a step, 4 each ~300 ms),
# so text the lookup cannot predict pays for a try now and then, not every step.
MISSES_BEFORE_PAUSE = 3
FIRST_PAUSE = 4
MAX_PAUSE = 64

# Drafts for a sequence: (its tokens so far, how many at most) -> draft tokens.
DraftProposer = Callable[[Sequence[int], int], list[int]]


def can_speculate(request: Request) -> bool:
    """Greedy on the raw logits, but for ``min_tokens`` bans (see ``split_logits``): no
    processor, penalty, bias or logprobs request could change or needs each token's logits;
    and drafting is not paused (``note_verification``)."""
    params = request.sampling_params
    return (
        params.is_greedy
        and not params.logits_processors
        and not params.has_penalties
        and params.logprobs is None
        and request.num_output_tokens >= request.drafts_paused_until
    )


def note_verification(request: Request, num_accepted: int) -> None:
    """After a verified step: pause the request's drafting after ``MISSES_BEFORE_PAUSE``
    steps in a row that accepted no draft (see ``MAX_PAUSE``)."""
    if num_accepted:
        request.draft_misses = request.draft_pause = 0
        return
    request.draft_misses += 1
    if request.draft_misses >= MISSES_BEFORE_PAUSE:
        request.draft_misses = 0
        request.draft_pause = min(MAX_PAUSE, max(FIRST_PAUSE, 2 * request.draft_pause))
        request.drafts_paused_until = request.num_output_tokens + request.draft_pause


def propose_drafts(
    running: Iterable[Request],
    num_drafts: int,
    max_model_len: int,
    proposer: DraftProposer = propose_ngram_drafts,
) -> None:
    """Set ``spec_token_ids`` of every decoding request in ``running`` that may speculate: up to
    ``num_drafts`` tokens from ``proposer``, fewer near ``max_tokens`` or the context limit
    (the step after the drafts always yields one more token)."""
    for request in running:
        request.spec_token_ids = []
        if request.num_tokens - request.num_computed_tokens != 1 or not can_speculate(request):
            continue
        room = min(num_drafts, max_model_len - request.num_tokens - 1)
        max_tokens = request.sampling_params.max_tokens
        if max_tokens is not None:
            room = min(room, max_tokens - request.num_output_tokens - 1)
        if room > 0:
            request.spec_token_ids = proposer(request.all_token_ids, room)[:room]


def split_logits(
    logits: torch.Tensor,  # [num_rows, vocab]: 1 + len(drafts) rows per request, in order
    to_sample: list[Request],
) -> tuple[torch.Tensor, list[list[int]]]:
    """(the logits of the requests without drafts, one row each, in order; for each request
    with drafts, in order, the argmax of each of its rows, EOS and stop tokens banned in the
    rows whose token would come before ``min_tokens``, as ``SamplingRow`` bans them)."""
    plain_rows: list[int] = []
    draft_rows: list[int] = []
    drafting: list[Request] = []
    for request in to_sample:
        row = len(plain_rows) + len(draft_rows)
        if request.spec_token_ids:
            draft_rows.extend(range(row, row + 1 + len(request.spec_token_ids)))
            drafting.append(request)
        else:
            plain_rows.append(row)
    if not drafting:
        return logits, []
    device = logits.device
    selected = logits.index_select(0, torch.tensor(draft_rows).to(device))  # a copy
    starts = [0]
    for request in drafting:
        num_rows = 1 + len(request.spec_token_ids)
        num_banned = min(num_rows, request.sampling_params.min_tokens - request.num_output_tokens)
        banned = request.banned_before_min_tokens() if num_banned > 0 else []
        if banned:
            first = starts[-1]
            selected[first : first + num_banned, torch.tensor(banned, device=device)] = -torch.inf
        starts.append(starts[-1] + num_rows)
    argmax = torch.argmax(selected, dim=-1).tolist()  # one host copy for every drafting row
    targets = [argmax[start:end] for start, end in zip(starts, starts[1:], strict=False)]
    plain = logits.index_select(0, torch.tensor(plain_rows, dtype=torch.long).to(device))
    return plain, targets


def accepted_prefix(drafts: list[int], targets: list[int]) -> list[int]:
    """The tokens a verified step yields: ``targets`` up to and including the first one that
    differs from its draft (all of them when every draft was right). The accepted drafts are
    all but the last."""
    for idx, draft in enumerate(drafts):
        if targets[idx] != draft:
            return targets[: idx + 1]
    return targets[: len(drafts) + 1]
