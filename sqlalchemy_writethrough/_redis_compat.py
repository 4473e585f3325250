"""Every use of redis-py's internals, in one place.

The cache talks to Redis below ``Redis.execute_command`` on its hot path (a pooled connection's
``send_command`` / ``read_response``: about 7 us of a 65 us loopback round trip, measured by
``python -m benchmarks``), pipelines its own batches (``pack_commands``: redis-py's pipeline asks
``SCRIPT EXISTS`` first), checks each connection's epoch when it connects, and follows a
Sentinel's primary. None of that is public API. Each function here names the internal it wraps
and the redis-py versions it was checked against (5.0 to 8.1); ``tests/test_redis_compat.py``
exercises every one of them against a real server, so a redis-py upgrade that moves one fails
there, by name, instead of somewhere in the cache's behaviour.
"""

from __future__ import annotations

import functools
import inspect
import re
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import redis
import redis.asyncio
from redis import BlockingConnectionPool
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError, ResponseError

REDIS_VERSION = tuple(int(p) for p in redis.__version__.split(".")[:2] if p.isdigit())
#: redis-py's Python command packer (see :func:`pack`)
_PYTHON_PACKER: Any = getattr(redis.connection, "PythonRespSerializer", None)
#: redis-py's pure-Python reply parsers and their socket buffer (see :func:`read_values`)
try:
    from redis._parsers import _RESP2Parser, _RESP3Parser
    from redis._parsers.socket import SocketBuffer

    _PYTHON_PARSERS: tuple[Any, ...] = (_RESP2Parser, _RESP3Parser)
    _SOCKET_BUFFER: Any = SocketBuffer
except ImportError:  # pragma: no cover - moved: redis-py's own parser reads every reply
    _PYTHON_PARSERS = ()
    _SOCKET_BUFFER = None
#: the one ``read_response`` :func:`read_values` stands in for (Connection, SSLConnection,
#: UnixDomainSocketConnection; not a Sentinel-managed or client-side-caching connection's)
_PLAIN_READ_RESPONSE: Any = getattr(
    getattr(redis.connection, "AbstractConnection", None), "read_response", None
)


# -- clients and pools ------------------------------------------------------------------


def is_plain_client(client: Any) -> bool:
    """Whether the cache may use ``client``'s pool directly: not a single-connection client
    (``Redis(single_connection_client=True)`` keeps ``client.connection``), no client-side
    caching (``pool.cache``, 5.1+), and no subclass overriding ``execute_command``. Those keep
    redis-py's own path."""
    return (
        getattr(client, "connection", None) is None
        and getattr(client.connection_pool, "cache", None) is None
        and type(client).execute_command is redis.Redis.execute_command
    )


def pool_blocks(pool: Any) -> bool:
    """A ``BlockingConnectionPool`` waits for a free connection instead of opening one."""
    return isinstance(pool, BlockingConnectionPool)


def lendable_connections(pool: Any) -> int:
    """How many of ``pool``'s connections the cache may keep checked out between commands,
    one per thread (see :class:`~.redis_sync.SyncTransport`): a quarter of ``max_connections``
    (redis-py's default is 100 in 6.0 and later, 2**31 before) for a plain ``ConnectionPool``
    only, so that threads holding idle connections never run the pool dry; 0 for any other
    pool (a ``BlockingConnectionPool`` waits instead of opening one; a Sentinel pool's
    ``release`` drops connections to a demoted primary, which a held one would skip)."""
    if type(pool) is not redis.ConnectionPool:
        return 0
    return int(getattr(pool, "max_connections", 0) or 0) // 4


def pool_unbounded(pool: Any) -> bool:
    """Whether ``pool`` opens as many connections as it is asked for (redis-py before 6.0
    defaults ``max_connections`` to 2**31; 6.0 and later to 100, which a busy application can
    reach)."""
    return int(getattr(pool, "max_connections", 0) or 0) >= 2**20


def socket_of(conn: Any) -> Any:
    """The connection's socket (``Connection._sock``, private in 5.0 to 8.1; None when it is
    not connected): a kept connection is polled before its next command, the check redis-py's
    ``get_connection`` makes with ``can_read()``."""
    return getattr(conn, "_sock", None)


def checkout_of(pool: Any) -> Callable[[], Any]:
    """``pool.get_connection`` as a no-argument callable: redis-py before 5.3 requires a
    command name, 5.3 and later deprecate passing one. A connection that another thread's
    ``pool.disconnect()`` closed during its connect fails as a ``ConnectionError`` (see
    :func:`raise_if_closed_under_us`)."""
    get_connection: Callable[[], Any] = pool.get_connection
    try:
        inspect.signature(pool.get_connection).bind()
    except TypeError:
        get_connection = functools.partial(pool.get_connection, "_")
    except ValueError:  # no signature (a C or wrapped pool): assume the current form
        pass

    def checkout() -> Any:
        try:
            return get_connection()
        except (AttributeError, TypeError, ValueError) as exc:
            raise_if_closed_under_us(exc)
            raise

    return checkout


def release(pool: Any, conn: Any) -> None:
    """Give a checked-out connection back to its pool."""
    pool.release(conn)


def connection_kwargs(client: Any) -> dict[str, Any]:
    """The keyword arguments the pool builds connections with (``socket_timeout``...)."""
    kwargs: dict[str, Any] = getattr(client.connection_pool, "connection_kwargs", None) or {}
    return kwargs


def sentinel_kwargs(client: Any) -> dict[str, Any] | None:
    """For a ``Sentinel.master_for()`` client, the keyword arguments its sentinels are asked
    with (``Sentinel(sentinel_kwargs=...)``, else the connection's); None for another client."""
    manager = getattr(client.connection_pool, "sentinel_manager", None)
    if manager is None:
        return None
    kwargs: dict[str, Any] = manager.sentinel_kwargs
    return kwargs


def retries(client: Any) -> int:
    """How many times the client retries a failed command (``Retry._retries``; the client's
    own ``retry`` or its connections')."""
    retry = connection_kwargs(client).get("retry") or getattr(client, "retry", None)
    return int(getattr(retry, "_retries", 0)) if retry is not None else 0


# -- one connection ---------------------------------------------------------------------


