"""Draft tokens by prompt lookup (n-gram speculation): guess a sequence's next tokens by
finding its last few tokens earlier in its own context and copying what followed them.

Agents copy a lot (file paths, identifiers, code from a tool result, the shape of their own
earlier replies), so the guess is often right; the model verifies every guess in the next step,
so a wrong one costs compute, never correctness. Pure bookkeeping: numpy, no torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

MAX_NGRAM = 3  # longest suffix looked up (the longest match is tried first)
# Shortest suffix looked up: a single token ("1" after "Task 1:" earlier) predicts badly.
MIN_NGRAM = 2


def propose_ngram_drafts(
    token_ids: Sequence[int],
    num_drafts: int,
    max_ngram: int = MAX_NGRAM,
    min_ngram: int = MIN_NGRAM,
) -> list[int]:
    """Up to ``num_drafts`` tokens that followed the most recent earlier occurrence of the
    longest suffix of ``token_ids`` (``max_ngram`` down to ``min_ngram`` tokens long); [] when
    no suffix occurs earlier.

    For ``token_ids = [5, 6, 7, 9, 5, 6]`` and 2 drafts: the suffix ``[5, 6]`` occurred at 0,
    followed by ``[7, 9]``.
    """
    if num_drafts <= 0 or len(token_ids) < 2:
        return []
    tokens = np.asarray(token_ids, dtype=np.int64)
    length = tokens.shape[0]
    for n in range(min(max_ngram, length - 1), min_ngram - 1, -1):
        suffix = tokens[length - n :]
        # earlier occurrences start before length - n: at least one token follows each
        starts = np.flatnonzero(tokens[: length - n] == suffix[0])
        for offset in range(1, n):
            if starts.shape[0] == 0:
                break
            starts = starts[tokens[starts + offset] == suffix[offset]]
        if starts.shape[0]:
            follow = int(starts[-1]) + n  # the most recent occurrence
            return tokens[follow : follow + num_drafts].tolist()
    return []
