"""A thread keeps its pooled connection between commands (round 8 of issue #15).

On a plain, unbounded ``redis.ConnectionPool``, each thread keeps the connection its last
command used, checked out, for its next one: a cached get skips the pool's checkout and
release. These tests observe what a user can: the connections Redis lists (``CLIENT LIST``,
by the client name), which connection a command ran on (``CLIENT ID``), what SQL ran, the
cache's error count; against a throwaway redis-server where a test reconfigures or kills.
"""

from __future__ import annotations

import gc
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from sqlalchemy import String
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from sqlalchemy_writethrough import CachedModel, WriteThroughCache
from sqlalchemy_writethrough._redis_compat import checkout_of
from sqlalchemy_writethrough.redis_sync import SyncTransport
from stress.redis_server import server_binary

from _servers import COUNTED, capture_sql, reset_schema


class Base(DeclarativeBase):
    pass


class KcRow(Base, CachedModel):
    __tablename__ = "kc_row"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(50))


NAME = "wt-kept"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[int]:
    """The port of a throwaway redis-server (tests here CONFIG SET and CLIENT KILL)."""
    binary = server_binary()
    if binary is None:
        pytest.skip("no redis-server binary on PATH")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen(
        args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path
    )
    probe = redis.Redis(port=port, socket_timeout=0.5)
    try:
        for _ in range(250):
            try:
                probe.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.02)
        yield port
    finally:
        probe.close()
        proc.terminate()
        proc.wait(timeout=5)


def _client(port: int, **kwargs: Any) -> redis.Redis:
    """A client whose connections Redis lists under NAME, never retrying (so that a command
    on a dead connection would fail, not be retried quietly)."""
    kwargs.setdefault("retry", Retry(NoBackoff(), 0))
    kwargs.setdefault("socket_timeout", 5)
    if "connection_class" in kwargs:  # a pool's argument
        return redis.Redis.from_url(f"redis://127.0.0.1:{port}", client_name=NAME, **kwargs)
    return redis.Redis(port=port, client_name=NAME, **kwargs)


def _ours(port: int) -> list[dict[str, Any]]:
    """The connections Redis lists under NAME."""
    with redis.Redis(port=port) as observer:
        return [c for c in observer.client_list() if c.get("name") == NAME]


def _transport(cache: WriteThroughCache) -> SyncTransport:
    transport = cache._backend.transport
    assert isinstance(transport, SyncTransport)
    return transport


def _connection_id(cache: WriteThroughCache) -> int:
    return int(_transport(cache).command("CLIENT", "ID"))


@pytest.fixture
def maker(engine: Engine) -> sessionmaker[Session]:
    reset_schema(engine, Base.metadata)
    return sessionmaker(engine)


def _cached(maker: sessionmaker[Session], port: int, **kwargs: Any) -> WriteThroughCache:
    cache = WriteThroughCache(
        _client(port, **kwargs), prefix="kc", keep_connections=True, **COUNTED
    )
    cache.install(maker)
    with maker() as s:
        s.add(KcRow(id=1, name="one"))
        s.commit()
    return cache


def _get(maker: sessionmaker[Session]) -> str:
    with maker() as s:
        row = s.get(KcRow, 1)
        assert row is not None
        return row.name


@pytest.mark.databases("sqlite")
def test_a_thread_runs_its_commands_on_one_connection(
    maker: sessionmaker[Session], server: int
) -> None:
    cache = _cached(maker, server)
    first = _connection_id(cache)
    assert _get(maker) == "one"
    assert _connection_id(cache) == first
    ids: list[int] = []
    thread = threading.Thread(target=lambda: ids.append(_connection_id(cache)))
    thread.start()
    thread.join()
    assert ids and ids[0] != first  # another thread, another connection
    cache.close()
    cache.redis.close()


@pytest.mark.databases("sqlite")
def test_an_idle_connection_the_server_closed_is_not_a_failure(
    engine: Engine, maker: sessionmaker[Session], server: int
) -> None:
    """Redis's ``timeout`` closes the kept, idle connection: the next get is still a hit (no
    SQL, no error counted, the breaker closed), on a new connection."""
    cache = _cached(maker, server)
    assert _get(maker) == "one"  # filled
    with redis.Redis(port=server) as admin:
        admin.config_set("timeout", 1)
    time.sleep(2.5)  # the server closes idle connections after 1 s (checked every 100 ms)
    assert _ours(server) == []
    with capture_sql(engine) as sql:
        assert _get(maker) == "one"
    assert sql == []
    assert cache.stats().errors == 0
    cache.close()
    cache.redis.close()


@pytest.mark.databases("sqlite")
def test_a_killed_idle_connection_is_not_a_failure(
    engine: Engine, maker: sessionmaker[Session], server: int
) -> None:
    cache = _cached(maker, server)
    assert _get(maker) == "one"
    before = _connection_id(cache)
    with redis.Redis(port=server) as admin:
        for conn in _ours(server):
            admin.client_kill_filter(_id=conn["id"])
    with capture_sql(engine) as sql:
        assert _get(maker) == "one"
    assert sql == []
    assert cache.stats().errors == 0
    assert _connection_id(cache) != before
    cache.close()
    cache.redis.close()


