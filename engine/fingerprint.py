"""The model fingerprint: what must match for a stored KV block to be reusable."""

from __future__ import annotations

import hashlib
import json

import torch


def model_fingerprint(
    architecture: str,
    weights_digest: str,
    dtype: torch.dtype,
    block_size: int,
    kv_layout: str,
    kv_block_shape: tuple[int, ...],
) -> str:
    """A short hex id over architecture, weights, dtype, block size and KV layout/shape.

    It is mixed into every prefix-cache hash and keys every KV block stored off the device, so
    KV from another model, dtype or layout is never loaded.
    """
    record = {
        "architecture": architecture,
        "weights": weights_digest,
        "dtype": str(dtype).removeprefix("torch."),
        "block_size": block_size,
        "kv_layout": kv_layout,
        "kv_block_shape": list(kv_block_shape),
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:32]
