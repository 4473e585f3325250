"""Each redis-py internal in ``_redis_compat`` exercised on its own, against a real server.

When an upgrade of redis-py moves one of these internals, the failure shows up here, by function
name, rather than as a cache that quietly stops checking epochs or overlapping its locks.
"""

from __future__ import annotations

import contextlib
import urllib.parse
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.retry import Retry
from redis.sentinel import Sentinel

from sqlalchemy_writethrough import _redis_compat as compat
from sqlalchemy_writethrough import diagnostics
from stress.sentinel import SERVICE, SentinelGroup

from _sentinel import require_redis_server


@pytest.fixture
def pooled(redis_url: str) -> Iterator[tuple[redis.Redis, Any]]:
    """A client and one connection checked out of its pool (given back afterwards)."""
    client = redis.Redis.from_url(redis_url, socket_timeout=2)
    conn = compat.checkout_of(client.connection_pool)()
    try:
        yield client, conn
    finally:
        compat.release(client.connection_pool, conn)
        client.close()


def test_redis_version_is_parsed() -> None:
    assert compat.REDIS_VERSION >= (5, 0)


def test_a_plain_client_is_used_directly(redis_url: str) -> None:
    plain = redis.Redis.from_url(redis_url)
    single = redis.Redis.from_url(redis_url, single_connection_client=True)

    class Wrapped(redis.Redis):
        def execute_command(self, *args: Any, **options: Any) -> Any:
            return super().execute_command(*args, **options)

    wrapped = Wrapped.from_url(redis_url)
    try:
        assert compat.is_plain_client(plain)
        assert not compat.is_plain_client(single)
        assert not compat.is_plain_client(wrapped)
    finally:
        for client in (plain, single, wrapped):
            client.close()


def test_pool_kinds_and_connection_settings(redis_url: str) -> None:
    blocking = redis.Redis(
        connection_pool=redis.BlockingConnectionPool.from_url(redis_url, socket_timeout=0.5)
    )
    retrying = redis.Redis.from_url(
        redis_url,
        retry=Retry(NoBackoff(), 3, supported_errors=(RedisConnectionError,)),
        retry_on_error=[RedisConnectionError],
    )
    try:
        assert compat.pool_blocks(blocking.connection_pool)
        assert not compat.pool_blocks(retrying.connection_pool)
        assert compat.connection_kwargs(blocking)["socket_timeout"] == 0.5
        assert compat.retries(retrying) == 3
        assert compat.sentinel_kwargs(retrying) is None
    finally:
        blocking.close()
        retrying.close()


def test_lendable_connections_of_each_pool_kind(redis_url: str) -> None:
    plain = redis.ConnectionPool.from_url(redis_url, max_connections=40)
    default = redis.ConnectionPool.from_url(redis_url)
    blocking = redis.BlockingConnectionPool.from_url(redis_url, max_connections=40)

    class Subclass(redis.ConnectionPool):
        pass

    sentinel = Sentinel([("127.0.0.1", 1)]).master_for("nothing").connection_pool
    assert compat.lendable_connections(plain) == 10
    assert compat.lendable_connections(default) == default.max_connections // 4 > 0
    for other in (blocking, Subclass.from_url(redis_url), sentinel):
        assert compat.lendable_connections(other) == 0


def test_the_socket_of_a_connection(pooled: tuple[redis.Redis, Any]) -> None:
    _, conn = pooled
    sock = compat.socket_of(conn)
    assert sock is not None and sock.fileno() >= 0  # connected by the checkout
    compat.disconnect(conn)
    assert compat.socket_of(conn) is None
    compat.connect(conn)
    assert compat.socket_of(conn) is not None and compat.socket_of(conn) is not sock


def test_checkout_call_and_release(pooled: tuple[redis.Redis, Any], prefix: str) -> None:
    _, conn = pooled
    assert compat.call(conn, ("SET", f"{prefix}:a", "1")) in (b"OK", "OK", True)
    assert compat.call(conn, ("GET", f"{prefix}:a")) == b"1"
    with pytest.raises(ResponseError):
        compat.call(conn, ("INCR", f"{prefix}:a", "extra"))
    assert compat.call(conn, ("PING",)) in (b"PONG", "PONG", True)  # the connection is clean


def test_call_many_returns_error_replies_as_values(
    pooled: tuple[redis.Redis, Any], prefix: str
) -> None:
    _, conn = pooled
    replies = compat.call_many(
        conn, [("SET", f"{prefix}:b", "x"), ("INCR", f"{prefix}:b"), ("GET", f"{prefix}:b")]
    )
    assert isinstance(replies[1], ResponseError)
    assert replies[2] == b"x"


#: what Redis 6.2.16 replies when a script's write meets a replica (read off a real one)
_WRAPPED_READONLY = (
    "ERR Error running script (call to f_6d2834e7444a8c4aeb40506d1be1f97b49f27ece): "
    "@user_script:2: @user_script: 2: -READONLY You can't write against a read only replica."
)
_WRAPPED_NOREPLICAS = (
    "ERR Error running script (call to f_99ee2a8b3a9610e6aa1d0b2d8c0a50b10c9b01a7): "
    "@user_script:154: @user_script: 154: -NOREPLICAS Not enough good replicas to write."
)


def _replying(error: str) -> tuple[str, ...]:
    """A script whose reply is ``error`` as the server sends it (Redis 7 here)."""
    return ("EVAL", "return redis.error_reply(ARGV[1])", "0", error)