def raise_if_closed_under_us(exc: AttributeError | TypeError | ValueError) -> None:
    """Raise a ``ConnectionError`` for ``exc`` when it is redis-py's way of failing on a
    connection another thread disconnected while this one used it.

    ``pool.disconnect()`` (``Redis.close()``: ``cache.close()`` of a cache still serving
    other threads) sets a connection's socket and its parser's buffer to None under the
    thread reading from it, which then fails with ``AttributeError: 'NoneType' object has no
    attribute 'readline'`` (or ``'feed'``, ``'sendall'``...; redis-py 5.0 closes the buffer
    instead: ``ValueError: I/O operation on closed file.``), not a ``ConnectionError``: the
    redis-py issue #2967 family, fixed for hiredis only. Classified by where it was raised (in
    redis-py, or in this module's reads of redis-py's buffers) and what it says; any other
    such error is a bug and goes on as it is."""
    said = str(exc)
    if ("NoneType" if isinstance(exc, (AttributeError, TypeError)) else "closed file") not in said:
        return
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = "" if tb is None else str(tb.tb_frame.f_globals.get("__name__", ""))
    if where.startswith("redis.") or where == __name__:
        raise RedisConnectionError(f"connection closed by another thread: {said}") from exc


def call(conn: Any, args: Sequence[Any]) -> Any:
    """One command and its reply (an error reply raises), on a checked-out connection; an
    ``MGET``'s reply is read by :func:`read_values`."""
    try:
        conn.send_packed_command(pack(conn, args))
        if args[0] == "MGET":  # a get's: no call more than needed
            return read_values(conn)
    except (AttributeError, TypeError, ValueError) as exc:
        raise_if_closed_under_us(exc)
        raise
    return read(conn)


#: Redis before 7.0 reports an error that a script's ``redis.call()`` met under the generic
#: ``ERR``, inside its own message: ``Error running script (call to f_<sha>): @user_script:2:
#: @user_script: 2: -READONLY You can't write against a read only replica.`` (6.2.16); 7.0 and
#: later put the inner error's code first, which redis-py's parser turns into its class
_WRAPPED_SCRIPT_ERROR = re.compile(
    r"Error running script \(call to [^)]*\): (?:@\w+: ?\d+: )+-?([A-Z][A-Z_]* .*)", re.S
)
#: redis-py's error-reply parser (``BaseParser.parse_error``, a classmethod, 5.0 to 8.2)
_PARSERS_BASE: Any = getattr(getattr(redis, "_parsers", None), "base", None)
_PARSE_ERROR: Any = getattr(getattr(_PARSERS_BASE, "BaseParser", None), "parse_error", None)


def unwrapped_script_error(exc: ResponseError) -> ResponseError:
    """A script's error as Redis 7.0 and later report it: on Redis 6.2, the error class
    redis-py gives the inner error's code (``ReadOnlyError`` for ``READONLY``; a
    ``ResponseError`` whose message starts with the code otherwise), so that every caller
    classifies a refusal inside a script (a demoted primary, ``NOREPLICAS``, ``OOM``,
    ``NOPERM``) the same on every server version. Any other error is returned as it is.
    ``BaseParser.parse_error``: redis-py 5.0 to 8.2."""
    if type(exc) is not ResponseError or _PARSE_ERROR is None:
        return exc
    match = _WRAPPED_SCRIPT_ERROR.match(str(exc))
    if match is None:
        return exc
    inner: ResponseError = _PARSE_ERROR(match.group(1).strip())
    return inner


def script_error(conn: Any, exc: ResponseError) -> Exception:
    """What a reply's error means on ``conn``: :func:`unwrapped_script_error`, and, on a
    connection of a ``Sentinel.master_for()`` pool, a ``READONLY`` as redis-py's
    ``SentinelManagedConnection.read_response`` treats one it parsed itself (the primary was
    demoted): the connection is closed and a ``ConnectionError`` raised, which the retry
    policy answers by asking the sentinels again. On Redis 6.2 a script's ``READONLY`` is
    wrapped, so redis-py does not see it
    (``tests/test_sentinel.py::test_a_command_refused_by_the_demoted_primary_is_retried_on_the_new_one``
    on Redis 6.2)."""
    error = unwrapped_script_error(exc)
    if isinstance(error, ReadOnlyError) and follows_sentinel_primary(conn):
        conn.disconnect()
        return RedisConnectionError("The previous master is now a slave")
    return error


class _NotValues(Exception):
    """The reply is not an array of bulk strings and nulls: redis-py's parser reads it."""


def read_values(conn: Any) -> Any:
    """``conn.read_response()`` of a reply that is an array of bulk strings and nulls (an
    ``MGET``'s), read straight from the connection's buffer when redis-py would parse it in
    Python.

    redis-py's pure-Python parsers (``_RESP2Parser``, ``_RESP3Parser``, without ``hiredis``)
    read an array element by element through ``SocketBuffer.readline``/``read`` (several Python
    calls and a copy each): about 2.5 us an element, 300 us of a 100-row batch read's 117 keys
    on a loaded machine. Here the buffered bytes are scanned in one loop and the buffer is only
    advanced (and purged, as redis-py does) once the whole reply is in; more bytes are read
    with the buffer's own ``_read_from_socket``, its errors handled as ``read_response`` handles
    them (the connection is closed). A reply that spans many reads is scanned once: each pass
    starts where the last complete element ended, and the rest of a value whose length is
    known is read in one call (a value of many MiB is not copied once per socket read).
    Anything else (hiredis, ``decode_responses``, a push message or an error reply first,
    another connection class's ``read_response``) is left to redis-py, from the same position.
    Private: ``Connection._parser``, the parser's ``_buffer`` (a ``SocketBuffer``), its
    ``_buffer`` (a ``BytesIO``), ``_read_from_socket()`` and ``purge()``; checked on redis-py
    5.0 to 8.1 (``tests/test_redis_compat.py``).
    """
    parser: Any = getattr(conn, "_parser", None)
    if (
        type(parser) not in _PYTHON_PARSERS
        or type(conn).read_response is not _PLAIN_READ_RESPONSE
        or conn.encoder.decode_responses
    ):
        return conn.read_response()
    source = parser._buffer
    if type(source) is not _SOCKET_BUFFER:
        return conn.read_response()
    buf = source._buffer
    start = pos = buf.tell()
    values: list[bytes | None] = []
    count = -1  # the array's length, once its header is in
    try:
        while True:
            data = buf.read()  # from pos (the first element not read yet) to the end
            if count < 0 and data.endswith(b"\r\n"):
                # the whole reply in the buffer, most often: one split, no scan per element
                whole = _whole_values(data)
                if whole is not None:
                    buf.seek(pos + len(data))
                    source.purge()
                    if conn.health_check_interval:
                        conn.next_health_check = time.monotonic() + conn.health_check_interval
                    return whole
            try:
                count, used, missing = _parse_values(data, values, count)
            except _NotValues:
                break
            pos += used
            buf.seek(pos)
            if len(values) == count:
                source.purge()
                if conn.health_check_interval:
                    conn.next_health_check = time.monotonic() + conn.health_check_interval
                return values
            # appends to the buffer, leaves its position; raises when the socket has nothing
            # more to give
            source._read_from_socket(missing or None)
    except BaseException as exc:
        conn.disconnect()  # as read_response(): a half-read reply leaves the socket unusable
        if isinstance(exc, socket.timeout):
            raise redis.exceptions.TimeoutError("Timeout reading from Redis") from exc
        if isinstance(exc, OSError):
            raise RedisConnectionError(f"Error while reading from Redis: {exc.args}") from exc
        if isinstance(exc, ValueError):  # a length that is not a number: not Redis speaking
            raise redis.exceptions.InvalidResponse(f"Protocol error: {exc}") from exc
        raise
    buf.seek(start)
    return conn.read_response()


