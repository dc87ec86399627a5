"""Errors the engine raises for things a caller did wrong (never for its own bugs)."""

from __future__ import annotations


class InvalidRequestError(ValueError):
    """A request is malformed or cannot be served; nothing was admitted or changed."""


class ModelLoadError(RuntimeError):
    """A model spec could not be resolved or loaded; the message names what was tried."""