def test_a_scripts_error_wrapped_as_redis_6_2_wraps_it_is_the_one_redis_7_gives(
    pooled: tuple[redis.Redis, Any],
) -> None:
    """Redis 6.2 reports a refusal met inside a script under ERR; 7.0 under its own code,
    which redis-py maps to its class. The cache classifies both alike (a demoted primary, a
    primary short of replicas). Seen failing before on Redis 6.2: the Sentinel tests that
    expect a retry and a remedy."""
    from redis.exceptions import ReadOnlyError

    _, conn = pooled
    with pytest.raises(ReadOnlyError, match=r"^You can't write against a read only replica"):
        compat.call(conn, _replying(_WRAPPED_READONLY))
    replies = compat.call_many(conn, [_replying(_WRAPPED_NOREPLICAS), ("PING",)])
    assert type(replies[0]) is ResponseError
    assert str(replies[0]).startswith("NOREPLICAS Not enough good replicas")
    assert "min-replicas-to-write" in (diagnostics.hint_for(replies[0]) or "")
    # any other error is left as redis-py made it
    other = "ERR Error running script (call to f_0): @user_script:1: not an error code"
    with pytest.raises(ResponseError, match=r"^Error running script"):
        compat.call(conn, _replying(other))
    assert compat.call(conn, ("PING",)) in (b"PONG", "PONG", True)  # the connection is clean


def test_a_wrapped_readonly_on_a_sentinel_primary_is_a_closed_connection() -> None:
    """redis-py closes a ``master_for()`` connection on a READONLY it parsed (the primary was
    demoted) so that the retry asks the sentinels; a script's READONLY, wrapped by Redis 6.2,
    must do the same, synchronously and on redis.asyncio."""
    import asyncio

    import redis.asyncio
    import redis.asyncio.sentinel

    require_redis_server()
    with SentinelGroup(replicas=0, sentinels=1) as group:
        client = Sentinel(group.addresses).master_for(SERVICE, socket_timeout=2)
        conn = compat.checkout_of(client.connection_pool)()
        try:
            for action in (compat.call, lambda c, a: compat.call_many(c, [a])):
                compat.connect(conn)
                with pytest.raises(RedisConnectionError, match="previous master"):
                    action(conn, _replying(_WRAPPED_READONLY))
                assert compat.socket_of(conn) is None  # closed: the next connect asks again
        finally:
            compat.release(client.connection_pool, conn)
            client.close()

        async def on_asyncio() -> None:
            sentinel = redis.asyncio.sentinel.Sentinel(group.addresses)
            aclient = sentinel.master_for(SERVICE, socket_timeout=2)
            aconn = await compat.async_checkout_of(aclient.connection_pool)()
            try:
                for action in (compat.acall, lambda c, a: compat.acall_many(c, [a])):
                    await compat.aconnect(aconn)
                    with pytest.raises(RedisConnectionError, match="previous master"):
                        await action(aconn, _replying(_WRAPPED_READONLY))
                    assert not aconn.is_connected
            finally:
                await compat.arelease(aclient.connection_pool, aconn)
                await aclient.aclose()
                for each in sentinel.sentinels:
                    await each.aclose()

        asyncio.run(on_asyncio())


def test_commands_are_packed_as_redis_py_packs_them(pooled: tuple[redis.Redis, Any]) -> None:
    """:func:`compat.pack` writes the bytes redis-py's Python packer writes; it takes over
    only where that packer is the connection's (``_command_packer``), so an upgrade that
    renames either shows here."""
    _, conn = pooled
    from redis.connection import PythonRespSerializer

    commands: list[tuple[Any, ...]] = [
        ("MGET", "wt:{t:1}:42", "wt:{t:1}"),
        ("EVALSHA", "ab" * 20, 2, "k\u00e9y", b"\x00\xffbinary", -7, "x" * 10_000),
        ("MSET", "y" * 255, b"z" * 256, "", 2**70),  # about the made-once length headers
        ("SET", "a", 1.5),  # a float: redis-py's packer
        ("CONFIG GET", "maxmemory"),  # a command name with a space: redis-py's packer
    ]
    packer = conn._command_packer
    assert type(packer) is PythonRespSerializer or packer.__class__.__name__.startswith("Hiredis")
    if type(packer) is not PythonRespSerializer:
        pytest.skip("hiredis packs: compat.pack keeps redis-py's packer")
    for command in commands:
        assert b"".join(compat.pack(conn, command)) == b"".join(conn.pack_command(*command))
    assert b"".join(compat.pack_many(conn, commands[:2])) == b"".join(
        conn.pack_commands(commands[:2])
    )
    assert b"".join(compat.pack_many(conn, commands)) == b"".join(conn.pack_commands(commands))
    assert len(compat.pack(conn, commands[0])) == 1  # one buffer: one sendall