@pytest.mark.databases("sqlite")
def test_a_failed_command_does_not_keep_its_connection(
    maker: sessionmaker[Session], server: int
) -> None:
    """A command that timed out may still get its reply: its connection is closed."""
    cache = _cached(maker, server, socket_timeout=0.2)
    before = _connection_id(cache)
    with pytest.raises(redis.TimeoutError):
        _transport(cache).command("BLPOP", "kc-nothing", 1)
    assert _connection_id(cache) != before
    assert _get(maker) == "one"
    cache.close()
    cache.redis.close()


@pytest.mark.databases("sqlite")
def test_a_dead_threads_connection_goes_back_to_the_pool(
    maker: sessionmaker[Session], server: int
) -> None:
    cache = _cached(maker, server)
    assert _get(maker) == "one"
    threads = [threading.Thread(target=_get, args=(maker,)) for _ in range(3)]
    for thread in threads:
        thread.start()
        thread.join()  # one after another: each thread keeps the connection the last left
    del threads
    gc.collect()
    assert _get(maker) == "one"  # gives the dead threads' connections back
    cache.redis.connection_pool.disconnect(inuse_connections=False)  # closes the idle ones
    assert len(_ours(server)) == 1  # this thread's, kept
    cache.close()
    cache.redis.connection_pool.disconnect(inuse_connections=False)
    assert _ours(server) == []
    cache.redis.close()


@pytest.mark.databases("sqlite")
def test_close_and_uninstall_give_back_every_threads_connection(
    maker: sessionmaker[Session], server: int
) -> None:
    cache = _cached(maker, server)
    ready, done = threading.Barrier(4), threading.Event()

    def reader() -> None:
        _get(maker)
        ready.wait()
        done.wait(10)  # alive, keeping its connection

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for thread in threads:
        thread.start()
    _get(maker)
    ready.wait()
    pool = cache.redis.connection_pool
    assert len(_ours(server)) >= 2
    cache.uninstall(maker)
    pool.disconnect(inuse_connections=False)
    assert _ours(server) == []
    cache.install(maker)
    _get(maker)
    cache.close()
    pool.disconnect(inuse_connections=False)
    assert _ours(server) == []
    done.set()
    for thread in threads:
        thread.join()
    cache.redis.close()


def test_a_small_pool_never_runs_dry(server: int) -> None:
    """``max_connections=4``: at most one thread keeps a connection (a quarter), so eight
    living threads, taking turns, never need more than two."""
    client = _client(server, max_connections=4)
    transport = SyncTransport(client, f"127.0.0.1:{server}")
    turn, ready, done = threading.Lock(), threading.Barrier(8), threading.Event()
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            for _ in range(2):
                with turn:
                    transport.command("PING")
                ready.wait()
        except BaseException as exc:
            errors.append(exc)
            ready.abort()
        done.wait(10)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    done.set()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(_ours(server)) <= 2
    transport.close()
    client.close()


def test_a_blocking_pool_keeps_nothing(server: int) -> None:
    """A one-connection ``BlockingConnectionPool``: after the cache's command, the client's
    own command gets that connection at once (a kept one would leave it waiting, then
    failing)."""
    pool = redis.BlockingConnectionPool(port=server, max_connections=1, timeout=0.2)
    client = redis.Redis(connection_pool=pool)
    transport = SyncTransport(client, f"127.0.0.1:{server}")
    transport.command("PING")
    assert client.ping()
    transport.command("PING")
    assert client.set("kc-blocking", 1)
    client.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_a_forked_child_never_uses_the_parents_connection(server: int) -> None:
    client = _client(server)
    transport = SyncTransport(client, f"127.0.0.1:{server}")
    parent = int(transport.command("CLIENT", "ID"))
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.write(write, str(int(transport.command("CLIENT", "ID"))).encode())
        finally:
            os._exit(0)
    os.close(write)
    child = int(os.read(read, 100).decode())
    os.close(read)
    os.waitpid(pid, 0)
    assert child != parent
    assert int(transport.command("CLIENT", "ID")) == parent  # the parent's, intact
    transport.close()
    client.close()


