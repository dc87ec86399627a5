"""Small integer arithmetic shared by the kernels and the engine's bookkeeping."""

from __future__ import annotations


def cdiv(numerator: int, denominator: int) -> int:
    """Ceiling division of non-negative integers: ``cdiv(17, 16) == 2``."""
    return -(-numerator // denominator)