@pytest.mark.parametrize("protocol", [2, 3])
@pytest.mark.parametrize("decode", [False, True])
def test_an_mget_reply_is_read_as_redis_py_reads_it(
    redis_url: str, prefix: str, protocol: int, decode: bool
) -> None:
    """:func:`compat.read_values` (an ``MGET``'s reply read from the buffer) returns what
    redis-py's own parser returns, leaves the next reply in the buffer, and takes over only
    where the private parser, socket buffer and ``read_response`` are the ones it knows."""
    client = redis.Redis.from_url(
        redis_url, protocol=protocol, socket_timeout=2, decode_responses=decode
    )
    conn = compat.checkout_of(client.connection_pool)()
    try:
        conn.connect()
        if not decode and "Hiredis" not in type(conn._parser).__name__:
            # what read_values stands on (with hiredis, redis-py parses in C: it keeps it)
            import io

            assert type(conn._parser) in compat._PYTHON_PARSERS
            assert type(conn._parser._buffer) is compat._SOCKET_BUFFER
            assert type(conn._parser._buffer._buffer) is io.BytesIO
            assert type(conn).read_response is compat._PLAIN_READ_RESPONSE
        values = {
            f"{prefix}:empty": "",
            f"{prefix}:crlf": "a\r\n$3\r\n_\r\n" * 3,
            f"{prefix}:big": "x" * 300_000,  # several reads from the socket
        }
        values.update({f"{prefix}:{i}": f"v{i}" for i in range(200)})
        client.mset(values)
        keys = [*values, f"{prefix}:absent", f"{prefix}:big", f"{prefix}:absent2"]
        for command in (("MGET", *keys), ("MGET", f"{prefix}:absent")):
            got = compat.call(conn, command)
            conn.send_command(*command)
            assert got == conn.read_response()
        assert got == [None]
        # two replies in the buffer at once: the second stays for the next read
        conn.send_packed_command(
            conn.pack_commands(
                [("MGET", f"{prefix}:1", f"{prefix}:absent"), ("MGET", f"{prefix}:2")]
            )
        )
        first, second = compat.read_values(conn), compat.read_values(conn)
        assert [first, second] in (
            [[b"v1", None], [b"v2"]],
            [["v1", None], ["v2"]],
        )
        with pytest.raises(ResponseError):  # an error reply: redis-py's parser reads it
            compat.call(conn, ("MGET",))
        assert compat.call(conn, ("PING",)) in (b"PONG", "PONG", True)  # the connection is clean
    finally:
        compat.release(client.connection_pool, conn)
        client.delete(*[f"{prefix}:{k}" for k in ("empty", "crlf", "big")])
        client.delete(*[f"{prefix}:{i}" for i in range(200)])
        client.close()


def test_an_mget_reply_that_does_not_come_closes_the_connection(redis_url: str) -> None:
    """A read that times out raises redis-py's ``TimeoutError`` and closes the socket, as
    ``read_response`` does (a late reply must never be read as the next command's)."""
    client = redis.Redis.from_url(redis_url, socket_timeout=0.2)
    conn = compat.checkout_of(client.connection_pool)()
    try:
        conn.connect()
        with pytest.raises(redis.exceptions.TimeoutError):
            compat.read_values(conn)  # nothing was sent: nothing comes
        assert conn._sock is None
        assert compat.call(conn, ("MGET", "no-such-key")) == [None]  # reconnects
    finally:
        compat.release(client.connection_pool, conn)
        client.close()


def test_a_garbled_mget_reply_is_a_redis_error_and_closes_the_connection(redis_url: str) -> None:
    """A reply whose length header is not a number (a broken proxy or middlebox: a loopback
    relay to the real server here, which garbles the MGET's reply) raises a ``RedisError``,
    which the cache counts as Redis failing, not the ``ValueError`` of parsing it, and the
    connection is closed."""
    import socket
    import threading

    from _proxy import upstream_of

    _, upstream_port = upstream_of(redis_url)  # plain TCP only
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(5)

    def relay() -> None:  # one request at a time, as the test sends them
        with contextlib.suppress(OSError):
            peer, _ = listener.accept()
            upstream = socket.create_connection(("127.0.0.1", upstream_port), timeout=5)
            with peer, upstream:
                while request := peer.recv(65536):
                    if b"MGET" in request:
                        peer.sendall(b"*1\r\n$zz\r\nabc\r\n")
                        continue
                    upstream.sendall(request)
                    peer.sendall(upstream.recv(65536))

    server = threading.Thread(target=relay, daemon=True)
    server.start()
    client = redis.Redis(port=listener.getsockname()[1], socket_timeout=2)
    conn = compat.checkout_of(client.connection_pool)()
    try:
        conn.connect()
        if not _python_parser(conn):
            pytest.skip("hiredis parses the reply: read_values leaves it to redis-py")
        conn.send_command("MGET", "k")
        with pytest.raises(redis.exceptions.RedisError):
            compat.read_values(conn)
        assert conn._sock is None
    finally:
        compat.release(client.connection_pool, conn)
        client.close()
        listener.close()
        server.join(5)


def _python_parser(conn: Any) -> bool:
    """Whether redis-py parses this connection's replies in Python (not hiredis): where
    read_values reads from the buffer."""
    return type(conn._parser) in compat._PYTHON_PARSERS


@pytest.mark.parametrize("protocol", [2, 3])
@pytest.mark.parametrize("read_size", [1, 7, 1000])
def test_an_mget_reply_over_many_socket_reads(
    redis_url: str, prefix: str, protocol: int, read_size: int
) -> None:
    """A reply that comes in many pieces (each ``recv`` at most ``socket_read_size`` bytes):
    every split point, inside a header, a value, a CRLF or a RESP3 null, gives redis-py's
    answer, and the next reply on the connection is read right."""
    client = redis.Redis.from_url(
        redis_url, protocol=protocol, socket_timeout=5, socket_read_size=read_size
    )
    values = {f"{prefix}:empty": b"", f"{prefix}:crlf": b"$3\r\n_\r\n*2\r\n"}
    values.update({f"{prefix}:{i}": b"v%d" % i * (i % 5) for i in range(60)})
    if read_size > 1:
        values[f"{prefix}:64k"] = b"k" * (65536 + 7)
        values[f"{prefix}:1m"] = b"m" * (1 << 20)
    keys = [f"{prefix}:absent", *values, f"{prefix}:absent2"]
    conn = compat.checkout_of(client.connection_pool)()
    try:
        client.mset(values)
        assert compat.call(conn, ("MGET", *keys)) == [None, *values.values(), None]
        assert compat.call(conn, ("MGET", f"{prefix}:absent")) == [None]
        assert compat.call(conn, ("PING",)) in (b"PONG", True)  # the connection is clean
    finally:
        compat.release(client.connection_pool, conn)
        client.close()


