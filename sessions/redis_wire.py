"""Talking to Redis for the Redis KV tier: its client, RESP command packing and streamed
pipelines (commands written ahead of their replies, with a window for big values)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from sessions.kv_tier_base import logger

Packed = list[bytes | memoryview]  # one RESP command, big arguments left uncopied

_READ_CHUNK_BYTES = 1 << 20  # hiredis reads per recv; big reads cut per-call overhead
_FIRST_WINDOW = 4  # GETs in flight while the value size is unknown
_MAX_JOINED_ARG_BYTES = 16384  # bigger command arguments are sent from their own buffer


def make_client(
    client_or_url: redis.Redis | str, socket_timeout_s: float, connect_timeout_s: float
) -> redis.Redis:
    """A client with short timeouts, no retries (the next call is the retry) and big reads.

    A given client lends its address, credentials and options to a pool of the store's own,
    so its (default: blocking, retrying) settings cannot stall the engine; only clients with
    an unusual pool class (sentinel, blocking) are used as they are.
    """
    settings: dict[str, object] = {
        "socket_timeout": socket_timeout_s,
        "socket_connect_timeout": connect_timeout_s,
        "socket_read_size": _READ_CHUNK_BYTES,
        "retry": Retry(NoBackoff(), 0),
    }
    if isinstance(client_or_url, str):
        return redis.Redis.from_url(client_or_url, **settings)
    pool = client_or_url.connection_pool
    if pool.connection_kwargs.get("decode_responses"):
        raise ValueError("the Redis client must be created with decode_responses=False")
    if type(pool) is not redis.ConnectionPool:
        logger.warning("Redis client with a %s: its timeouts apply", type(pool).__name__)
        return client_or_url
    own_pool = redis.ConnectionPool(
        connection_class=pool.connection_class, **{**pool.connection_kwargs, **settings}
    )
    return redis.Redis(connection_pool=own_pool)


def pack_command(*args: str | int | bytes | bytearray) -> Packed:
    """One command in the Redis protocol. Arguments over 16 KiB become their own buffer
    (no copy); the rest are joined."""
    pieces: Packed = []
    small = bytearray(b"*%d\r\n" % len(args))
    for arg in args:
        data = _arg_bytes(arg)
        small += b"$%d\r\n" % len(data)
        if len(data) > _MAX_JOINED_ARG_BYTES:
            pieces += [bytes(small), memoryview(data)]
            small = bytearray(b"\r\n")
        else:
            small += data
            small += b"\r\n"
    pieces.append(bytes(small))
    return pieces


def _arg_bytes(arg: str | int | bytes | bytearray) -> bytes | bytearray:
    if isinstance(arg, str):
        return arg.encode()
    if isinstance(arg, int):
        return b"%d" % arg
    return arg


class ReplyWindow:
    """How many commands may be in flight so that about ``inflight_bytes`` of replies are:
    sized from a hint of the reply size, then from each reply that arrives."""

    def __init__(self, inflight_bytes: int, reply_bytes_hint: int | None) -> None:
        self.inflight_bytes = inflight_bytes
        self.num_commands = _FIRST_WINDOW
        if reply_bytes_hint is not None:
            self.observe(reply_bytes_hint)

    def observe(self, reply_bytes: int) -> None:
        self.num_commands = max(_FIRST_WINDOW, self.inflight_bytes // max(reply_bytes, 1))


def exchange(client: redis.Redis, commands: Iterable[Packed]) -> list[object]:
    """Pipeline ``commands`` (all written before the first reply is read); their replies."""
    replies: list[object] = []
    stream(client, commands, lambda _idx, reply: replies.append(reply))
    return replies


def stream(
    client: redis.Redis,
    commands: Iterable[Packed],
    on_reply: Callable[[int, object], None],
    window: ReplyWindow | None = None,
) -> None:
    """Pipeline ``commands`` over one pooled connection, handing each reply (an error
    reply as a ``redis.ResponseError`` object) to ``on_reply`` as it arrives.

    Without a ``window`` every command is written before the first reply is read. With
    one, commands are written ahead while the replies in flight stay within its bytes, so
    big values stream through instead of piling up in Redis's output buffer. Connection
    errors raise (and the connection is closed).
    """
    pool = client.connection_pool
    connection = pool.get_connection()
    try:
        _pump(connection, iter(commands), on_reply, window)
    except BaseException:
        connection.disconnect()  # replies may be left unread: never reuse it
        raise
    finally:
        pool.release(connection)


def _pump(
    connection: redis.connection.Connection,
    commands: Iterator[Packed],
    on_reply: Callable[[int, object], None],
    window: ReplyWindow | None,
) -> None:
    num_pending = 0
    reply_idx = 0
    exhausted = False
    while True:
        while not exhausted and (window is None or num_pending < window.num_commands):
            command = next(commands, None)
            if command is None:
                exhausted = True
                break
            connection.send_packed_command(command, check_health=False)
            num_pending += 1
        if num_pending == 0:
            return
        try:
            reply = connection.read_response()
        except redis.ResponseError as error:  # an error reply; the connection is fine
            reply = error
        if window is not None and isinstance(reply, bytes):
            window.observe(len(reply))
        on_reply(reply_idx, reply)
        reply_idx += 1
        num_pending -= 1
