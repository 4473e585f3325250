"""``install()``, ``uninstall()`` and ``close()`` while other threads run sessions.

A test suite installs a cache per test on the application's factory (the pytest plugin
does), a service uninstalls and closes it at shutdown while requests finish, a process
switches caches: the other threads' sessions must never raise, and the factory must not keep
what each cache left. These run real threads on SQLite and the local Redis; each asserts what
a user sees: exceptions, the factory's class, the values read.
"""

from __future__ import annotations

import gc
import sys
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from sqlalchemy import String, create_engine
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from sqlalchemy_writethrough import CachedModel, WriteThroughCache

from _cache_helpers import while_threads_work
from _servers import reset_schema

pytestmark = pytest.mark.databases("sqlite")


class Base(DeclarativeBase):
    pass


class IrRow(Base, CachedModel):
    __tablename__ = "ir_row"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(50))


class RoutingSession(Session):
    """A Session class that chooses its binds itself (``ShardedSession`` does): the get path
    leaves its gets alone, and install() gave its factory no class of its own."""

    def get_bind(self, *args: Any, **kw: Any) -> Any:
        return super().get_bind(*args, **kw)


@pytest.fixture(params=[Session, RoutingSession], ids=["Session", "RoutingSession"])
def factory(engine: Engine, request: pytest.FixtureRequest) -> Iterator[sessionmaker[Session]]:
    reset_schema(engine, Base.metadata)
    # four threads commit to one SQLite file, switching every 10 us: on a machine busy with
    # other test workers, a writer waited more than sqlite3's 5 s for the file once
    # ("database is locked"), which says nothing of the cache
    patient = create_engine(engine.url, connect_args={"timeout": 60})
    maker = sessionmaker(patient, class_=request.param)
    with maker() as session:
        session.add_all([IrRow(id=n, name="0") for n in range(4)])
        session.commit()
    yield maker
    patient.dispose()