def test_a_large_value_is_read_in_one_go_once_its_length_is_known(
    redis_url: str, prefix: str
) -> None:
    """The rest of a value whose length the buffer holds is read in one call, not one
    socket read (and one scan of everything buffered so far) at a time: a value of n socket
    reads cost n copies of the growing buffer, quadratic (32 MiB: 10 s against redis-py's
    0.1 s)."""
    client = redis.Redis.from_url(redis_url, socket_timeout=5, socket_read_size=4096)
    conn = compat.checkout_of(client.connection_pool)()
    try:
        big = b"b" * (1 << 20)
        client.set(f"{prefix}:big", big)
        conn.connect()
        if not _python_parser(conn):
            pytest.skip("hiredis parses the reply: read_values keeps redis-py's parser")
        source = conn._parser._buffer
        reads = []
        read_from_socket = source._read_from_socket

        def counted(*args: Any, **kwargs: Any) -> Any:
            reads.append(args)
            return read_from_socket(*args, **kwargs)

        source._read_from_socket = counted
        assert compat.call(conn, ("MGET", f"{prefix}:big", f"{prefix}:absent")) == [big, None]
        assert len(reads) <= 3  # its header (and a first piece), the rest, the next key's
    finally:
        compat.release(client.connection_pool, conn)
        client.close()


def test_an_mget_reply_dribbled_byte_by_byte(redis_url: str, prefix: str) -> None:
    """Through a proxy that passes Redis's replies on one byte per ``send``."""
    from _proxy import LoopbackProxy, upstream_of

    plain = redis.Redis.from_url(redis_url)
    proxy = LoopbackProxy(upstream_of(redis_url), chunk=1)
    values = {f"{prefix}:{i}": b"x\r\n" * i for i in range(12)}
    try:
        plain.mset(values)
        for protocol in (2, 3):
            client = redis.Redis.from_url(proxy.url, socket_timeout=5, protocol=protocol)
            conn = compat.checkout_of(client.connection_pool)()
            try:
                keys = [f"{prefix}:absent", *values]
                assert compat.call(conn, ("MGET", *keys)) == [None, *values.values()]
                assert compat.call(conn, ("PING",)) in (b"PONG", True)
            finally:
                compat.release(client.connection_pool, conn)
                client.close()
    finally:
        proxy.close()
        plain.close()


@pytest.mark.parametrize("protocol", [2, 3])
def test_an_mget_reply_that_stalls_half_way_closes_the_connection(
    redis_url: str, prefix: str, protocol: int
) -> None:
    """A reply cut off half-way (the server or the network stalls longer than
    ``socket_timeout``): a ``TimeoutError``, the connection closed with its half reply, and
    the pool's next read (a new connection) gets the right values, never the rest of the
    first reply."""
    from _proxy import LoopbackProxy, upstream_of

    plain = redis.Redis.from_url(redis_url)
    first = {f"{prefix}:a{i}": b"first %d " % i * 300 for i in range(20)}
    second = {f"{prefix}:b{i}": b"second %d" % i for i in range(20)}
    plain.mset({**first, **second})
    proxy = LoopbackProxy(upstream_of(redis_url), stall_after=5000)
    client = redis.Redis.from_url(proxy.url, socket_timeout=0.3, protocol=protocol)
    pool = client.connection_pool
    try:
        conn = compat.checkout_of(pool)()
        try:
            with pytest.raises(redis.exceptions.TimeoutError):
                compat.call(conn, ("MGET", *first))
            assert conn._sock is None
        finally:
            compat.release(pool, conn)
        proxy.stall_after = None
        conn = compat.checkout_of(pool)()
        try:
            assert compat.call(conn, ("MGET", *second)) == list(second.values())
            assert compat.call(conn, ("MGET", *first)) == list(first.values())
        finally:
            compat.release(pool, conn)
    finally:
        client.close()
        proxy.close()
        plain.close()


def test_send_now_read_later(pooled: tuple[redis.Redis, Any], prefix: str) -> None:
    _, conn = pooled
    compat.send(conn, ("INCRBY", f"{prefix}:c", 5))
    assert compat.read(conn) == 5


def test_with_retry_reconnects_a_dropped_connection(redis_url: str, prefix: str) -> None:
    client = redis.Redis.from_url(
        redis_url,
        retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        retry_on_error=[RedisConnectionError],
    )
    conn = compat.checkout_of(client.connection_pool)()
    try:
        compat.call(conn, ("PING",))
        killed = compat.call(conn, ("CLIENT", "ID"))
        with redis.Redis.from_url(redis_url) as admin:
            admin.execute_command("CLIENT", "KILL", "ID", killed)
        # the first attempt fails on the killed socket; the retry reconnects and succeeds
        assert compat.with_retry(conn, compat.call, ("INCR", f"{prefix}:d")) == 1
        assert compat.call(conn, ("CLIENT", "ID")) != killed
    finally:
        compat.release(client.connection_pool, conn)
        client.close()