#: a bulk string's header by its length (``b"$5"`` at 5), for the lengths of most entries:
#: :func:`_whole_values` compares a header with the one its value's length makes
_BULK_HEADERS = [b"$%d" % n for n in range(4096)]


def _whole_values(data: bytes) -> list[bytes | None] | None:
    """The array of bulk strings and nulls that ``data`` is, exactly and entirely; None for
    anything else (a part of one, a reply followed by more bytes, another kind of reply, a
    garbled header), which :func:`_parse_values` then reads, or refuses, element by element.

    One ``split`` on CRLF parts the whole reply in C; per element, a header that is the one
    its value's length makes (``_BULK_HEADERS``) is all the checking. A value holding CRLFs
    comes in several parts (its header then names a longer length than its first part):
    they are joined back with the CRLFs the split took out, up to the length its header
    names. The split cannot hide a terminating CRLF inside a value: a value's terminator
    starts right after its last byte, and no CRLF found earlier can overlap it (that would
    need the terminator's first byte to be LF). ``bytes.find`` and ``int()`` a header were
    most of :func:`_parse_values`'s instructions (about 6k an element). When every element
    is a bulk string without CRLF (an MGET whose keys all exist, most often), no Python loop
    runs at all: the headers the values' lengths make are compared with the reply's as
    lists."""
    parts = data.split(b"\r\n")
    head = parts[0]
    if head[:1] != b"*" or parts[-1]:  # the reply ends with a CRLF: its last part is empty
        return None
    try:
        count = int(head[1:])
    except ValueError:
        return None
    if len(parts) == 2 * count + 2:
        # as many parts as ``count`` bulk strings without CRLFs make: when each header is the
        # one its value's length makes, the values are the reply, checked in C
        strings = parts[2:-1:2]
        try:
            if list(map(_BULK_HEADERS.__getitem__, map(len, strings))) == parts[1:-1:2]:
                return strings  # type: ignore[return-value]
        except IndexError:  # a value of 4096 bytes or more: the loop below reads it
            pass
    values: list[bytes | None] = []
    append = values.append
    headers = _BULK_HEADERS
    known = len(headers)
    it = iter(parts[1:-1])
    for header in it:
        if header == b"$-1" or header == b"_":  # RESP2's and RESP3's null
            append(None)
            continue
        value = next(it, None)
        if value is None:
            return None
        size = len(value)
        if size < known and headers[size] == header:
            append(value)
            continue
        if header[:1] != b"$":
            return None
        try:
            length = int(header[1:])
        except ValueError:
            return None
        if size < length:
            pieces = [value]
            while size < length:
                more = next(it, None)
                if more is None:
                    return None
                pieces.append(more)
                size += 2 + len(more)
            value = b"\r\n".join(pieces)
        if size != length:
            return None
        append(value)
    # every part read: more elements than the header says is more than this reply
    return values if len(values) == count else None


def _parse_values(data: bytes, values: list[bytes | None], count: int) -> tuple[int, int, int]:
    """Read what ``data`` completes of an array of bulk strings and nulls into ``values``:
    ``data`` starts at its header when ``count`` is -1, else at its next element. Returns
    (the array's length, or -1 while its header is incomplete; the bytes of ``data`` read;
    how many more bytes the next element needs at least, 0 when not known yet). Raises
    _NotValues when the reply is anything else."""
    size = len(data)
    pos = 0
    if count < 0:
        if not size:
            return -1, 0, 0
        if data[0] != 42:  # b"*"
            raise _NotValues
        eol = data.find(b"\r\n")
        if eol < 0:
            return -1, 0, 0
        count = int(data[1:eol])
        if count < 0:
            raise _NotValues
        pos = eol + 2
    append = values.append
    find = data.find
    for _ in range(count - len(values)):
        if pos >= size:
            return count, pos, 0
        kind = data[pos]
        if kind == 36:  # b"$": a bulk string, or RESP2's null ($-1)
            eol = find(b"\r\n", pos)
            if eol < 0:
                return count, pos, 0
            length = int(data[pos + 1 : eol])
            if length < 0:
                append(None)
                pos = eol + 2
                continue
            end = eol + 2 + length
            if end + 2 > size:
                return count, pos, end + 2 - size
            append(data[eol + 2 : end])
            pos = end + 2
        elif kind == 95:  # b"_": RESP3's null
            if pos + 3 > size:
                return count, pos, pos + 3 - size
            append(None)
            pos += 3
        else:
            raise _NotValues
    return count, pos, 0


def pack(conn: Any, args: Sequence[Any]) -> Any:
    """``conn.pack_command(*args)``, in one pass when redis-py would pack it in Python.

    redis-py's ``PythonRespSerializer`` (without ``hiredis``; kept in the connection's private
    ``_command_packer``) joins its whole buffer again for every argument: about 120 us for the
    117 keys of a 100-row batch read, against 40 us here. Only str (encoded as the
    connection's encoder does), bytes and int arguments are packed here; anything else, a
    command name with a space in it ("CONFIG GET") or another packer (hiredis's, in C) keeps
    redis-py's.
    """
    packed = _packed_keys(conn, args) if args[0] == "MGET" else None
    if packed is None:
        packed = _packed(conn, args)
    return conn.pack_command(*args) if packed is None else [packed]


