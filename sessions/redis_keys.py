"""The names of Tarry's session keys in Redis, in one place.

A session's record and its lease carry the session id as a Redis Cluster hash tag
(``{...}``), so both live in one slot: a record write can be fenced by the lease in one atomic
script (``sessions.record_store``), on a single Redis and on a cluster alike. Instance keys are
independent of each other. KV blocks have their own, sharded, layout
(``sessions.tiers.redis_index``).

    {ns}:session:{<session id>}    msgpack session record (messages, token ids, settings)
    {ns}:lease:{<session id>}      id of the instance that owns the session (PX TTL)
    {ns}:instance:<instance id>    that instance's advertised URL (PX TTL, heartbeat)
"""

from __future__ import annotations


def _checked(value: str, what: str) -> str:
    if not value or "{" in value or "}" in value:
        raise ValueError(f"{what} must be non-empty and free of braces, got {value!r}")
    return value


def session_record_key(namespace: str, session_id: str) -> str:
    return f"{_checked(namespace, 'namespace')}:session:{{{_checked(session_id, 'session id')}}}"


def session_lease_key(namespace: str, session_id: str) -> str:
    return f"{_checked(namespace, 'namespace')}:lease:{{{_checked(session_id, 'session id')}}}"


def instance_key(namespace: str, instance_id: str) -> str:
    return f"{_checked(namespace, 'namespace')}:instance:{_checked(instance_id, 'instance id')}"