def test_disconnect_connect_and_connect_callbacks(pooled: tuple[redis.Redis, Any]) -> None:
    _, conn = pooled

    class Listener:
        def __init__(self) -> None:
            self.seen: list[Any] = []

        def connected(self, connection: Any) -> None:
            self.seen.append(connection)

    listener = Listener()
    compat.call(conn, ("PING",))
    compat.on_connect(conn, listener.connected)
    compat.disconnect(conn)
    compat.connect(conn)
    assert listener.seen == [conn]
    compat.reconnect(conn)  # a plain connection: closed, reopened at its next command
    assert compat.call(conn, ("PING",)) in (b"PONG", "PONG", True)
    assert compat.peer(conn)[1] == conn.port
    assert not compat.is_sentinel_managed(conn)
    assert not compat.follows_sentinel_primary(conn)


def test_sentinel_managed_connections_know_the_primary() -> None:
    require_redis_server()
    with SentinelGroup(replicas=0, sentinels=1) as group:
        sentinel = Sentinel(group.addresses, sentinel_kwargs={"socket_timeout": 0.7})
        client = sentinel.master_for(SERVICE, socket_timeout=0.5)
        conn = compat.checkout_of(client.connection_pool)()
        try:
            compat.connect(conn)
            assert compat.is_sentinel_managed(conn)
            assert compat.follows_sentinel_primary(conn)
            assert compat.sentinel_primary(conn) == ("127.0.0.1", group.servers[0].port)
            assert compat.peer(conn) == compat.sentinel_primary(conn)
            assert (compat.sentinel_kwargs(client) or {}).get("socket_timeout") == 0.7
        finally:
            compat.release(client.connection_pool, conn)
            client.close()


def test_the_same_internals_on_redis_asyncio(redis_url: str, prefix: str) -> None:
    """The redis.asyncio twins: checkout, one command, a batch with error replies as values,
    send now and read later, retry, release, and which loop the connections belong to."""
    import asyncio

    import redis.asyncio

    async def scenario() -> None:
        client = redis.asyncio.Redis.from_url(redis_url, socket_timeout=2)
        blocking = redis.asyncio.Redis(
            connection_pool=redis.asyncio.BlockingConnectionPool.from_url(redis_url)
        )
        assert compat.is_async_client(client) and not compat.is_async_client(redis.Redis())
        assert compat.is_plain_async_client(client)
        assert compat.async_pool_blocks(blocking.connection_pool)
        assert not compat.async_pool_blocks(client.connection_pool)
        pool = client.connection_pool
        conn = await compat.async_checkout_of(pool)()
        try:
            assert await compat.awith_retry(conn, compat.acall, ("INCR", f"{prefix}:a")) == 1
            replies = await compat.acall_many(conn, [("INCR", f"{prefix}:a", "x"), ("PING",)])
            assert isinstance(replies[0], ResponseError) and replies[1] in (b"PONG", "PONG")
            await compat.asend(conn, ("INCR", f"{prefix}:a"))
            assert await compat.aread(conn) == 2
            assert compat.bound_loops(client) == {asyncio.get_running_loop()}
            await compat.areconnect(conn)
            await compat.adisconnect(conn)
            await compat.aconnect(conn)
            compat.close_now(conn)
        finally:
            await compat.arelease(pool, conn)
            await client.aclose()
            await blocking.aclose()

    asyncio.run(scenario())


def test_which_event_loop_redis_asyncio_objects_belong_to(redis_url: str) -> None:
    """A pool's connections, idle and checked out, and the loop each belongs to; the lock or
    condition a blocking pool waits on, bound to the loop where a task first waited; a
    connection of a closed loop, and one of an idle loop, closed from another and connected
    again there."""
    import asyncio

    import redis.asyncio

    client = redis.asyncio.Redis.from_url(redis_url, socket_timeout=2)
    blocking = redis.asyncio.Redis(
        connection_pool=redis.asyncio.BlockingConnectionPool.from_url(
            redis_url, max_connections=1, timeout=5
        )
    )
    first, second, third = (asyncio.new_event_loop() for _ in range(3))

    async def scenario() -> Any:
        pool = client.connection_pool
        assert compat.async_pool_connections(pool) == []
        conn = await compat.async_checkout_of(pool)()
        await compat.acall(conn, ("PING",))
        assert compat.async_pool_connections(pool) == [conn]  # checked out
        assert compat.async_idle_connections(client) == []
        assert compat.connection_loop(conn) is asyncio.get_running_loop()
        await compat.arelease(pool, conn)
        assert compat.async_client_connections(client) == [conn]  # idle
        assert compat.async_connections(client) == [conn]
        assert compat.async_idle_connections(client) == [conn]
        assert compat.bound_loops(client) == {asyncio.get_running_loop()}

        waits = compat.async_pool_waits(blocking.connection_pool)
        assert waits and all(compat.wait_loop(w) is None for w in waits)
        await asyncio.gather(blocking.ping(), blocking.ping())  # the second waits
        assert asyncio.get_running_loop() in {compat.wait_loop(w) for w in waits}
        return conn

    async def again(conn: Any) -> None:
        assert compat.connection_loop(conn) is None
        assert await compat.acall(conn, ("PING",)) in (True, b"PONG", "PONG")
        assert compat.connection_loop(conn) is asyncio.get_running_loop()

    try:
        conn = first.run_until_complete(scenario())
        first.close()
        compat.close_elsewhere(conn)  # its loop is closed
        second.run_until_complete(again(conn))
        compat.close_elsewhere(conn)  # its loop (`second`) is open, not running
        third.run_until_complete(again(conn))
        second.run_until_complete(asyncio.sleep(0))  # the close scheduled there
        third.run_until_complete(client.aclose())
        for other in compat.async_pool_connections(blocking.connection_pool):
            compat.close_elsewhere(other)  # of `first`, closed
        third.run_until_complete(blocking.aclose())
    finally:
        for loop in (first, second, third):
            loop.close()