def pack_many(conn: Any, commands: Sequence[Sequence[Any]]) -> Any:
    """``conn.pack_commands(commands)`` (one buffer for the whole batch), by :func:`pack`'s
    rules."""
    parts = []
    for command in commands:
        packed = _packed(conn, command)
        if packed is None:
            return conn.pack_commands(commands)
        parts.append(packed)
    return [b"".join(parts)]


#: the length headers of the short arguments (keys, owners, TTLs), made once: formatting one
#: for every argument was a third of a 100-row publish's packing. Without their CRLF: the
#: parts are joined with CRLF, which ends each header and each argument (one list append an
#: argument fewer)
_HEADERS = [b"$%d" % n for n in range(256)]


def _packed(conn: Any, args: Sequence[Any]) -> bytes | None:
    if _PYTHON_PACKER is None or type(getattr(conn, "_command_packer", None)) is not _PYTHON_PACKER:
        return None
    first = args[0]
    if type(first) is not str or " " in first:
        return None
    encoder = conn.encoder
    encoding, errors = encoder.encoding, encoder.encoding_errors
    # str.encode() without arguments takes CPython's UTF-8 fast path
    utf8 = encoding in ("utf-8", "utf8") and errors == "strict"
    headers = _HEADERS
    parts = [b"*%d" % len(args)]
    append = parts.append
    for arg in args:
        kind = type(arg)
        if kind is str:
            arg = arg.encode() if utf8 else arg.encode(encoding, errors)
        elif kind is int:
            arg = b"%d" % arg
        elif kind is not bytes:
            return None
        size = len(arg)
        append(headers[size] if size < 256 else b"$%d" % size)
        append(arg)
    append(b"")  # the last argument's CRLF
    return b"\r\n".join(parts)


#: the packed form (``$<length>\r\n<bytes>\r\n``) of the str arguments of recent MGETs, by
#: argument: the keys of the rows read lately and their generation keys (see
#: :func:`_packed_keys`); at most _KEPT_ARGS, then forgotten at once
_PACKED_ARGS: dict[str, bytes] = {}
_KEPT_ARGS = 4096


def _packed_keys(conn: Any, args: Sequence[Any]) -> bytes | None:
    """:func:`_packed` of an ``MGET`` whose arguments are all str (keys), from each key's
    packed form kept from an earlier MGET (``_PACKED_ARGS``): one dict lookup a key, in C,
    then one join. Rows read once are often read again, and a bucket's generation key is in
    every read of it: :func:`_packed`'s loop was about 1,800 instructions an argument (117 for
    a 100-row batch read; now about 480). A key not kept yet is packed as :func:`_packed`
    packs a str, and kept: only exact str arguments are. None when an argument not kept is
    not an exact str (bytes, an int, a str subclass), or the encoding is not strict UTF-8,
    or redis-py's packer is not the Python one: :func:`_packed` or redis-py's packer then
    packs it. A str subclass's argument equal to a kept key is packed as that key is (its
    UTF-8 bytes, what redis-py's encoder writes for it). The kept forms are a pure function
    of the key: no connection, client or fork can make one wrong."""
    if _PYTHON_PACKER is None or type(getattr(conn, "_command_packer", None)) is not _PYTHON_PACKER:
        return None
    encoder = conn.encoder
    if encoder.encoding not in ("utf-8", "utf8") or encoder.encoding_errors != "strict":
        return None
    kept = _PACKED_ARGS
    parts: list[Any] = list(map(kept.get, args))  # None for a key not kept
    parts.insert(0, b"*%d\r\n" % len(args))
    try:
        return b"".join(parts)
    except TypeError:  # a None: an argument not kept yet
        pass
    if len(kept) + len(args) > _KEPT_ARGS:
        kept.clear()
    for i, arg in enumerate(args, 1):
        if parts[i] is None:
            if type(arg) is not str:  # bytes, an int: _packed's rules
                return None
            data = arg.encode()
            kept[arg] = parts[i] = b"$%d\r\n%s\r\n" % (len(data), data)
    return b"".join(parts)


def call_many(conn: Any, commands: Sequence[Sequence[Any]]) -> list[Any]:
    """Commands sent together, their replies in order; an error reply is returned as its
    ``ResponseError``, not raised (:func:`pack` / ``send_packed_command``)."""
    replies: list[Any] = []
    try:
        conn.send_packed_command(pack_many(conn, commands))
        for _ in commands:
            try:
                replies.append(conn.read_response())
            except ResponseError as exc:
                error = script_error(conn, exc)
                if isinstance(error, RedisConnectionError):
                    raise error from None
                replies.append(error)
    except (AttributeError, TypeError, ValueError) as exc:
        raise_if_closed_under_us(exc)
        raise
    return replies


def send(
    conn: Any,
    args: Sequence[Any],
    after: Sequence[Any] | None = None,
    before: Sequence[Any] | None = None,
) -> None:
    """Send a command now (``before`` ahead of it and ``after`` behind it, in the same write,
    when given); the replies, in that order, are read later with :func:`read`."""
    try:
        if after is None and before is None:
            conn.send_packed_command(pack(conn, args))
        else:
            commands = [c for c in (before, args, after) if c is not None]
            conn.send_packed_command(pack_many(conn, commands))
    except (AttributeError, TypeError, ValueError) as exc:
        raise_if_closed_under_us(exc)
        raise


def read(conn: Any) -> Any:
    """The reply of the command sent last on ``conn`` (an error reply raises)."""
    try:
        return conn.read_response()
    except ResponseError as exc:
        raise script_error(conn, exc) from None
    except (AttributeError, TypeError, ValueError) as exc:
        raise_if_closed_under_us(exc)
        raise


def read_or_error(conn: Any) -> Any:
    """:func:`read`, an error reply returned as its exception, not raised."""
    try:
        return read(conn)
    except ResponseError as exc:
        return exc


def with_retry(conn: Any, action: Callable[[Any, Any], Any], arg: Any) -> Any:
    """``action(conn, arg)`` under the connection's retry policy (the client's ``retry``),
    reconnecting between attempts as redis-py does."""
    retry = getattr(conn, "retry", None)
    if retry is None:
        return action(conn, arg)
    return retry.call_with_retry(lambda: action(conn, arg), lambda error: reconnect(conn))


def reconnect(conn: Any) -> None:
    """Between two attempts of a command. A Sentinel-managed connection reconnects through
    ``connect()``, which asks the sentinels for the primary (sending on a closed connection
    reconnects to the address it had: after a failover, the old primary)."""
    conn.disconnect()
    if getattr(conn, "connection_pool", None) is not None:
        conn.connect()