@pytest.fixture
def fast_switching() -> Iterator[None]:
    """Threads switch often: a race between them shows within a second or two."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    yield
    sys.setswitchinterval(interval)


def _while_threads_work(
    factory: sessionmaker[Session], seconds: float, main: Callable[[], None]
) -> tuple[list[BaseException], int]:
    """Four threads get, change and commit rows through ``factory`` while ``main`` runs
    again and again for ``seconds``: what the threads raised, and how often ``main`` ran."""
    return while_threads_work(factory, IrRow, range(4), seconds, main)


def _committed(factory: sessionmaker[Session]) -> dict[int, str]:
    with factory() as session:
        return {row.id: row.name for row in session.query(IrRow).populate_existing()}


def test_uninstall_while_other_threads_run_sessions_never_raises(
    factory: sessionmaker[Session], redis_url: str, prefix: str, fast_switching: None
) -> None:
    """``uninstall()`` removed the cache's listeners from the Session class while other
    threads' sessions ran its events: SQLAlchemy iterates a class's listeners in a deque, and
    they raised ``RuntimeError: deque mutated during iteration`` out of ``get()``, ``flush()``
    and ``commit()``. And each install()/uninstall() left the factory a Session class one
    subclass deeper. (A factory of a class that routes its binds had the listeners on its
    own class, and raised the same way.) Now uninstall() leaves the listeners (off) on the
    class install() made and gives the factory its class back: nothing raises, the factory's class is the one it had, and a cache installed
    after serves what was committed (on a keyspace of its own: the commits made between
    two caches changed rows no cache was installed to invalidate)."""
    before = factory.class_

    def cycle() -> None:
        cache = WriteThroughCache(redis_url, prefix=prefix, stats_interval=None)
        cache.install(factory)
        time.sleep(0.005)
        cache.uninstall(factory)
        cache.close()

    failures, cycles = _while_threads_work(factory, 4.0, cycle)
    assert failures == []
    assert cycles > 20  # not vacuous: many uninstalls ran amid the threads' events
    assert factory.class_ is before

    cache = WriteThroughCache(redis_url, prefix=f"{prefix}-after", stats_interval=None)
    cache.install(factory)
    try:
        committed = _committed(factory)
        for _ in range(2):  # a miss that fills, then a hit
            with factory() as session:
                assert {n: session.get(IrRow, n).name for n in range(4)} == committed  # type: ignore[union-attr]
        assert cache.stats().hits >= 4
    finally:
        cache.clear()
        cache.uninstall(factory)
        cache.close()


def test_close_while_other_threads_use_the_cache_never_raises(
    factory: sessionmaker[Session], redis_url: str, prefix: str, fast_switching: None
) -> None:
    """``close()`` of a cache built from a URL disconnects its client's pool, the connections
    other threads are reading from included: redis-py then fails in those threads with
    ``AttributeError: 'NoneType' object has no attribute 'readline'`` (its socket buffer
    gone), which the cache let through, out of ``session.get()``. It is now a Redis failure
    like any other: the session goes to the database."""

    def cycle() -> None:
        cache = WriteThroughCache(redis_url, prefix=prefix, stats_interval=None)
        cache.install(factory)
        time.sleep(0.005)
        cache.close()
        cache.uninstall(factory)

    failures, cycles = _while_threads_work(factory, 6.0, cycle)
    assert failures == []
    assert cycles > 20


class _OwnClient(redis.Redis):
    """A client whose ``execute_command`` is the application's (metrics, a tracer): the
    cache goes through it rather than below it."""

    def execute_command(self, *args: Any, **options: Any) -> Any:
        return super().execute_command(*args, **options)


def test_closing_a_client_of_ones_own_while_threads_use_the_cache_never_raises(
    factory: sessionmaker[Session], redis_url: str, prefix: str, fast_switching: None
) -> None:
    """The same with a client the application passed and closes itself at shutdown, one
    whose ``execute_command`` is its own: the cache sends through that method, and redis-py's
    ``AttributeError`` out of it reached ``session.get()``."""

    def cycle() -> None:
        client = _OwnClient.from_url(redis_url)
        cache = WriteThroughCache(client, prefix=prefix, stats_interval=None)
        cache.install(factory)
        time.sleep(0.005)
        client.close()
        cache.uninstall(factory)
        cache.close()

    failures, cycles = _while_threads_work(factory, 6.0, cycle)
    assert failures == []
    assert cycles > 20


def test_a_session_made_before_uninstall_reads_the_database_after_it(
    factory: sessionmaker[Session], redis_url: str, prefix: str
) -> None:
    """A session made while the cache was installed (a request in flight at shutdown, a
    ``scoped_session``'s) and used after ``uninstall()``: its gets were still answered from
    Redis, which no commit made after the uninstall invalidates, so it read a row older than
    a commit that had completed (and a closed cache's client opened new connections). It
    reads the database now, as sessions made after the uninstall do."""
    cache = WriteThroughCache(redis_url, prefix=prefix, stats_interval=None)
    cache.install(factory)
    try:
        with factory() as session:
            assert session.get(IrRow, 1) is not None  # filled
        with factory() as session:
            assert session.get(IrRow, 1) is not None
        assert cache.stats().hits == 1
        old = factory()
        cache.uninstall(factory)
        with factory() as session:
            row = session.get(IrRow, 1)
            assert row is not None
            row.name = "after"
            session.commit()
        found = old.get(IrRow, 1)
        assert found is not None and found.name == "after"
        assert cache.stats().hits == 1
        old.close()
    finally:
        cache.clear()
        cache.close()


def test_install_and_uninstall_leave_the_factory_its_class(
    factory: sessionmaker[Session], redis_url: str, prefix: str
) -> None:
    """Each install() gave the factory a subclass of the class it had, and uninstall() left
    it there: a suite installing a cache per test left its factory a class as many levels
    deep as it had tests, each keeping its cache alive. Two caches on one factory, uninstalled
    in either order, give it back too."""
    before = factory.class_
    for _ in range(3):
        cache = WriteThroughCache(redis_url, prefix=prefix, stats_interval=None)
        cache.install(factory)
        assert factory.class_ is not before
        cache.uninstall(factory)
        cache.close()
        assert factory.class_ is before
    for first_out in (0, 1):
        caches: list[Any] = [
            WriteThroughCache(redis_url, prefix=prefix, stats_interval=None) for _ in range(2)
        ]
        for cache in caches:
            cache.install(factory)
        caches[first_out].uninstall(factory)
        caches[1 - first_out].uninstall(factory)
        for cache in caches:
            cache.close()
        assert factory.class_ is before


def test_a_dropped_cache_is_freed_while_sessions_made_before_its_uninstall_live(
    factory: sessionmaker[Session], redis_url: str, prefix: str
) -> None:
    """The listeners uninstall() leaves on the class it made reach the cache's hooks, and
    reached the cache itself: a session made before the uninstall() (a ``scoped_session``'s,
    a test's) kept the whole cache alive, and with it its work at every mapper SQLAlchemy
    configured later (a suite's later tests slowed down). Only an installed cache is kept
    alive by its factory now: the dropped one is freed, the old session works on (from the
    database)."""
    cache = WriteThroughCache(redis_url, prefix=prefix, stats_interval=None)
    cache.install(factory)
    old = factory()
    assert old.get(IrRow, 1) is not None
    old.rollback()
    cache.uninstall(factory)
    cache.close()
    dropped = weakref.ref(cache)
    del cache
    gc.collect()
    assert dropped() is None
    assert old.get(IrRow, 2) is not None
    old.close()


def test_an_installed_cache_lives_as_long_as_its_factory(
    factory: sessionmaker[Session], redis_url: str, prefix: str
) -> None:
    """An application may keep only the factory (``cache.install(Session)`` in a function
    that returns ``Session``): the cache must live on, and serve."""
    cache = WriteThroughCache(redis_url, prefix=prefix, stats_interval=None)
    cache.install(factory)
    kept = weakref.ref(cache)
    del cache
    gc.collect()
    assert kept() is not None
    with factory() as session:
        session.get(IrRow, 1)
    with factory() as session:
        session.get(IrRow, 1)
    cache = kept()
    assert cache is not None and cache.stats().hits == 1
    cache.uninstall(factory)
    cache.close()
