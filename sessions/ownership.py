"""Session ownership across tarry instances sharing one Redis or Redis Cluster.

Keys (``namespace`` defaults to ``tarry``; see ``sessions.redis_keys``):

- ``{ns}:instance:<id>`` -> the instance's advertised URL, with a PX TTL; the heartbeat renews it.
- ``{ns}:lease:{<session_id>}`` -> the owner instance's id, taken with ``SET NX PX``; the
  owner's heartbeat renews the leases of the sessions it holds, ``release`` deletes it on
  close. The session's record shares its hash tag, so record writes are fenced by the lease
  (``sessions.record_store.RedisRecordStore``).

An owner is *alive* while its instance key exists. A dead owner's lease is replaced with
``take_over``, an atomic compare-and-set, so of two instances racing for it exactly one wins.
An owner killed without a clean shutdown keeps its instance key until the TTL expires; so
before sending a client to it, ``SessionOwnership.owner_answers`` probes its ``/health``
(``probe_timeout_s``): an owner that refuses the connection or does not answer in time is
treated as dead and taken over at once (``sessions.manager.SessionManager.resume``).

Failure behaviour: no Redis error ever raises out of this module. Calls then answer as if this
instance may serve the session (it keeps serving its local sessions), ``healthy`` turns False
(reported by ``/health``), and the heartbeat re-registers the instance and re-takes the leases
of its sessions (if nobody else took them meanwhile) once Redis answers again.
"""

from __future__ import annotations

import http.client
import logging
import secrets
import threading
import urllib.parse
from dataclasses import dataclass
from typing import Any

from sessions.redis_keys import instance_key, session_lease_key

logger = logging.getLogger(__name__)

# KEYS[1] = lease, ARGV[1] = expected owner (empty = no lease), ARGV[2] = new owner, ARGV[3] = PX
_TAKE_OVER = """
local current = redis.call('GET', KEYS[1])
if (current == false and ARGV[1] == '') or current == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
"""

# KEYS[1] = lease, ARGV[1] = me, ARGV[2] = PX. 1 = renewed or re-taken, 0 = someone else owns it.
_RENEW = """
local current = redis.call('GET', KEYS[1])
if current == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if current == false then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""

# KEYS[1] = lease, ARGV[1] = me: delete only our own lease.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def new_instance_id() -> str:
    return "inst_" + secrets.token_hex(8)


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


class _RedisHealth:
    """A healthy flag that logs once per outage and once per recovery."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.healthy = True

    def down(self, operation: str, exc: Exception) -> None:
        if self.healthy:
            logger.warning("%s %s failed, Redis unavailable: %s", self.what, operation, exc)
        self.healthy = False

    def up(self) -> None:
        if not self.healthy:
            logger.warning("%s: Redis is back", self.what)
        self.healthy = True


class InstanceRegistry:
    """This instance's registration (id -> advertised URL, PX TTL) and look-ups of others."""

    def __init__(
        self,
        client: Any,
        url: str,
        instance_id: str | None = None,
        namespace: str = "tarry",
        ttl_ms: int = 10_000,
    ) -> None:
        self.client = client
        self.url = url
        self.instance_id = instance_id or new_instance_id()
        self.namespace = namespace
        self.ttl_ms = ttl_ms
        self.health = _RedisHealth("instance registry")

    def _key(self, instance_id: str) -> str:
        return instance_key(self.namespace, instance_id)

    def register(self) -> bool:
        """(Re)write this instance's key with a fresh TTL; False if Redis is unavailable."""
        try:
            self.client.set(self._key(self.instance_id), self.url, px=self.ttl_ms)
        except Exception as exc:
            self.health.down("register", exc)
            return False
        self.health.up()
        return True

    def deregister(self) -> None:
        try:
            self.client.delete(self._key(self.instance_id))
        except Exception as exc:
            self.health.down("deregister", exc)

    def url_of(self, instance_id: str) -> str | None:
        """The URL of a live instance; None if it is dead (or Redis is unavailable)."""
        try:
            url = _text(self.client.get(self._key(instance_id)))
        except Exception as exc:
            self.health.down("lookup", exc)
            return None
        self.health.up()
        return url


@dataclass(frozen=True)
class Owner:
    """Who holds a session's lease; ``url`` is None and ``alive`` False for a dead instance."""

    instance_id: str
    url: str | None
    alive: bool