def disconnect(conn: Any) -> None:
    """Close the connection's socket (a reply may still be on its way: never reuse it)."""
    conn.disconnect()


def connect(conn: Any) -> None:
    """Open the connection now (a Sentinel-managed one asks the sentinels where)."""
    conn.connect()


def on_connect(conn: Any, callback: Callable[[Any], object]) -> None:
    """Have redis-py call ``callback(conn)`` inside every later ``connect()`` of ``conn``,
    before the command that caused the reconnection is sent. ``callback`` must be a bound
    method: redis-py keeps it weakly (``WeakMethod``)."""
    conn.register_connect_callback(callback)


def is_sentinel_managed(conn: Any) -> bool:
    """A connection of a ``Sentinel.master_for()`` pool (it knows its pool, to ask it where
    the primary is)."""
    return getattr(conn, "connection_pool", None) is not None


def follows_sentinel_primary(conn: Any) -> bool:
    """A connection of a ``Sentinel.master_for()`` pool (not ``slave_for()``)."""
    return bool(getattr(getattr(conn, "connection_pool", None), "is_master", False))


def sentinel_primary(conn: Any) -> tuple[Any, ...]:
    """For a connection of a ``master_for()`` pool, (host, port) of the primary the sentinels
    name now: a round trip to them, in which redis-py also closes the pool's idle connections
    to a former primary."""
    return tuple(conn.connection_pool.get_master_address())


def peer(conn: Any) -> tuple[Any, Any]:
    """(host, port) the connection is configured for."""
    return conn.host, conn.port


# -- redis.asyncio ------------------------------------------------------------------------
# The same internals on ``redis.asyncio`` connections, whose methods are coroutines. The asyncio
# transport awaits these from SQLAlchemy's greenlet (see :mod:`.redis_async`).


def is_async_client(client: Any) -> bool:
    """A ``redis.asyncio.Redis`` client (standalone or ``Sentinel.master_for()``); not a
    ``redis.asyncio.cluster.RedisCluster``, which is no subclass of it (see
    :func:`uses_asyncio`)."""
    return isinstance(client, redis.asyncio.Redis)


def uses_asyncio(client: Any) -> bool:
    """Whether ``client``'s commands are coroutines: a ``redis.asyncio.Redis`` (standalone or
    Sentinel-managed) or a ``redis.asyncio.cluster.RedisCluster``. What to ask before choosing
    between calling a client and awaiting it: a sync call of an asyncio Cluster client's
    pipeline leaves its ``execute()`` coroutine un-awaited, and sends nothing."""
    return is_async_client(client) or is_async_cluster_client(client)


def is_plain_async_client(client: Any) -> bool:
    """As :func:`is_plain_client`, for a ``redis.asyncio.Redis`` client."""
    return (
        getattr(client, "connection", None) is None
        and getattr(client.connection_pool, "cache", None) is None
        and type(client).execute_command is redis.asyncio.Redis.execute_command
    )


def async_pool_blocks(pool: Any) -> bool:
    """A ``redis.asyncio.BlockingConnectionPool`` waits for a free connection."""
    return isinstance(pool, redis.asyncio.BlockingConnectionPool)


def async_checkout_of(pool: Any) -> Callable[[], Awaitable[Any]]:
    """``pool.get_connection`` as a no-argument coroutine function (a command name is
    required before 5.3, deprecated after)."""
    try:
        inspect.signature(pool.get_connection).bind()
    except TypeError:
        return lambda: pool.get_connection("_")
    except ValueError:
        pass
    checkout: Callable[[], Awaitable[Any]] = pool.get_connection
    return checkout


async def arelease(pool: Any, conn: Any) -> None:
    """Give a checked-out connection back to its pool (a coroutine since redis-py 5.0)."""
    await pool.release(conn)


async def acall(conn: Any, args: Sequence[Any]) -> Any:
    await conn.send_command(*args)
    try:
        return await conn.read_response()
    except ResponseError as exc:
        raise await ascript_error(conn, exc) from None


async def acall_many(conn: Any, commands: Sequence[Sequence[Any]]) -> list[Any]:
    await conn.send_packed_command(conn.pack_commands(commands))
    replies: list[Any] = []
    for _ in commands:
        try:
            replies.append(await conn.read_response())
        except ResponseError as exc:
            error = await ascript_error(conn, exc)
            if isinstance(error, RedisConnectionError):
                raise error from None
            replies.append(error)
    return replies


async def ascript_error(conn: Any, exc: ResponseError) -> Exception:
    """:func:`script_error` on a ``redis.asyncio`` connection."""
    error = unwrapped_script_error(exc)
    if isinstance(error, ReadOnlyError) and follows_sentinel_primary(conn):
        await conn.disconnect()
        return RedisConnectionError("The previous master is now a slave")
    return error


async def asend(
    conn: Any,
    args: Sequence[Any],
    after: Sequence[Any] | None = None,
    before: Sequence[Any] | None = None,
) -> None:
    if after is None and before is None:
        await conn.send_command(*args)
    else:
        commands = [c for c in (before, args, after) if c is not None]
        await conn.send_packed_command(conn.pack_commands(commands))


async def aread(conn: Any) -> Any:
    try:
        return await conn.read_response()
    except ResponseError as exc:
        raise await ascript_error(conn, exc) from None


async def aread_or_error(conn: Any) -> Any:
    """:func:`read_or_error` on ``redis.asyncio``."""
    try:
        return await aread(conn)
    except ResponseError as exc:
        return exc


async def awith_retry(conn: Any, action: Callable[[Any, Any], Awaitable[Any]], arg: Any) -> Any:
    retry = getattr(conn, "retry", None)
    if retry is None:
        return await action(conn, arg)

    async def reconnect(error: Any) -> None:
        await areconnect(conn)

    return await retry.call_with_retry(lambda: action(conn, arg), reconnect)


async def areconnect(conn: Any) -> None:
    await conn.disconnect()
    if getattr(conn, "connection_pool", None) is not None:
        await conn.connect()


async def adisconnect(conn: Any) -> None:
    await conn.disconnect()


async def aconnect(conn: Any) -> None:
    await conn.connect()


async def async_sentinel_primary(conn: Any) -> tuple[Any, ...]:
    """:func:`sentinel_primary` of a ``redis.asyncio.sentinel`` connection."""
    return tuple(await conn.connection_pool.get_master_address())


