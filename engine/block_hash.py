"""Chained content hashes of full KV blocks: ``h_i = H(h_{i-1}, tokens_i, extra)``.

``extra`` carries what must never be shared across: the model fingerprint and the tenant's
cache salt. The same tokens under another model or tenant get another hash, so they never hit.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

from engine.block_pool import BlockHash

ROOT_HASH = BlockHash(b"tarry-root")


def hash_block_tokens(parent: BlockHash, token_ids: Sequence[int], extra: bytes) -> BlockHash:
    """The hash of one full block given its parent's hash (``ROOT_HASH`` for the first)."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(parent)
    digest.update(array("q", token_ids).tobytes())
    digest.update(extra)
    return BlockHash(digest.digest())


def hash_full_blocks(
    token_ids: Sequence[int],
    block_size: int,
    extra: bytes,
    known: Sequence[BlockHash] = (),
) -> list[BlockHash]:
    """Hashes of every full block of ``token_ids``; reuses the ``known`` leading hashes."""
    hashes = list(known)
    num_full = len(token_ids) // block_size
    parent = hashes[-1] if hashes else ROOT_HASH
    for block_idx in range(len(hashes), num_full):
        start = block_idx * block_size
        parent = hash_block_tokens(parent, token_ids[start : start + block_size], extra)
        hashes.append(parent)
    return hashes