@pytest.mark.databases("sqlite")
def test_uninstall_while_other_threads_start_reading_never_raises(
    engine: Engine, maker: sessionmaker[Session], server: int
) -> None:
    """``uninstall()`` of one session factory gives back every thread's kept connection
    while threads reading through another factory of the same cache make their first
    command, and so their holder: it never raises (it raised ``RuntimeError: Set changed
    size during iteration`` from the holders' set), and the reads go on being answered."""
    cache = _cached(maker, server, max_connections=100_000)
    other = sessionmaker(engine)
    cache.install(other)
    stop = threading.Event()
    failures: list[BaseException] = []

    def reader() -> None:
        try:
            assert _get(other) == "one"
        except BaseException as exc:
            failures.append(exc)

    def spawner() -> None:
        while not stop.is_set():
            threads = [threading.Thread(target=reader) for _ in range(20)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads switch often: the race shows within a second
    spawning = threading.Thread(target=spawner)
    spawning.start()
    try:
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and not failures:
            cache.uninstall(maker)  # the second time on, it only gives connections back
    except BaseException as exc:
        failures.append(exc)
    finally:
        stop.set()
        spawning.join()
        sys.setswitchinterval(interval)
    assert failures == []
    cache.close()
    cache.redis.close()


def _other_thread_connection_id(cache: WriteThroughCache) -> int:
    ids: list[int] = []
    thread = threading.Thread(target=lambda: ids.append(_connection_id(cache)))
    thread.start()
    thread.join()
    return ids[0]


@pytest.mark.databases("sqlite")
def test_a_cache_built_from_a_url_keeps_a_connection_per_thread(
    maker: sessionmaker[Session], server: int
) -> None:
    """The cache's own client (from its URL; no one else checks its connections out): a
    thread keeps its connection, so another thread's command opens a second one."""
    cache = WriteThroughCache(f"redis://127.0.0.1:{server}/0", prefix="kc", **COUNTED)
    first = _connection_id(cache)
    assert _other_thread_connection_id(cache) != first
    cache.close()


@pytest.mark.databases("sqlite")
def test_keep_connections_false_releases_after_every_command(
    maker: sessionmaker[Session], server: int
) -> None:
    cache = WriteThroughCache(
        f"redis://127.0.0.1:{server}/0", prefix="kc", keep_connections=False, **COUNTED
    )
    first = _connection_id(cache)
    assert _other_thread_connection_id(cache) == first  # the one released, checked out again
    cache.close()


@pytest.mark.databases("sqlite")
def test_a_bounded_client_of_the_application_keeps_nothing_by_default(
    maker: sessionmaker[Session], server: int
) -> None:
    """A client the application passes, with a bounded pool it also uses: after the cache's
    read on this thread, with every other connection busy with the application's own
    commands, this thread's own command still gets a connection (a kept one would have left
    the pool dry: ``MaxConnectionsError``)."""
    client = _client(server, max_connections=4)
    cache = WriteThroughCache(client, prefix="kc", **COUNTED)
    cache.install(maker)
    with maker() as s:
        s.add(KcRow(id=1, name="one"))
        s.commit()
    assert _get(maker) == "one"
    pool = client.connection_pool
    ready, done = threading.Barrier(4), threading.Event()

    def busy() -> None:
        conn = checkout_of(pool)()
        try:
            ready.wait(10)
            done.wait(10)
        finally:
            pool.release(conn)

    threads = [threading.Thread(target=busy) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        ready.wait(10)
        assert client.get("kc-nothing") is None
    finally:
        done.set()
        for thread in threads:
            thread.join()
    cache.close()
    client.close()


class _ClosedAsItIsLookedAt(redis.Connection):
    """A connection that another thread's ``pool.disconnect()`` (``Redis.close()``) closes at
    the worst moment: just after the next reader of its socket got it (redis-py closes the
    socket, then forgets it), once ``armed`` is set."""

    armed = threading.Event()

    @property  # type: ignore[override]
    def _sock(self) -> Any:
        sock = self.__dict__.get("_wt_sock")
        if sock is not None and self.armed.is_set():
            self.armed.clear()
            sock.close()
            self.__dict__["_wt_sock"] = None
        return sock

    @_sock.setter
    def _sock(self, value: Any) -> None:
        self.__dict__["_wt_sock"] = value


@pytest.mark.databases("sqlite")
def test_a_kept_connection_closed_as_it_is_checked_is_not_a_failure(
    engine: Engine, maker: sessionmaker[Session], server: int
) -> None:
    """``cache.close()`` of another cache on the same client (or the application's
    ``Redis.close()``) disconnects the connection a thread keeps while that thread checks it
    before its next command: the check polled a socket closed under it and raised
    ``ValueError: file descriptor cannot be a negative integer (-1)`` out of ``session.get()``
    (seen once in CI, ``test_close_while_other_threads_use_the_cache_never_raises``). A closed
    connection is now one to replace, as one the server closed is."""
    cache = _cached(maker, server, connection_class=_ClosedAsItIsLookedAt)
    got: list[object] = []

    def reader() -> None:
        try:
            got.append(_get(maker))  # a connection checked out, then kept
            _ClosedAsItIsLookedAt.armed.set()
            with capture_sql(engine) as sql:
                got.append(_get(maker))  # the kept connection is checked: closed under it
            got.append(sql)
        except Exception as exc:  # what the test reports
            got.append(exc)

    thread = threading.Thread(target=reader)
    thread.start()
    thread.join()
    armed = _ClosedAsItIsLookedAt.armed.is_set()
    _ClosedAsItIsLookedAt.armed.clear()  # never left set for another test
    assert got == ["one", "one", []]
    assert not armed  # not vacuous: the socket was closed
    assert cache.stats().errors == 0
    cache.close()
    cache.redis.close()