def close_now(conn: Any) -> None:
    """Close a ``redis.asyncio`` connection's socket without awaiting (from a finalizer)."""
    close = getattr(conn, "_close", None)
    if close is not None:
        close()


# -- redis.asyncio and event loops ------------------------------------------------------------
# A ``redis.asyncio`` connection's streams belong to the event loop that opened them, and a pool's
# asyncio lock or condition to the first loop that waited on it: used from another loop, asyncio
# raises ``RuntimeError``. The cache reads, to tell up front which loop they belong to, and to
# close a connection whose loop is closed (its own ``disconnect()`` cannot run there):
# ``ConnectionPool._available_connections`` / ``_in_use_connections`` (a list, a set or WeakSet);
# ``Connection._reader`` / ``_writer`` / ``_parser`` (with ``on_disconnect()``); the pool's
# ``_lock`` (redis-py 6+) and a ``BlockingConnectionPool``'s ``_condition``. And asyncio's: a
# ``StreamWriter``'s ``_loop``, its transport's ``_sock`` (over TLS, the SSL transport's
# ``_ssl_protocol._transport``'s), a ``Lock``'s / ``Condition``'s
# ``_loop`` (set at their first contended wait, Python 3.10+). Checked on redis-py 5.0 and 8.1,
# Python 3.11 (``tests/test_redis_compat.py``).


def async_pool_connections(pool: Any) -> list[Any]:
    """The connections a ``redis.asyncio`` pool holds, idle and checked out (none for a pool
    of another kind)."""
    return [
        *getattr(pool, "_available_connections", ()),
        *getattr(pool, "_in_use_connections", ()),
    ]


def async_idle_connections(client: Any) -> list[Any]:
    """The connections a ``redis.asyncio.Redis`` client would hand out next: its pool's idle
    ones, and its own (``single_connection_client=True``)."""
    conns = list(getattr(client.connection_pool, "_available_connections", ()))
    single = getattr(client, "connection", None)
    if single is not None:
        conns.append(single)
    return conns


def async_sentinel_pools(client: Any) -> list[Any]:
    """The connection pools of the sentinels a ``Sentinel.master_for()`` client asks where its
    primary is (none for another client)."""
    manager = getattr(client.connection_pool, "sentinel_manager", None)
    return [sentinel.connection_pool for sentinel in getattr(manager, "sentinels", ())]


def async_client_connections(client: Any) -> list[Any]:
    """The connections a ``redis.asyncio.Redis`` client holds: its pool's, its own
    (``single_connection_client=True``), and those of the sentinels a Sentinel-managed client
    asks, which belong to an event loop as its own do."""
    conns = async_pool_connections(client.connection_pool)
    for pool in async_sentinel_pools(client):
        conns.extend(async_pool_connections(pool))
    single = getattr(client, "connection", None)
    if single is not None:
        conns.append(single)
    return conns


def connection_loop(conn: Any) -> Any:
    """The event loop an open ``redis.asyncio`` connection belongs to; None when closed (it
    connects on the loop that uses it next)."""
    return getattr(getattr(conn, "_writer", None), "_loop", None)


def async_connections(client: Any) -> list[Any]:
    """Every connection a ``redis.asyncio`` client holds, a Cluster client's nodes' too."""
    if is_async_cluster_client(client):
        return async_cluster_connections(client)
    return async_client_connections(client)


def bound_loops(client: Any) -> set[Any]:
    """The event loops the client's open connections belong to."""
    loops = set()
    for conn in async_connections(client):
        loop = connection_loop(conn)
        if loop is not None:
            loops.add(loop)
    return loops


def async_pool_waits(pool: Any) -> list[Any]:
    """The asyncio lock and condition a ``redis.asyncio`` pool waits on (redis-py 6+'s lock,
    a blocking pool's condition and the lock inside it)."""
    waits = [getattr(pool, "_lock", None), getattr(pool, "_condition", None)]
    waits.append(getattr(waits[1], "_lock", None))
    return [wait for wait in waits if wait is not None]


def wait_loop(wait: Any) -> Any:
    """The event loop an asyncio lock or condition belongs to; None until a task first had to
    wait on it (asyncio binds it then, and raises on any other loop after)."""
    return getattr(wait, "_loop", None)


def close_elsewhere(conn: Any) -> None:
    """Close a ``redis.asyncio`` connection from outside its event loop, which is closed or
    not running, leaving the connection as its ``disconnect()`` does (it connects again at
    its next use, on the loop that uses it then). ``disconnect()`` cannot be awaited here:
    its streams belong to the other loop. Its transport's close is scheduled on that loop,
    as ``disconnect(nowait=True)`` does; on a closed loop that fails, and the socket is
    closed here, the transport told it has none (else, collected, it warns of a transport
    left open)."""
    writer = getattr(conn, "_writer", None)
    if writer is None:
        return
    parser = getattr(conn, "_parser", None)
    if parser is not None:
        parser.on_disconnect()
    conn._reader = conn._writer = None
    try:
        writer.close()
        return
    except RuntimeError:  # its loop is closed: the close it scheduled never runs
        pass
    transport = writer.transport
    # over TLS the stream's transport is an SSL transport over the socket's own
    tls = getattr(getattr(transport, "_ssl_protocol", None), "_transport", None)
    for each in (transport, tls):
        sock = getattr(each, "_sock", None)
        if each is not None and sock is not None:
            sock.close()
            each._sock = None


# -- Redis Cluster ----------------------------------------------------------------------
# ``RedisCluster.nodes_manager`` keeps the slot map: ``slots_cache`` (slot -> [primary,
# replicas...] ClusterNode), ``get_node_from_slot``, ``get_node``, ``initialize()`` (asks the
# cluster again). A MOVED reply is applied by ``move_slot`` (redis-py 5.3+, at once) or
# ``update_moved_exception`` (5.0 to 5.2, at the next ``get_node_from_slot``). Checked against
# 5.0 and 8.1.


def cluster_node_of(client: Any, slot: int) -> Any:
    """The primary serving ``slot`` (a ``ClusterNode``; raises when no node serves it)."""
    return client.nodes_manager.get_node_from_slot(slot)


def cluster_owner_name(client: Any, slot: int) -> str | None:
    """``host:port`` of the primary serving ``slot`` by the slot map as it is (no lookup that
    could apply a pending MOVED)."""
    nodes = client.nodes_manager.slots_cache.get(slot)
    return str(nodes[0].name) if nodes else None