# -- Redis Cluster ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_node_cluster() -> Iterator[Any]:
    """A one-node Redis Cluster (every slot on it) and a ``RedisCluster`` client."""
    from redis.cluster import RedisCluster

    from stress.cluster import ClusterGroup

    require_redis_server()
    with ClusterGroup(primaries=1, replicas=0) as group:
        client = RedisCluster(host="127.0.0.1", port=group.ports[0], socket_timeout=2)
        try:
            yield group, client
        finally:
            client.close()


def test_the_cluster_slot_map(one_node_cluster: Any) -> None:
    group, client = one_node_cluster
    name = f"127.0.0.1:{group.ports[0]}"
    node = compat.cluster_node_of(client, 1234)
    assert compat.cluster_node_name(node) == name
    assert compat.cluster_owner_name(client, 1234) == name
    assert [compat.cluster_node_name(n) for n in compat.cluster_primaries(client)] == [name]
    assert compat.cluster_node_at(client, "127.0.0.1", group.ports[0]) is node
    assert compat.cluster_node_at(client, "127.0.0.1", 1) is None
    assert compat.cluster_default_address(client) == ("127.0.0.1", group.ports[0])
    assert compat.cluster_connection_kwargs(client)["socket_timeout"] == 2
    pool = compat.cluster_pool(client, node)
    conn = compat.checkout_of(pool)()
    try:
        assert compat.call(conn, ("PING",)) in (True, b"PONG", "PONG")
    finally:
        compat.release(pool, conn)


def test_a_moved_reply_teaches_the_slot_map_and_a_refresh_restores_it(
    one_node_cluster: Any,
) -> None:
    from redis.exceptions import MovedError

    group, client = one_node_cluster
    assert compat.cluster_moved(client, MovedError("1234 127.0.0.1:1"))
    assert compat.cluster_node_name(compat.cluster_node_of(client, 1234)) == "127.0.0.1:1"
    compat.cluster_refresh(client)
    assert compat.cluster_owner_name(client, 1234) == f"127.0.0.1:{group.ports[0]}"


def test_a_cluster_client_like_a_plain_one(one_node_cluster: Any) -> None:
    group, _ = one_node_cluster
    plain = redis.Redis(host="127.0.0.1", port=group.ports[0], socket_timeout=1.5, db=0)
    cluster = compat.cluster_like(plain)
    try:
        assert compat.cluster_connection_kwargs(cluster)["socket_timeout"] == 1.5
        cluster.set("compat-key", b"v")
        assert cluster.get("compat-key") == b"v"
    finally:
        cluster.close()
        plain.close()


def test_the_asyncio_cluster_client_internals(one_node_cluster: Any) -> None:
    """``redis.asyncio.cluster``: the slot map (read by a coroutine, at first use), a node's
    connections (no pool), a MOVED reply learnt and a refresh, the loops its connections
    belong to."""
    import asyncio

    from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
    from redis.exceptions import MovedError

    group, _ = one_node_cluster
    port = group.ports[0]
    name = f"127.0.0.1:{port}"

    async def scenario() -> None:
        client = AsyncRedisCluster(host="127.0.0.1", port=port, socket_timeout=2)
        try:
            assert compat.is_async_cluster_client(client)
            assert not compat.is_async_client(client)
            assert compat.cluster_default_address(client) == ("127.0.0.1", port)
            assert not compat.async_cluster_ready(client)
            await compat.async_cluster_initialize(client)
            assert compat.async_cluster_ready(client)
            node = compat.cluster_node_of(client, 1234)
            assert compat.cluster_node_name(node) == name
            assert compat.cluster_owner_name(client, 1234) == name
            assert [compat.cluster_node_name(n) for n in compat.cluster_primaries(client)] == [name]
            assert compat.cluster_node_at(client, "127.0.0.1", port) is node
            assert compat.cluster_connection_kwargs(client)["socket_timeout"] == 2

            conn = compat.async_cluster_acquire(node)
            try:
                assert await compat.acall(conn, ("PING",)) in (True, b"PONG", "PONG")
                assert compat.peer(conn) == ("127.0.0.1", port)
            finally:
                compat.async_cluster_release(node, conn)
            again = compat.async_cluster_acquire(node)
            compat.async_cluster_release(node, again)
            assert again is conn  # released connections are handed out again
            assert conn in compat.async_cluster_connections(client)
            assert conn in compat.async_connections(client)
            assert compat.bound_loops(client) == {asyncio.get_running_loop()}

            assert await compat.async_cluster_moved(client, MovedError("1234 127.0.0.1:1"))
            moved = compat.cluster_node_of(client, 1234)
            assert compat.cluster_node_name(moved) == "127.0.0.1:1"
            await compat.async_cluster_refresh(client)
            assert compat.cluster_owner_name(client, 1234) == name
        finally:
            await client.aclose()

    asyncio.run(scenario())


def test_an_asyncio_cluster_client_like_a_plain_one(one_node_cluster: Any) -> None:
    import asyncio

    import redis.asyncio

    group, _ = one_node_cluster

    async def scenario() -> None:
        plain = redis.asyncio.Redis(host="127.0.0.1", port=group.ports[0], socket_timeout=1.5)
        cluster = compat.async_cluster_like(plain)
        try:
            assert compat.is_async_cluster_client(cluster)
            await compat.async_cluster_initialize(cluster)
            assert compat.cluster_connection_kwargs(cluster)["socket_timeout"] == 1.5
            await cluster.set("compat-async-key", b"v")
            assert await cluster.get("compat-async-key") == b"v"
        finally:
            await cluster.aclose()
            await plain.aclose()

    asyncio.run(scenario())


