"""The tenant id a session record stores for its API key: a keyed hash, never the key.

Session records (Redis) name their owner so that only the same key can resume, read, fork or
delete them, on any instance sharing the Redis. Storing the key itself would hand every API key
to whoever can read Redis, so the owner is

- ``hmac:<HMAC-SHA256(secret, key)>`` with a per-deployment secret (``TARRY_OWNER_KEY_SECRET``;
  every instance sharing a Redis must have the same one), or
- ``sha256:<SHA-256("tarry-owner-v1" NUL key)>`` without one (still no key in clear; a
  namespaced hash, so it matches no other system's digests of the same key).

Records written before this scheme hold ``key:<api key>``; ``from_stored`` maps them to the
current form when they are loaded (and they are rewritten so at their next save).
"""

from __future__ import annotations

import hashlib
import hmac

LEGACY_PREFIX = "key:"
NAMESPACE = b"tarry-owner-v1\0"


class OwnerKeys:
    def __init__(self, secret: bytes | None = None) -> None:
        self._secret = secret or None

    def owner_for(self, api_key: str) -> str:
        """The owner id of ``api_key`` (deterministic: the same on every instance)."""
        raw = api_key.encode("utf-8", "surrogateescape")
        if self._secret is not None:
            return "hmac:" + hmac.new(self._secret, raw, hashlib.sha256).hexdigest()
        return "sha256:" + hashlib.sha256(NAMESPACE + raw).hexdigest()

    def from_stored(self, stored_owner: str) -> str:
        """A record's owner in the current form (a legacy clear-text key is hashed)."""
        if stored_owner.startswith(LEGACY_PREFIX):
            return self.owner_for(stored_owner[len(LEGACY_PREFIX) :])
        return stored_owner