def cluster_node_at(client: Any, host: str, port: int) -> Any:
    """The known node at ``host:port``, or None."""
    return client.nodes_manager.get_node(host=host, port=port)


def cluster_primaries(client: Any) -> list[Any]:
    return list(client.get_primaries())


def cluster_pool(client: Any, node: Any) -> Any:
    """The connection pool of ``node`` (its ``Redis`` client is made at first use)."""
    return client.get_redis_connection(node).connection_pool


def cluster_moved(client: Any, error: Any) -> bool:
    """Teach the slot map a MOVED reply (a redis-py ``MovedError``); False when this
    redis-py has no way to (then read the whole map again)."""
    nodes = client.nodes_manager
    if hasattr(nodes, "move_slot"):
        nodes.move_slot(error)
        return True
    if hasattr(nodes, "update_moved_exception"):
        nodes.update_moved_exception(error)
        return True
    return False


def cluster_refresh(client: Any) -> None:
    """Read the slot map again (``CLUSTER SLOTS``, from the known nodes)."""
    client.nodes_manager.initialize()


def cluster_node_name(node: Any) -> str:
    return str(node.name)


def cluster_connection_kwargs(client: Any) -> dict[str, Any]:
    """The keyword arguments the nodes' connections are built with."""
    kwargs: dict[str, Any] = getattr(client.nodes_manager, "connection_kwargs", {}) or {}
    return kwargs


def cluster_default_address(client: Any) -> tuple[Any, Any]:
    """(host, port) of the client's default node, or of its first startup node before it
    read the slot map (an asyncio client does at first use)."""
    node = client.get_default_node()
    if node is None:
        node = next(iter(client.nodes_manager.startup_nodes.values()))
    return node.host, node.port


def cluster_like(client: Any) -> Any:
    """A ``RedisCluster`` reaching the cluster through the node a plain ``redis.Redis``
    points at, with its options (timeouts, credentials, TLS). ``REDIS_ALLOWED_KEYS`` lists
    what a cluster passes on to its nodes; a cluster has only database 0, and takes no
    ``retry`` or ``connection_class`` of the plain kind."""
    from redis.cluster import KWARGS_DISABLED_KEYS, REDIS_ALLOWED_KEYS, RedisCluster
    from redis.connection import SSLConnection

    pool = client.connection_pool
    kwargs = dict(pool.connection_kwargs)
    options = {
        k: v
        for k, v in kwargs.items()
        if k in REDIS_ALLOWED_KEYS
        and k not in KWARGS_DISABLED_KEYS
        and k not in ("db", "retry", "connection_class")
    }
    if issubclass(pool.connection_class, SSLConnection):
        options["ssl"] = True
    return RedisCluster(host=kwargs.get("host", "localhost"), port=int(kwargs["port"]), **options)


# -- redis.asyncio Redis Cluster ----------------------------------------------------------
# ``redis.asyncio.cluster.RedisCluster`` keeps the same slot map (``nodes_manager.slots_cache``,
# ``get_node_from_slot``, ``get_node``), filled by the coroutine ``initialize()``. Its nodes
# have no connection pool: each ``ClusterNode`` hands out connections with the sync
# ``acquire_connection()`` and takes them back with ``release()`` (8.x; ``_free.append`` in
# 5.0, which ``release`` wraps later). A MOVED reply is applied by the coroutine
# ``move_slot`` (6.x and later) or, in 5.0, by setting ``_moved_exception``, which the next
# ``get_node_from_slot`` applies. Checked against 5.0 and 8.1. The slot map's sync lookups
# (``cluster_node_of``, ``cluster_owner_name``, ``cluster_node_at``, ``cluster_primaries``,
# ``cluster_node_name``) serve both clients.


def is_async_cluster_client(client: Any) -> bool:
    """A ``redis.asyncio.cluster.RedisCluster`` client."""
    from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster

    return isinstance(client, AsyncRedisCluster)


def async_cluster_ready(client: Any) -> bool:
    """Whether the client has read its slot map once (``initialize()`` awaited)."""
    return bool(client.nodes_manager.slots_cache)


async def async_cluster_initialize(client: Any) -> None:
    """The client's first ``initialize()`` (slot map and command table); a no-op after."""
    await client.initialize()


async def async_cluster_refresh(client: Any) -> None:
    """Read the slot map again (``CLUSTER SLOTS``, from the known nodes)."""
    await client.nodes_manager.initialize()


async def async_cluster_moved(client: Any, error: Any) -> bool:
    """Teach the slot map a MOVED reply; False when this redis-py has no way to."""
    nodes = client.nodes_manager
    move = getattr(nodes, "move_slot", None)
    if move is not None:
        result = move(error)
        if inspect.isawaitable(result):
            await result
        return True
    if hasattr(nodes, "_moved_exception"):
        nodes._moved_exception = error
        return True
    return False


def async_cluster_acquire(node: Any) -> Any:
    """A connection of ``node`` (a free one, or a new one not connected yet)."""
    return node.acquire_connection()


def async_cluster_release(node: Any, conn: Any) -> None:
    """Give a connection back to ``node``."""
    release = getattr(node, "release", None)
    if release is not None:
        release(conn)
    else:
        node._free.append(conn)


async def acluster_call_many(conn: Any, commands: Sequence[Sequence[Any]]) -> list[Any]:
    """:func:`acall_many` on a connection of an asyncio cluster node, which another task may
    close while the call is on it: redis-py 5.0 builds new ``ClusterNode`` objects at each
    slot-map refresh and closes the old ones' connections, in use or not. A connection closed
    (``disconnect(nowait=True)``) just after the call found it open makes redis.asyncio (5.0 to
    8.1) raise ``AttributeError`` (its stream is gone): the connection error it is."""
    try:
        return await acall_many(conn, commands)
    except AttributeError as exc:
        raise RedisConnectionError(f"connection closed while in use: {exc}") from exc


def async_cluster_connections(client: Any) -> list[Any]:
    """Every connection the client's nodes opened (for the event-loop check): those of the
    slot map's nodes, and of the startup nodes, which are other ``ClusterNode`` objects until
    a refresh replaces them (the first slot map is read through them, and the client's
    ``aclose()`` closes both)."""
    manager = client.nodes_manager
    nodes = {id(node): node for node in list(manager.nodes_cache.values())}
    for node in list(getattr(manager, "startup_nodes", {}).values()):
        nodes.setdefault(id(node), node)
    conns: list[Any] = []
    for node in nodes.values():
        conns.extend(getattr(node, "_connections", ()))
    return conns