class SessionLeases:
    """Per-session leases held by ``registry.instance_id``; ``held`` are the ones it renews."""

    def __init__(self, client: Any, registry: InstanceRegistry, ttl_ms: int = 10_000) -> None:
        self.client = client
        self.registry = registry
        self.ttl_ms = ttl_ms
        self.held: set[str] = set()
        self.health = _RedisHealth("session leases")
        self._lock = threading.Lock()

    @property
    def me(self) -> str:
        return self.registry.instance_id

    def _key(self, session_id: str) -> str:
        return session_lease_key(self.registry.namespace, session_id)

    def _eval(self, script: str, session_id: str, *args: Any) -> int | None:
        try:
            result = self.client.eval(script, 1, self._key(session_id), *args)
        except Exception as exc:
            self.health.down("script", exc)
            return None
        self.health.up()
        return int(result)

    def acquire(self, session_id: str) -> bool:
        """Take a free lease (or keep our own). False only when another instance holds it;
        with Redis unavailable the session is held locally and the lease taken on recovery."""
        won = self._eval(_TAKE_OVER, session_id, "", self.me, self.ttl_ms)
        if won == 0 and self.holder(session_id) == self.me:
            won = 1
        if won == 0:
            return False
        with self._lock:
            self.held.add(session_id)
        return True

    def take_over(self, session_id: str, expected_owner: str) -> bool:
        """Atomically replace ``expected_owner``'s lease with ours; False if the lease changed
        meanwhile (another instance won) or Redis is unavailable."""
        won = self._eval(_TAKE_OVER, session_id, expected_owner, self.me, self.ttl_ms)
        if won != 1:
            return False
        with self._lock:
            self.held.add(session_id)
        return True

    def release(self, session_id: str) -> None:
        """Stop renewing and delete the lease if it is still ours (never raises)."""
        with self._lock:
            self.held.discard(session_id)
        self._eval(_RELEASE, session_id, self.me)

    def forget(self, session_id: str) -> None:
        """Stop renewing a lease another instance took (without touching the lease)."""
        with self._lock:
            self.held.discard(session_id)

    def holds(self, session_id: str) -> bool:
        """Whether this instance still holds the lease, as of the last renewal."""
        with self._lock:
            return session_id in self.held

    def renew_all(self) -> list[str]:
        """Renew (or, after a Redis restart, re-take) every held lease; drop and return the
        ones another instance took over. Stops at the first Redis error."""
        with self._lock:
            held = sorted(self.held)
        lost = []
        for session_id in held:
            renewed = self._eval(_RENEW, session_id, self.me, self.ttl_ms)
            if renewed is None:
                break
            if renewed == 0:
                lost.append(session_id)
        with self._lock:
            self.held.difference_update(lost)
        return lost

    def holder(self, session_id: str) -> str | None:
        """The instance id holding the lease now (one Redis GET); None if nobody holds it or
        Redis is unavailable."""
        try:
            value = _text(self.client.get(self._key(session_id)))
        except Exception as exc:
            self.health.down("lookup", exc)
            return None
        self.health.up()
        return value

    def owner_of(self, session_id: str) -> Owner | None:
        """The lease holder (with its URL and liveness), or None if nobody holds the lease or
        Redis is unavailable."""
        instance_id = self.holder(session_id)
        if instance_id is None:
            return None
        url = self.registry.url_of(instance_id)
        return Owner(instance_id, url, url is not None)


class SessionOwnership:
    """Registry + leases + the heartbeat thread that renews both every ``ttl / 3``.

    ``start`` registers and starts the heartbeat; ``close`` stops it, releases every held
    lease and deregisters (a clean shutdown hands sessions over at once; a crash hands them
    over when the TTLs expire).
    """

    def __init__(
        self,
        client: Any,
        url: str,
        ttl_s: float = 10.0,
        namespace: str = "tarry",
        instance_id: str | None = None,
        probe_timeout_s: float = 0.75,
    ) -> None:
        ttl_ms = max(int(ttl_s * 1000), 300)
        self.probe_timeout_s = probe_timeout_s
        self.registry = InstanceRegistry(client, url, instance_id, namespace, ttl_ms)
        self.leases = SessionLeases(client, self.registry, ttl_ms)
        self.interval_s = ttl_ms / 3000
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def instance_id(self) -> str:
        return self.registry.instance_id

    @property
    def url(self) -> str:
        return self.registry.url

    @property
    def healthy(self) -> bool:
        return self.registry.health.healthy and self.leases.health.healthy

    def owner_answers(self, url: str) -> bool:
        """Whether an instance answers ``GET {url}/health`` with 200 within ``probe_timeout_s``
        (per socket operation). Blocks: call it off the event loop. A refused connection, a
        timeout or anything but an HTTP 200 counts as "does not answer"."""
        parts = urllib.parse.urlsplit(url)
        if parts.hostname is None:
            return False
        https = parts.scheme == "https"
        connection_class = http.client.HTTPSConnection if https else http.client.HTTPConnection
        port = parts.port or (443 if https else 80)
        connection = connection_class(parts.hostname, port, timeout=self.probe_timeout_s)
        try:
            connection.request("GET", "/health")
            return connection.getresponse().status == 200
        except (OSError, http.client.HTTPException) as exc:
            logger.warning("owner at %s does not answer (%s): taking over", url, exc)
            return False
        finally:
            connection.close()

    def start(self) -> None:
        self.registry.register()
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._heartbeat, name="tarry-ownership", daemon=True
            )
            self._thread.start()

    def beat(self) -> list[str]:
        """One heartbeat: re-register, renew leases; returns the session ids lost."""
        if not self.registry.register():
            return []
        return self.leases.renew_all()

    def _heartbeat(self) -> None:
        # While Redis is away, beat faster (at most every 0.5 s) so recovery shows promptly.
        while not self._stop.wait(self.interval_s if self.healthy else min(self.interval_s, 0.5)):
            try:
                lost = self.beat()
            except Exception:  # never let the heartbeat die
                logger.exception("ownership heartbeat failed")
                continue
            for session_id in lost:
                logger.warning("session %s was taken over by another instance", session_id)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        for session_id in sorted(self.leases.held):
            self.leases.release(session_id)
        self.registry.deregister()

    def health(self) -> dict[str, Any]:
        return {
            "instance_id": self.instance_id,
            "url": self.url,
            "healthy": self.healthy,
            "sessions_held": len(self.leases.held),
            "lease_ttl_ms": self.leases.ttl_ms,
        }