def test_an_asyncio_cluster_connection_closed_while_in_use_is_a_connection_error(
    one_node_cluster: Any,
) -> None:
    """Another task closes a connection (``disconnect(nowait=True)``, as redis-py does after a
    failed command, and as 5.0's slot-map refresh does to the nodes it replaces) just after a
    call found it open: redis.asyncio then raises ``AttributeError`` (its stream is gone);
    the call must fail as the connection error it is."""
    import asyncio

    from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster

    group, _ = one_node_cluster

    async def scenario() -> list[Any]:
        client = AsyncRedisCluster(host="127.0.0.1", port=group.ports[0], socket_timeout=2)
        try:
            await compat.async_cluster_initialize(client)
            node = compat.cluster_node_of(client, 0)
            conn = compat.async_cluster_acquire(node)
            await compat.acall(conn, ("PING",))  # connected
            call = asyncio.ensure_future(compat.acluster_call_many(conn, [("PING",)]))
            close = asyncio.ensure_future(conn.disconnect(nowait=True))
            outcomes = await asyncio.gather(call, close, return_exceptions=True)
            compat.async_cluster_release(node, conn)
            return outcomes
        finally:
            await client.aclose()

    got, _ = asyncio.run(scenario())
    assert isinstance(got, (list, RedisConnectionError)), repr(got)


# -- the near cache's subscriber clients ------------------------------------------------


def test_a_sync_twin_of_an_asyncio_client_reaches_the_same_server_with_its_options(
    redis_url: str,
) -> None:
    """``connection_pool.connection_kwargs`` and ``connection_class`` of a redis.asyncio
    client: the twin keeps host, port, db, timeouts and credentials, reads bytes, and drops
    the asyncio-only options."""
    import redis.asyncio

    url = urllib.parse.urlsplit(redis_url)._replace(path="/3").geturl()  # query kept (TLS)
    client = redis.asyncio.Redis.from_url(
        url, socket_timeout=1.25, client_name="twin-test", decode_responses=True
    )
    twin = compat.sync_twin(client)
    try:
        kwargs = twin.connection_pool.connection_kwargs
        assert kwargs["socket_timeout"] == 1.25 and kwargs["db"] == 3
        assert kwargs["client_name"] == "twin-test"
        assert "retry" not in kwargs and "decode_responses" not in kwargs
        assert twin.connection_pool.connection_class is (
            redis.connection.SSLConnection
            if url.startswith("rediss:")
            else redis.connection.Connection
        )
        twin.set("compat-twin", "v")
        assert twin.get("compat-twin") == b"v"
        assert twin.client_getname() == "twin-test"
        twin.delete("compat-twin")
    finally:
        twin.close()


def test_a_sync_twin_of_an_asyncio_sentinel_client_follows_the_same_service() -> None:
    """``sentinel_manager`` (``sentinels``, ``sentinel_kwargs``, ``min_other_sentinels``,
    ``connection_kwargs``) and ``service_name`` of an asyncio Sentinel pool."""
    from redis.asyncio.sentinel import Sentinel as AsyncSentinel

    require_redis_server()
    with SentinelGroup(replicas=0, sentinels=1) as group:
        sentinel = AsyncSentinel(group.addresses, sentinel_kwargs={"socket_timeout": 0.7})
        client = sentinel.master_for(SERVICE, socket_timeout=0.5)
        twin = compat.sync_twin(client)
        try:
            kwargs = dict(compat.sentinel_kwargs(twin) or {})
            # redis-py 8.2 and later give the sync sentinels a retry policy of their own
            retry = kwargs.pop("retry", None)
            assert retry is None or isinstance(retry, Retry)
            assert kwargs == {"socket_timeout": 0.7}
            assert twin.connection_pool.service_name == SERVICE
            assert twin.connection_pool.connection_kwargs["socket_timeout"] == 0.5
            conn = compat.checkout_of(twin.connection_pool)()
            try:
                compat.connect(conn)
                assert compat.sentinel_primary(conn) == ("127.0.0.1", group.servers[0].port)
            finally:
                compat.release(twin.connection_pool, conn)
        finally:
            twin.close()


def test_a_cluster_nodes_addresses_and_options(one_node_cluster: Any) -> None:
    """``nodes_manager.nodes_cache`` / ``startup_nodes`` and the nodes' connection kwargs,
    of both cluster clients."""
    import asyncio

    from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster

    group, client = one_node_cluster
    address = ("127.0.0.1", group.ports[0])
    assert compat.cluster_addresses(client) == [address]
    options = compat.cluster_node_options(client)
    assert options["socket_timeout"] == 2 and "host" not in options and "retry" not in options
    node = redis.Redis(host=address[0], port=address[1], **options)
    try:
        assert node.ping()
    finally:
        node.close()
    aclient = AsyncRedisCluster(host="127.0.0.1", port=group.ports[0], socket_timeout=1.5)
    assert compat.cluster_addresses(aclient) == [address]  # startup nodes, before reading
    options = compat.cluster_node_options(aclient)
    assert options["socket_timeout"] == 1.5 and "connection_class" not in options
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(compat.async_cluster_initialize(aclient))
        assert compat.cluster_addresses(aclient) == [address]
        loop.run_until_complete(aclient.aclose())
    finally:
        loop.close()