def async_cluster_like(client: Any) -> Any:
    """A ``redis.asyncio.cluster.RedisCluster`` reaching the cluster through the node a
    plain ``redis.asyncio.Redis`` points at, with its options (timeouts, credentials, TLS):
    those of its connections that the asyncio ``RedisCluster`` takes as keywords (it has no
    ``**kwargs``, and passes them on to its nodes); not initialized yet (its first use awaits
    that)."""
    from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
    from redis.asyncio.connection import SSLConnection as AsyncSSLConnection

    pool = client.connection_pool
    kwargs = dict(pool.connection_kwargs)
    accepted = inspect.signature(AsyncRedisCluster.__init__).parameters
    options = {
        k: v
        for k, v in kwargs.items()
        if k in accepted
        and k not in ("self", "host", "port", "db", "path", "retry", "startup_nodes")
        and not k.startswith("connection_")
    }
    if issubclass(pool.connection_class, AsyncSSLConnection):
        options["ssl"] = True
    return AsyncRedisCluster(
        host=kwargs.get("host", "localhost"), port=int(kwargs["port"]), **options
    )


# -- the near cache's subscriber: a synchronous client of its own ---------------------------
# The near cache listens in a thread (see near.py), on a synchronous connection. For a
# ``redis.asyncio`` client, or a node of a Redis Cluster, it builds one from the options the
# client's connections are built with (``connection_pool.connection_kwargs``; a cluster's
# ``nodes_manager.connection_kwargs``; an asyncio Sentinel pool's ``sentinel_manager`` with its
# ``sentinels``, ``sentinel_kwargs``, ``min_other_sentinels``, ``connection_kwargs`` and the
# pool's ``service_name``; the sentinels' TLS options too, found by tests/test_tls.py: the twin
# asked TLS sentinels in plain TCP). Only plain options are carried over: the asyncio ones (``retry``,
# the maintenance-notification handlers, the connection class) have no sync meaning, and
# ``decode_responses`` is left out (the subscriber reads bytes). Checked against 5.0 and 8.1.

_PORTABLE = frozenset(
    {
        "host",
        "port",
        "db",
        "path",
        "username",
        "password",
        "credential_provider",
        "socket_timeout",
        "socket_connect_timeout",
        "socket_keepalive",
        "socket_keepalive_options",
        "client_name",
        "protocol",
        "lib_name",
        "lib_version",
    }
)


def sync_options(kwargs: dict[str, Any], *, ssl: bool = False) -> dict[str, Any]:
    """The options of ``kwargs`` a synchronous connection takes the same way (and its TLS
    ones, ``ssl_*``, when ``ssl``)."""
    return {
        k: v
        for k, v in kwargs.items()
        if v is not None and (k in _PORTABLE or (ssl and k.startswith("ssl_")))
    }


def sync_options_of(kwargs: dict[str, Any]) -> dict[str, Any]:
    """:func:`sync_options` of connection options that say themselves whether they are TLS
    (``ssl=True``, or an SSL connection class, sync or asyncio): then with ``ssl=True`` and
    the ``ssl_*`` ones."""
    from redis.asyncio.connection import SSLConnection as AsyncSSLConnection
    from redis.connection import SSLConnection

    connection_class = kwargs.get("connection_class")
    ssl = bool(kwargs.get("ssl")) or (
        isinstance(connection_class, type)
        and issubclass(connection_class, (SSLConnection, AsyncSSLConnection))
    )
    options = sync_options(kwargs, ssl=ssl)
    if ssl:
        options["ssl"] = True
    return options


def sync_twin(client: Any) -> redis.Redis:
    """A synchronous ``redis.Redis`` reaching the server a ``redis.asyncio.Redis`` reaches,
    with its options: a Sentinel one follows the same service through the same sentinels."""
    from redis.asyncio.connection import SSLConnection as AsyncSSLConnection
    from redis.asyncio.connection import UnixDomainSocketConnection as AsyncUnixConnection
    from redis.connection import ConnectionPool, SSLConnection, UnixDomainSocketConnection

    pool = client.connection_pool
    ssl = issubclass(pool.connection_class, AsyncSSLConnection)
    manager = getattr(pool, "sentinel_manager", None)
    if manager is not None:
        from redis.sentinel import Sentinel

        addresses = [
            (
                s.connection_pool.connection_kwargs["host"],
                s.connection_pool.connection_kwargs["port"],
            )
            for s in manager.sentinels
        ]
        # typed by redis-py 8.2 and later, not before: called through Any on every version
        make_sentinel: Any = Sentinel
        sentinel = make_sentinel(
            addresses,
            min_other_sentinels=manager.min_other_sentinels,
            # the sentinels' own: over TLS when they are, whatever the primary's connections
            sentinel_kwargs=sync_options_of(manager.sentinel_kwargs or {}),
            **sync_options(manager.connection_kwargs, ssl=ssl),
        )
        options = sync_options(pool.connection_kwargs, ssl=ssl)
        options.pop("host", None)
        options.pop("port", None)
        if ssl:
            options["ssl"] = True
        twin: redis.Redis = sentinel.master_for(pool.service_name, **options)
        return twin
    if issubclass(pool.connection_class, AsyncUnixConnection):
        connection_class: Any = UnixDomainSocketConnection
    elif ssl:
        connection_class = SSLConnection
    else:
        connection_class = redis.connection.Connection
    options = sync_options(pool.connection_kwargs, ssl=ssl)
    return redis.Redis(connection_pool=ConnectionPool(connection_class=connection_class, **options))


def cluster_addresses(client: Any) -> list[tuple[str, int]]:
    """(host, port) of every node a Redis Cluster client (sync or asyncio) knows, primaries
    and replicas (its startup nodes before it read the slot map)."""
    manager = client.nodes_manager
    nodes = list(manager.nodes_cache.values()) or list(manager.startup_nodes.values())
    return [(str(node.host), int(node.port)) for node in nodes]


def cluster_node_options(client: Any) -> dict[str, Any]:
    """What a plain ``redis.Redis`` at one of the cluster's nodes is built with: the nodes'
    timeouts, credentials and TLS options."""
    options = sync_options_of(dict(cluster_connection_kwargs(client)))
    options.pop("host", None)
    options.pop("port", None)
    options.pop("db", None)
    return options