def test_a_whole_mget_reply_is_split_once_and_read_as_element_by_element() -> None:
    """``_whole_values`` (a reply wholly in the buffer, split on CRLF at once) gives what the
    element-by-element reading gives, for values full of CRLFs, headers and nulls of both
    protocols, and None (left to that reading) for a part of a reply, a reply followed by
    more bytes, or a garbled header."""
    import random

    rnd = random.Random(15)
    alphabet = [b"\r", b"\n", b"\r\n", b"$", b"_", b"a", b"-1", b"*", b"0", b"$-1\r\n"]
    for _ in range(3000):
        values: list[bytes | None] = []
        for _ in range(rnd.randint(0, 6)):
            if rnd.random() < 0.15:
                values.append(None)
            elif rnd.random() < 0.05:
                values.append(b"x" * rnd.randint(4090, 4100))  # past the headers made once
            else:
                values.append(b"".join(rnd.choice(alphabet) for _ in range(rnd.randint(0, 8))))
        null = b"_\r\n" if rnd.random() < 0.5 else b"$-1\r\n"
        data = b"*%d\r\n" % len(values) + b"".join(
            null if v is None else b"$%d\r\n%s\r\n" % (len(v), v) for v in values
        )
        parsed: list[bytes | None] = []
        assert compat._parse_values(data, parsed, -1) == (len(values), len(data), 0)
        assert compat._whole_values(data) == parsed == values
        cut = rnd.randint(0, len(data) - 1)
        assert compat._whole_values(data[:cut]) is None
        for more in (b"*1\r\n$1\r\nz\r\n", b"$1\r\nz\r\n", null, b">2\r\n"):
            assert compat._whole_values(data + more) is None
    assert compat._whole_values(b"*1\r\n$zz\r\nabc\r\n") is None
    assert compat._whole_values(b"*1\r\n$4\r\nabc\r\n") is None
    assert compat._whole_values(b"-ERR wrong\r\n") is None
    assert compat._whole_values(b"*-1\r\n") is None


def test_a_whole_mget_reply_in_the_buffer_takes_the_one_split(
    redis_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reply that is wholly in the buffer is read by ``_whole_values`` (the element by
    element reading is not reached), and the next reply on the connection is read right."""
    client = redis.Redis.from_url(redis_url, socket_timeout=2)
    conn = compat.checkout_of(client.connection_pool)()
    try:
        conn.connect()
        if not _python_parser(conn):
            pytest.skip("hiredis parses the reply: read_values leaves it to redis-py")
        client.mset({f"{prefix}:a": b"1\r\n2", f"{prefix}:b": b""})
        whole: list[Any] = []
        real = compat._whole_values

        def spy(data: bytes) -> Any:
            whole.append(real(data))
            return whole[-1]

        def refused(*args: Any) -> Any:
            raise AssertionError("read element by element")

        monkeypatch.setattr(compat, "_whole_values", spy)
        monkeypatch.setattr(compat, "_parse_values", refused)
        conn.send_command("MGET", f"{prefix}:a", f"{prefix}:absent", f"{prefix}:b")
        conn._parser._buffer._read_from_socket()  # the whole reply buffered
        assert compat.read_values(conn) == [b"1\r\n2", None, b""]
        assert whole == [[b"1\r\n2", None, b""]]
        assert compat.call(conn, ("PING",)) in (b"PONG", True)
    finally:
        compat.release(client.connection_pool, conn)
        client.delete(f"{prefix}:a", f"{prefix}:b")
        client.close()


def test_an_mget_is_packed_as_redis_py_packs_it_from_kept_keys(
    pooled: tuple[redis.Redis, Any], prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """:func:`compat.pack` of an ``MGET`` (the batch read path) takes each str key's packed
    form from the ones kept from earlier MGETs: the bytes are redis-py's, the first time and
    the next, for keys of every shape (non-ASCII, CRLF, 256 bytes and more, empty); a bytes or
    int argument, or a str subclass never seen, is packed by the other rules; the kept forms
    are forgotten past their bound; and Redis answers the packed command."""
    client, conn = pooled
    from redis.connection import PythonRespSerializer

    if type(conn._command_packer) is not PythonRespSerializer:
        pytest.skip("hiredis packs: compat.pack keeps redis-py's packer")

    class Key(str):
        pass

    monkeypatch.setattr(compat, "_PACKED_ARGS", {})
    monkeypatch.setattr(compat, "_KEPT_ARGS", 8)
    commands: list[tuple[Any, ...]] = [
        ("MGET", "wt:{t:1}:42", "wt:{t:1}"),
        ("MGET", "wt:{t:1}:42", "k\u00e9y", "a\r\nb", "x" * 300, ""),
        ("MGET", "wt:{t:1}:42", b"\x00\xffbinary", 7),
        ("MGET", Key("new"), "wt:{t:1}"),
        ("MGET", *(f"k{i}" for i in range(12))),
    ]
    for command in [*commands, *commands]:
        assert b"".join(compat.pack(conn, command)) == b"".join(conn.pack_command(*command))
        assert len(compat.pack(conn, command)) == 1
        # past the bound, forgotten before the next command's are kept
        assert len(compat._PACKED_ARGS) <= compat._KEPT_ARGS + len(command)
    assert "new" not in compat._PACKED_ARGS and 7 not in compat._PACKED_ARGS
    client.set(f"{prefix}:\u00e9", b"v")
    assert compat.call(conn, ("MGET", f"{prefix}:\u00e9", f"{prefix}:none")) == [b"v", None]
    assert compat.call(conn, ("MGET", f"{prefix}:\u00e9", f"{prefix}:none")) == [b"v", None]
