"""Every known race of issue 4, driven step by step, each one also against a naive cache.

Each test drives one interleaving deterministically, with no sleeps deciding the order:

* a hook right after the reader's SELECT has been answered by the database (engine event
  ``after_cursor_execute``): the rows are in the cursor, the ORM has not seen them yet, so the
  cache has not filled yet; the hook runs the other sessions' steps, in the same thread, on their
  own connections, then the reader carries on and fills (or is refused);
* a hook in ``after_commit`` registered on the sessionmaker with ``insert=True``, so it runs
  before the cache's own ``after_commit``: the writer's COMMIT has reached the database and its
  publish has not reached Redis yet;
* threads with ``threading.Event`` only where a database row lock must block a writer
  (PostgreSQL and MariaDB); every wait has a timeout and every thread is joined with one.

Each test is parametrized over ``protection``: ``protection_on`` is the library as it is;
``protection_off`` is the same library with the protection under test switched off (a Lua
script replaced in ``protocol._SOURCES`` before the cache is built, or a Python guard patched;
where two guards each catch the race, both), and the test asserts that this naive cache DOES
serve a stale or uncommitted row in the same interleaving. The missing-row test is the one
exception: the library has no negative entries, so its "off" adds a naive one. What a test observes is what a user can: the value a ``get`` returns, whether it
came from Redis (no SQL) or from the database, and what Redis holds.

SQLite runs in WAL mode here, so that a reader's open SELECT does not block another connection's
COMMIT (with the rollback journal, the COMMIT would wait for the reader's SHARED lock).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import fields
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from sqlalchemy import event, func, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from sqlalchemy_writethrough import CachedModel, CacheStats, WriteThroughCache, loading, protocol
from sqlalchemy_writethrough.protocol import Script
from sqlalchemy_writethrough.writing import WritePath

from _cache_helpers import cached_values, entry_key, entry_state
from _servers import capture_sql, reset_schema

#: Upper bound of every Event.wait, Thread.join and polling loop (they normally take ms).
WAIT_S = 10.0

PROTECTION = pytest.mark.parametrize(
    "protection",
    [pytest.param("on", id="protection_on"), pytest.param("off", id="protection_off")],
)
SERVERS = pytest.mark.databases("postgresql", "mariadb")


# ------------------------------------------------------------------------------- models


class Base(DeclarativeBase):
    pass


class RcItem(Base, CachedModel):
    """One row per hot key; ``n`` is the version a writer wrote."""

    __tablename__ = "rc_item"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    n: Mapped[int]


# --------------------------------------------------------------- naive Lua scripts
# Each one drops exactly one check of the real script. They replace the real text in
# protocol._SOURCES for one test; the cache registers _SOURCES when it is constructed.

#: Every fill script starts like the real one: an empty payload gives the caller's lease up.
_GIVE_UP_LEASE = """
if ARGV[3] == '' then
  if redis.call('GET', KEYS[1]) == 'E' .. ARGV[1] .. ':' .. ARGV[2] then
    redis.call('DEL', KEYS[1])
  end
  return 0
end
"""

#: Fill when the key is absent or holds any lease: SET NX semantics, a lease that is not a token
#: (the real fill requires the key to still hold the caller's own lease).
NAIVE_FILL_IF_NO_ENTRY = (
    _GIVE_UP_LEASE
    + """
local v = redis.call('GET', KEYS[1])
if v and string.byte(v, 1) ~= 69 then return 0 end
redis.call('SET', KEYS[1], 'V' .. ARGV[2] .. ':' .. ARGV[3], 'PX', ARGV[4])
return 1
"""
)

#: Fill over anything but a VALUE: a writer's LOCK does not void the reader's lease.
NAIVE_FILL_OVER_LOCKS = (
    _GIVE_UP_LEASE
    + """
local v = redis.call('GET', KEYS[1])
if v and string.byte(v, 1) == 86 then return 0 end
redis.call('SET', KEYS[1], 'V' .. ARGV[2] .. ':' .. ARGV[3], 'PX', ARGV[4])
return 1
"""
)

#: Fill unconditionally: no lease at all (memcached ``set``).
NAIVE_FILL_ALWAYS = (
    _GIVE_UP_LEASE
    + """
redis.call('SET', KEYS[1], 'V' .. ARGV[2] .. ':' .. ARGV[3], 'PX', ARGV[4])
return 1
"""
)

#: Fetch that grants a lease to every miss, also to a caller that asked for none (a session
#: that wrote asks for none, so that it can never fill). Derived from the real script.
_NO_LEASE_ASKED = "if ARGV[1] == '' then"


def naive_fetch_leases_to_all() -> str:
    real = protocol._SOURCES[Script.FETCH]
    assert real.count(_NO_LEASE_ASKED) == 1, "fetch.lua changed: update this naive variant"
    return real.replace(_NO_LEASE_ASKED, "if false then")


#: Publish that ignores contention: each owner drops out, and the last one out writes its own
#: row, whatever order the commits reached the database in.
NAIVE_PUBLISH_IGNORES_CONTENTION = """
local owner = ARGV[1]
local written = 0
for j = 1, #KEYS / 2 do
  local k = KEYS[2 * j - 1]
  local payload, ttl = ARGV[2 * j], ARGV[2 * j + 1]
  local v = redis.call('GET', k)
  if v and string.byte(v, 1) == 76 then
    local lock = cmsgpack.unpack(string.sub(v, 2))
    if lock[1][owner] then
      lock[1][owner] = nil
      if next(lock[1]) ~= nil then
        redis.call('SET', k, 'L' .. cmsgpack.pack(lock), 'KEEPTTL')
      elseif payload ~= '' then
        redis.call('SET', k, 'V' .. lock[5] .. ':' .. payload, 'PX', ttl)
        written = written + 1
      else
        redis.call('DEL', k)
      end
    end
  end
end
return written
"""

#: Release (after ROLLBACK) that always puts the previous VALUE back, contended or not.
NAIVE_RELEASE_RESTORES_PREV = """
local owner = ARGV[1]
local restored = 0
for i = 1, #KEYS, 2 do
  local k = KEYS[i]
  local v = redis.call('GET', k)
  if v and string.byte(v, 1) == 76 then
    local lock = cmsgpack.unpack(string.sub(v, 2))
    if lock[1][owner] then
      if lock[3] then
        redis.call('SET', k, lock[3], 'PX', 3600000)
        restored = restored + 1
      else
        redis.call('DEL', k)
      end
    end
  end
end
return restored
"""


def replace_script(monkeypatch: pytest.MonkeyPatch, script: Script, source: str) -> None:
    """Make caches constructed from now on run ``source`` instead of ``script``."""
    monkeypatch.setitem(protocol._SOURCES, script, source)


def every_read_is_fresh(monkeypatch: pytest.MonkeyPatch) -> None:
    """Switch off the freshness guard (REPEATABLE READ snapshots, SQLite write transactions)."""
    monkeypatch.setattr(loading, "_read_was_fresh", lambda connection, began_before: True)


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture
def db(engine: Engine) -> Engine:
    """The test database with fresh ``rc_*`` tables (SQLite in WAL mode)."""
    if engine.dialect.name == "sqlite":
        with engine.connect() as conn:
            conn.exec_driver_sql("PRAGMA journal_mode=WAL")
    reset_schema(engine, Base.metadata)
    return engine


@pytest.fixture
def client(redis_client: redis.Redis) -> redis.Redis:
    return redis_client


@pytest.fixture
def make_cache(redis_url: str, prefix: str) -> Iterator[Callable[..., WriteThroughCache]]:
    """Build a cache on the test's prefix; call it AFTER switching a protection off.

    Afterwards, every cache built must have run every script without a Redis error (a naive
    script that failed would turn the cache into a database passthrough and prove nothing)."""
    clients: list[redis.Redis] = []
    caches: list[WriteThroughCache] = []

    def build(**options: Any) -> WriteThroughCache:
        redis_client = redis.Redis.from_url(redis_url, socket_timeout=1)
        clients.append(redis_client)
        caches.append(WriteThroughCache(redis_client, prefix=prefix, **options))
        return caches[-1]

    yield build
    for redis_client in clients:
        redis_client.close()
    for cache in caches:
        assert cache.stats().errors == 0


def installed(cache: WriteThroughCache, bind: Engine) -> sessionmaker[Session]:
    factory = sessionmaker(bind)
    cache.install(factory)
    return factory


# ------------------------------------------------------------------------------ helpers


def insert_behind_cache(db: Engine, pk: int, n: int) -> None:
    """A row the cache has never seen (Core on a plain connection: no session, no lock)."""
    with db.begin() as conn:
        conn.execute(sa.insert(RcItem).values(id=pk, n=n))


def in_database(db: Engine, pk: int) -> int | None:
    with db.connect() as conn:
        value: int | None = conn.execute(
            select(RcItem.n).where(RcItem.id == pk)
        ).scalar_one_or_none()
        return value


def read(factory: sessionmaker[Session], db: Engine, pk: int) -> tuple[int | None, str]:
    """What a new reader is served by ``get``: (n or None, "cache" if no SQL ran, else "db")."""
    with factory() as s, capture_sql(db) as sql:
        obj = s.get(RcItem, pk)
        value = None if obj is None else obj.n
    return value, ("cache" if not sql else "db")


def redis_n(cache: WriteThroughCache, client: redis.Redis, db: Engine, pk: int) -> int | None:
    """``n`` of the VALUE Redis holds for the row (None unless the entry is a VALUE)."""
    values = cached_values(cache, client, RcItem, pk, dialect=db.dialect)
    return None if values is None else int(values["n"])


#: the counters of single cache events these tests watch
EVENTS = frozenset(
    {"hits", "misses", "fills", "fills_refused", "publishes", "invalidations", "restores"}
    | {"bypasses", "errors", "decode_errors", "lock_failures", "epochs"}
)


def delta(before: CacheStats, after: CacheStats) -> dict[str, int]:
    """The event counters that moved between two ``cache.stats()`` snapshots (not the
    transaction counts, gauges, latencies or per-model breakdowns)."""
    moved = {
        f.name: getattr(after, f.name) - getattr(before, f.name)
        for f in fields(after)
        if f.name in EVENTS
    }
    return {name: value for name, value in moved.items() if value}


@contextlib.contextmanager
def right_after_select(db: Engine, action: Callable[[], None]) -> Iterator[list[bool]]:
    """Run ``action`` once, right after the next SELECT from ``rc_item`` was answered by the
    database (the rows are in the DBAPI cursor, the ORM and the cache have not seen them)."""
    fired: list[bool] = []

    def hook(
        conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool
    ) -> None:
        if (
            fired
            or "rc_item" not in statement
            or not statement.lstrip().upper().startswith("SELECT")
        ):
            return
        fired.append(True)  # before action(): its own SELECTs must not fire it again
        action()

    event.listen(db, "after_cursor_execute", hook)
    try:
        yield fired
    finally:
        event.remove(db, "after_cursor_execute", hook)
    assert fired, "the reader never reached the database"


_FACTORY_HOOKS: list[tuple[type[Session], Callable[[Session], None]]] = []


@pytest.fixture(autouse=True)
def _remove_factory_hooks() -> Iterator[None]:
    """Takes this test's ``between_commit_and_publish`` hooks off their factories afterwards.
    SQLAlchemy keeps a class's listeners in a dictionary weakly keyed by that class (here, the
    Session subclass ``install()`` made), and a hook that reaches the cache, hence the class,
    keeps that key alive: without this, each test's cache and its threads outlive the test."""
    yield
    while _FACTORY_HOOKS:
        session_class, hook = _FACTORY_HOOKS.pop()
        event.remove(session_class, "after_commit", hook)


def between_commit_and_publish(
    factory: sessionmaker[Session], target: Callable[[], Session | None], action: Callable[[], None]
) -> None:
    """Run ``action`` when the session ``target()`` has COMMITted in the database and the cache
    has not published yet (a factory listener inserted first runs before the cache's)."""

    def hook(session: Session) -> None:
        if session is target():
            action()

    # the class the listener lands on: the factory's, now (uninstall() may change it)
    session_class = factory.class_
    event.listen(session_class, "after_commit", hook, insert=True)
    _FACTORY_HOOKS.append((session_class, hook))


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.005)


class Worker(threading.Thread):
    """A thread that keeps its exception for the test thread to re-raise."""

    def __init__(self, target: Callable[[], None]) -> None:
        super().__init__(daemon=True)
        self._work = target
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._work()
        except BaseException as exc:
            self.error = exc

    def finish(self) -> None:
        self.join(WAIT_S)
        assert not self.is_alive(), "worker thread did not finish"
        if self.error is not None:
            raise self.error


# ------------------------------------------------------------------------------- races


@PROTECTION
def test_stale_fill_after_publish_and_eviction(
    protection: str,
    monkeypatch: pytest.MonkeyPatch,
    db: Engine,
    make_cache: Callable[..., WriteThroughCache],
    client: redis.Redis,
) -> None:
    """Stale fill. R misses (lease granted) and loads n=1; W commits n=2 and publishes; the
    entry disappears (TTL, eviction, FLUSHDB: the key is deleted); R fills with n=1.

    Protection: a fill writes only over the filler's own lease; W's lock replaced it and the
    deletion removed everything, so R's fill is refused and the next reader loads n=2.
    Off: a fill that writes wherever no VALUE or LOCK is (SET NX) puts n=1 back for good."""
    if protection == "off":
        replace_script(monkeypatch, Script.FILL, NAIVE_FILL_IF_NO_ENTRY)
    cache = make_cache()
    factory = installed(cache, db)
    insert_behind_cache(db, 1, n=1)
    key = entry_key(cache, RcItem, 1)

    def writer_commits_then_entry_vanishes() -> None:
        with factory() as w:
            obj = w.get(RcItem, 1)  # R holds the lease: W reads the database
            assert obj is not None
            obj.n = 2
            w.commit()
        assert redis_n(cache, client, db, 1) == 2  # W's publish
        client.delete(key)  # evicted / expired / flushed

    before = cache.stats()
    with factory() as r, right_after_select(db, writer_commits_then_entry_vanishes):
        got = r.get(RcItem, 1)
        assert got is not None and got.n == 1  # R's read began before W's commit: fine
    assert in_database(db, 1) == 2

    if protection == "on":
        assert delta(before, cache.stats()).get("fills_refused") == 1
        assert entry_state(client, key) is None
        assert read(factory, db, 1) == (2, "db")
        assert read(factory, db, 1) == (2, "cache")
    else:
        assert delta(before, cache.stats()).get("fills") == 1
        assert redis_n(cache, client, db, 1) == 1
        assert read(factory, db, 1) == (1, "cache")  # stale, after W's commit returned


@PROTECTION
def test_fill_after_a_writers_flush(
    protection: str,
    monkeypatch: pytest.MonkeyPatch,
    db: Engine,
    make_cache: Callable[..., WriteThroughCache],
    client: redis.Redis,
) -> None:
    """Fill versus lock. R misses and loads n=1 before W's flush; W flushes n=2 (its LOCK
    replaces R's lease); R fills after that flush.

    Protection: the lock voids the lease, R's fill is refused, the key stays locked, and a
    reader between W's DB COMMIT and its publish reads n=2 from the database.
    Off: a fill that overwrites locks puts n=1 in Redis while W is open; a reader that starts
    after W's COMMIT reached the database is served n=1 from Redis."""
    if protection == "off":
        replace_script(monkeypatch, Script.FILL, NAIVE_FILL_OVER_LOCKS)
    cache = make_cache()
    factory = installed(cache, db)
    insert_behind_cache(db, 1, n=1)
    key = entry_key(cache, RcItem, 1)
    writer: list[Session] = []
    during_commit: list[tuple[int | None, str]] = []
    between_commit_and_publish(
        factory,
        lambda: writer[0] if writer else None,
        lambda: during_commit.append(read(factory, db, 1)),
    )

    with factory() as w:
        writer.append(w)

        def writer_flushes() -> None:
            obj = w.get(RcItem, 1)
            assert obj is not None
            obj.n = 2
            w.flush()
            assert entry_state(client, key) == "lock"

        before = cache.stats()
        with factory() as r, right_after_select(db, writer_flushes):
            got = r.get(RcItem, 1)
            assert got is not None and got.n == 1

        if protection == "on":
            assert delta(before, cache.stats()).get("fills_refused") == 1
            assert entry_state(client, key) == "lock"
            assert read(factory, db, 1) == (1, "db")  # W is open: readers use the database
        else:
            assert redis_n(cache, client, db, 1) == 1  # filled over W's lock
            assert read(factory, db, 1) == (1, "cache")
        w.commit()  # during_commit is read between W's DB COMMIT and its publish

    assert in_database(db, 1) == 2
    if protection == "on":
        assert during_commit == [(2, "db")]
        assert read(factory, db, 1) == (2, "cache")  # W's publish
    else:
        assert during_commit == [(1, "cache")]  # stale: the database has committed n=2
        # W's publish found its lock gone and left a miss, which ends the stale window here;
        # had W died before publishing, n=1 would have stayed until its TTL
        assert read(factory, db, 1) == (2, "db")


@PROTECTION
def test_no_fill_from_a_transaction_that_wrote(
    protection: str,
    monkeypatch: pytest.MonkeyPatch,
    db: Engine,
    make_cache: Callable[..., WriteThroughCache],
    client: redis.Redis,
) -> None:
    """Dirty session. S writes n=99 (flushed, not committed); its LOCK is evicted; S loads the
    row again (after ``expunge_all``) and sees its own uncommitted n=99.

    Protection: a session that wrote asks for no lease (and its read is not fresh: SQLite is in
    a write transaction, MariaDB's REPEATABLE READ snapshot began earlier), so it never fills.
    Off: a fetch that leases to every miss and no freshness guard fill n=99: another reader is
    served the uncommitted row, and after S's ROLLBACK, a row that was never committed."""
    if protection == "off":
        replace_script(monkeypatch, Script.FETCH, naive_fetch_leases_to_all())
        every_read_is_fresh(monkeypatch)
    cache = make_cache()
    factory = installed(cache, db)
    insert_behind_cache(db, 1, n=1)
    key = entry_key(cache, RcItem, 1)
    assert read(factory, db, 1) == (1, "db")  # warm: Redis holds n=1
    assert redis_n(cache, client, db, 1) == 1

    with factory() as s:
        obj = s.get(RcItem, 1)
        assert obj is not None
        obj.n = 99
        s.flush()
        assert entry_state(client, key) == "lock"
        client.delete(key)  # the lock is evicted (or expired) while S is open
        s.expunge_all()
        again = s.get(RcItem, 1)
        assert again is not None and again.n == 99  # S sees its own write

        if protection == "on":
            assert entry_state(client, key) is None
            assert read(factory, db, 1) == (1, "db")  # and that reader fills n=1
        else:
            assert redis_n(cache, client, db, 1) == 99
            assert read(factory, db, 1) == (99, "cache")  # uncommitted data served
        s.rollback()

    assert in_database(db, 1) == 1
    if protection == "on":
        assert read(factory, db, 1) == (1, "cache")
    else:
        assert read(factory, db, 1) == (99, "cache")  # never committed by anyone


@SERVERS
@PROTECTION
def test_no_fill_from_a_snapshot_older_than_a_commit(
    protection: str,
    monkeypatch: pytest.MonkeyPatch,
    db: Engine,
    make_cache: Callable[..., WriteThroughCache],
    client: redis.Redis,
) -> None:
    """Old snapshot. R's REPEATABLE READ transaction (explicit on PostgreSQL, MariaDB's default)
    takes its snapshot; W commits n=2 and publishes; the entry is evicted; R misses, is granted
    a (new) lease, and loads n=1 from its old snapshot.

    Protection: under REPEATABLE READ only a transaction's first statement is fresh, so R does
    not fill and the next reader loads n=2.
    Off: with the freshness guard off, R fills n=1, served from Redis after W's commit."""
    if protection == "off":
        every_read_is_fresh(monkeypatch)
    cache = make_cache()
    factory = installed(cache, db)
    # MariaDB: the engine's default is REPEATABLE READ, which the cache must see by itself
    rr_bind = (
        db.execution_options(isolation_level="REPEATABLE READ")
        if (db.dialect.name == "postgresql")
        else db
    )
    rr_factory = installed(cache, rr_bind)
    insert_behind_cache(db, 1, n=1)
    key = entry_key(cache, RcItem, 1)

    with rr_factory() as r:
        assert r.scalar(select(func.count()).select_from(RcItem)) == 1  # R's snapshot
        with factory() as w:
            obj = w.get(RcItem, 1)
            assert obj is not None
            obj.n = 2
            w.commit()
        assert redis_n(cache, client, db, 1) == 2
        client.delete(key)  # evicted
        before = cache.stats()
        got = r.get(RcItem, 1)
        assert got is not None and got.n == 1  # right for R's snapshot
        moved = delta(before, cache.stats())
    assert in_database(db, 1) == 2

    if protection == "on":
        assert moved == {"misses": 1}  # a lease, a load, no fill
        assert entry_state(client, key) != "value"
        assert read(factory, db, 1) == (2, "db")
    else:
        assert moved == {"misses": 1, "fills": 1}
        assert redis_n(cache, client, db, 1) == 1
        assert read(factory, db, 1) == (1, "cache")  # stale, after W's commit returned


@SERVERS
@PROTECTION
def test_no_fill_from_a_snapshot_taken_before_the_session_joined(
    protection: str,
    monkeypatch: pytest.MonkeyPatch,
    db: Engine,
    make_cache: Callable[..., WriteThroughCache],
    client: redis.Redis,
) -> None:
    """Old snapshot, external transaction. A REPEATABLE READ transaction is begun on a
    ``Connection`` and takes its snapshot; W commits n=2 and publishes; the entry is evicted; a
    session joined to that transaction (SQLAlchemy's "joining a Session into an external
    transaction", ``Session(bind=connection)``) misses and loads n=1 from the old snapshot.

    Protection: the session's first statement is not the transaction's first statement, so
    the load is not fresh and must not fill; the next reader loads n=2.
    Off: a fetch that leases to every miss and no freshness guard: n=1 is filled and served
    after W's commit."""
    if protection == "off":
        replace_script(monkeypatch, Script.FETCH, naive_fetch_leases_to_all())
        every_read_is_fresh(monkeypatch)
    cache = make_cache()
    factory = installed(cache, db)
    insert_behind_cache(db, 1, n=1)
    key = entry_key(cache, RcItem, 1)

    with db.connect() as conn:
        if db.dialect.name == "postgresql":
            conn = conn.execution_options(isolation_level="REPEATABLE READ")
        with conn.begin():
            assert conn.scalar(select(func.count()).select_from(RcItem)) == 1  # the snapshot
            with factory() as w:
                obj = w.get(RcItem, 1)
                assert obj is not None
                obj.n = 2
                w.commit()
            assert redis_n(cache, client, db, 1) == 2
            client.delete(key)  # evicted
            with factory(bind=conn) as r:
                before = cache.stats()
                got = r.get(RcItem, 1)
                assert got is not None and got.n == 1  # right for the old snapshot
                moved = delta(before, cache.stats())
    assert in_database(db, 1) == 2

    held = redis_n(cache, client, db, 1)  # what R's load left in Redis
    served = read(factory, db, 1)
    if protection == "on":
        assert served == (2, "db")
        assert held is None
        assert moved == {"misses": 1}
    else:
        assert served == (1, "cache")  # stale, after W's commit returned
        assert held == 1
        assert moved == {"misses": 1, "fills": 1}


@PROTECTION
def test_no_fill_from_an_external_transaction_that_wrote(
    protection: str,
    monkeypatch: pytest.MonkeyPatch,
    db: Engine,
    make_cache: Callable[..., WriteThroughCache],
    client: redis.Redis,
) -> None:
    """Dirty external transaction. A transaction begun on a ``Connection`` writes n=99 (Core,
    not committed); a session joined to it (``Session(bind=connection)``) loads the row and sees
    n=99; the transaction rolls back.

    (The Core UPDATE itself is not the session's, so the cache cannot lock it: that write path
    is out of scope. The fill is the cache's own doing: it must not copy uncommitted data.)

    Protection: a session that joined a transaction begun (and possibly written to) before it
    must not fill; readers load n=1.
    Off: a fetch that leases to every miss and no freshness guard fill n=99: readers are served
    a row that was never committed."""
    if protection == "off":
        replace_script(monkeypatch, Script.FETCH, naive_fetch_leases_to_all())
        every_read_is_fresh(monkeypatch)
    cache = make_cache()
    factory = installed(cache, db)
    insert_behind_cache(db, 1, n=1)

    with db.connect() as conn:
        trans = conn.begin()
        conn.execute(sa.update(RcItem).values(n=99))
        with factory(bind=conn) as s:
            got = s.get(RcItem, 1)
            assert got is not None and got.n == 99  # its transaction's own write
        during = read(factory, db, 1)  # another reader, while the transaction is open
        trans.rollback()

    assert in_database(db, 1) == 1
    if protection == "on":
        assert during == (1, "db")
        assert read(factory, db, 1)[0] == 1
    else:
        assert during == (99, "cache")  # uncommitted data served
        assert redis_n(cache, client, db, 1) == 99
        assert read(factory, db, 1) == (99, "cache")  # never committed


@SERVERS
@PROTECTION
def test_two_writers_reach_redis_in_the_other_order(
    protection: str,
    monkeypatch: pytest.MonkeyPatch,
    db: Engine,
    make_cache: Callable[..., WriteThroughCache],
    client: redis.Redis,
) -> None:
    """Two writers, one row. W1 flushes n=1 (row lock) and commits; W2's flush of n=2 waits on
    the row lock until W1's COMMIT; W2 then commits and publishes while W1 is paused between its
    COMMIT and its publish; W1 publishes last. Database order W1, W2; Redis order W2, W1.

    Protection: W2's lock joined W1's (contended), so neither publish writes a value: a miss,
    then the next reader loads n=2.
    Off: a publish that ignores contention lets the last one out (W1) write n=1 over W2's
    newer commit."""
    if protection == "off":
        replace_script(monkeypatch, Script.PUBLISH, NAIVE_PUBLISH_IGNORES_CONTENTION)
    cache = make_cache()
    factory = installed(cache, db)
    insert_behind_cache(db, 1, n=0)
    key = entry_key(cache, RcItem, 1)
    assert read(factory, db, 1) == (0, "db")
    assert redis_n(cache, client, db, 1) == 0

    w1_committed = threading.Event()
    w1_may_publish = threading.Event()
    w2_ready = threading.Event()
    w2_backend: list[int] = []
    w1 = factory()

    def pause_w1() -> None:
        w1_committed.set()
        assert w1_may_publish.wait(WAIT_S)

    between_commit_and_publish(factory, lambda: w1, pause_w1)

    def w2_work() -> None:
        with factory() as w2:
            obj = w2.get(RcItem, 1)  # locked by W1: loaded from the database
            assert obj is not None and obj.n == 0
            w2_backend.append(backend_id(w2))
            w2_ready.set()
            obj.n = 2
            w2.commit()  # the UPDATE waits for W1's row lock

    t1 = Worker(w1.commit)
    t2 = Worker(w2_work)
    try:
        obj = w1.get(RcItem, 1)
        assert obj is not None
        obj.n = 1
        w1.flush()
        assert entry_state(client, key) == "lock"

        t2.start()
        assert w2_ready.wait(WAIT_S)
        wait_until(lambda: waits_on_row_lock(db, w2_backend[0]), "W2 waits on W1's row lock")

        t1.start()
        assert w1_committed.wait(WAIT_S)  # W1 COMMITted in the database, not published
        t2.finish()  # W2: flush, lock (joins W1's), COMMIT, publish
        assert in_database(db, 1) == 2
        assert entry_state(client, key) == "lock"  # W1 still owns it
        assert read(factory, db, 1) == (2, "db")

        w1_may_publish.set()
        t1.finish()
    finally:
        w1_may_publish.set()
        if t1.is_alive():
            t1.join(WAIT_S)
        w1.close()  # rolls back if W1 never committed, which frees W2
        if t2.is_alive():
            t2.join(WAIT_S)

    assert in_database(db, 1) == 2
    if protection == "on":
        assert entry_state(client, key) is None
        assert read(factory, db, 1) == (2, "db")
        assert read(factory, db, 1) == (2, "cache")
    else:
        assert redis_n(cache, client, db, 1) == 1
        assert read(factory, db, 1) == (1, "cache")  # W2's commit of n=2 is lost to readers


def backend_id(session: Session) -> int:
    """The database's id of the session's connection (PostgreSQL pid, MariaDB thread id)."""
    conn = session.connection()
    sql = (
        "SELECT pg_backend_pid()" if conn.dialect.name == "postgresql" else "SELECT CONNECTION_ID()"
    )
    return int(conn.exec_driver_sql(sql).scalar_one())


def waits_on_row_lock(db: Engine, backend: int) -> bool:
    with db.connect() as conn:
        if db.dialect.name == "postgresql":
            state = conn.execute(
                sa.text("SELECT wait_event_type FROM pg_stat_activity WHERE pid = :id"),
                {"id": backend},
            ).scalar_one_or_none()
            return state == "Lock"
        state = conn.execute(
            sa.text(
                "SELECT trx_state FROM information_schema.innodb_trx "
                "WHERE trx_mysql_thread_id = :id"
            ),
            {"id": backend},
        ).scalar_one_or_none()
        if state == "LOCK WAIT":
            return True
        # MariaDB 10.11 sometimes leaves a waiting transaction out of innodb_trx (seen after
        # another test's transactions on the same table): an UPDATE still "Updating" after
        # 200 ms on a one-row table is waiting for a lock
        stuck = conn.execute(
            sa.text(
                "SELECT COUNT(*) FROM information_schema.processlist WHERE id = :id "
                "AND command = 'Query' AND state = 'Updating' AND info LIKE 'UPDATE %' "
                "AND time_ms > 200"
            ),
            {"id": backend},
        ).scalar_one()
        return bool(stuck)


@PROTECTION
def test_rollback_does_not_restore_over_a_newer_commit(
    protection: str,
    monkeypatch: pytest.MonkeyPatch,
    db: Engine,
    make_cache: Callable[..., WriteThroughCache],
    client: redis.Redis,
) -> None:
    """Rollback over a commit. Redis holds n=0. C flushes n=1 (LOCK, prev n=0) and COMMITs;
    between its COMMIT and its publish, R loads n=1 and flushes n=2 (its lock joins C's); C
    publishes (its commit returns); then R rolls back.

    Protection: the key is contended, so R's release leaves a miss; readers load n=1.
    Off: a release that always restores the previous value puts n=0 back over C's commit."""
    if protection == "off":
        replace_script(monkeypatch, Script.RELEASE, NAIVE_RELEASE_RESTORES_PREV)
    cache = make_cache()
    factory = installed(cache, db)
    insert_behind_cache(db, 1, n=0)
    key = entry_key(cache, RcItem, 1)
    assert read(factory, db, 1) == (0, "db")
    assert redis_n(cache, client, db, 1) == 0

    with factory() as c, factory() as r:

        def r_writes() -> None:
            obj = r.get(RcItem, 1)  # locked by C: loaded from the database
            assert obj is not None and obj.n == 1
            obj.n = 2
            r.flush()

        between_commit_and_publish(factory, lambda: c, r_writes)
        obj = c.get(RcItem, 1)
        assert obj is not None
        obj.n = 1
        c.commit()  # C's commit has returned here
        assert entry_state(client, key) == "lock"  # R's, contended
        assert read(factory, db, 1) == (1, "db")
        r.rollback()

    assert in_database(db, 1) == 1
    if protection == "on":
        assert entry_state(client, key) is None
        assert read(factory, db, 1) == (1, "db")
        assert read(factory, db, 1) == (1, "cache")
    else:
        assert redis_n(cache, client, db, 1) == 0
        assert read(factory, db, 1) == (0, "cache")  # older than C's returned commit


@PROTECTION
def test_lock_expired_in_a_long_transaction_is_taken_again_before_commit(
    protection: str,
    monkeypatch: pytest.MonkeyPatch,
    db: Engine,
    make_cache: Callable[..., WriteThroughCache],
    client: redis.Redis,
) -> None:
    """Long transaction. W flushes n=1 with a 0.3 s lock; the lock expires while W is open; a
    reader misses and fills the committed n=0 (right at that time); W commits, and W's process
    dies between its DB COMMIT and its publish.

    The crash is simulated by :func:`_commit_and_die` (the commit succeeded, so no release
    follows either): nothing else of W's reaches Redis afterwards.

    Protection: before COMMIT, W takes its expired lock again (over the filled n=0), so after
    the crash readers go to the database until the lock expires into a miss.
    Off: without the re-assertion (``WritePath.before_commit`` a no-op), the filled n=0 stays
    in Redis after W's commit: stale until its TTL."""
    if protection == "off":
        monkeypatch.setattr(WritePath, "before_commit", lambda self, session: None)
    cache = make_cache(lock_timeout=0.3)
    factory = installed(cache, db)
    insert_behind_cache(db, 1, n=0)
    key = entry_key(cache, RcItem, 1)
    assert read(factory, db, 1) == (0, "db")

    with factory() as w:
        obj = w.get(RcItem, 1)
        assert obj is not None
        obj.n = 1
        w.flush()
        assert entry_state(client, key) == "lock"
        wait_until(lambda: client.get(key) is None, "W's lock expires")
        assert read(factory, db, 1) == (0, "db")  # a miss; fills the committed n=0
        assert redis_n(cache, client, db, 1) == 0
        _commit_and_die(w, monkeypatch, cache)
    _after_the_writer_died(protection, factory, db, cache, client, key)


def _commit_and_die(w: Session, monkeypatch: pytest.MonkeyPatch, cache: WriteThroughCache) -> None:
    """W commits, and its process dies between its DB COMMIT and its publish: what a killed
    process would not do is dropped, the publish (the backend's ``publish`` returns None, as
    for an unreachable Redis) and the journaling of its keys (a live process would drop them
    when Redis answers: that would take a stale fill away in the unprotected variants)."""
    with monkeypatch.context() as crash:
        crash.setattr(cache._backend, "publish", lambda *args, **kwargs: None)
        crash.setattr(cache._journal, "add_pairs", lambda *args, **kwargs: None)
        w.commit()


def _after_the_writer_died(
    protection: str,
    factory: sessionmaker[Session],
    db: Engine,
    cache: WriteThroughCache,
    client: redis.Redis,
    key: str,
) -> None:
    """W committed n=1 and died before its publish, after a reader filled n=0. Protected:
    W's lock keeps readers on the database until it expires into a miss. Not: the filled
    n=0 is served after W's commit, stale until its TTL."""
    assert in_database(db, 1) == 1
    if protection == "on":
        assert entry_state(client, key) != "value"  # W's lock (or, if slow, its expiry)
        assert read(factory, db, 1) == (1, "db")
        wait_until(lambda: entry_state(client, key) != "lock", "W's lock expires")
        assert read(factory, db, 1)[0] == 1
        assert read(factory, db, 1) == (1, "cache")
    else:
        assert redis_n(cache, client, db, 1) == 0
        assert read(factory, db, 1) == (0, "cache")  # stale after W's commit


@PROTECTION
def test_lock_expired_during_the_commits_own_flush_is_taken_again_before_commit(
    protection: str,
    monkeypatch: pytest.MonkeyPatch,
    db: Engine,
    make_cache: Callable[..., WriteThroughCache],
    client: redis.Redis,
) -> None:
    """Long final flush. W changes n to 1 and calls commit(): the flush inside commit() locks
    the entry (0.3 s lock), then its UPDATE takes longer than the lock lives (a row lock it
    waits for, in real life; here a hook on the UPDATE waits for the lock's expiry); meanwhile
    a reader misses and fills the committed n=0; W's UPDATE runs, W COMMITs, and W's process
    dies between its COMMIT and its publish (simulated as in the test above).

    before_commit ran before that flush, when the lock was young, so it took nothing again.
    Protection: once a flush inside commit() has run, locks older than half their timeout
    are taken again (over the filled n=0) before COMMIT, so after the crash readers go to the
    database until the lock expires into a miss.
    Off: without it (``WritePath._retake_aged_locks`` a no-op), the filled n=0 stays in Redis
    after W's commit: stale until its TTL. The stress checker's ``divergent`` at quiescence."""
    if protection == "off":
        monkeypatch.setattr(WritePath, "_retake_aged_locks", lambda self, tracker: None)
    cache = make_cache(lock_timeout=0.3)
    factory = installed(cache, db)
    insert_behind_cache(db, 1, n=0)
    key = entry_key(cache, RcItem, 1)
    assert read(factory, db, 1) == (0, "db")
    fired: list[bool] = []

    def slow_update(
        conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool
    ) -> None:
        if fired or not statement.lstrip().upper().startswith("UPDATE RC_ITEM"):
            return
        fired.append(True)
        wait_until(lambda: entry_state(client, key) == "lock", "W's flush locks the entry")
        wait_until(lambda: client.get(key) is None, "W's lock expires during its UPDATE")
        # a miss that fills the committed n=0 (no capture_sql here: it would add a listener
        # to the event being dispatched)
        with factory() as r:
            got = r.get(RcItem, 1)
            assert got is not None and got.n == 0
        assert redis_n(cache, client, db, 1) == 0

    with factory() as w:
        obj = w.get(RcItem, 1)
        assert obj is not None
        obj.n = 1
        event.listen(db, "before_cursor_execute", slow_update)
        try:
            _commit_and_die(w, monkeypatch, cache)
        finally:
            event.remove(db, "before_cursor_execute", slow_update)
    assert fired, "W's flush never ran its UPDATE"
    _after_the_writer_died(protection, factory, db, cache, client, key)


@PROTECTION
def test_delete_then_reinsert_of_the_same_primary_key(
    protection: str,
    monkeypatch: pytest.MonkeyPatch,
    db: Engine,
    make_cache: Callable[..., WriteThroughCache],
    client: redis.Redis,
) -> None:
    """Delete then re-insert. R misses and loads n=0; D deletes the row and commits; I inserts
    the same primary key with n=7 and commits (published); R fills.

    Protection: D's lock voided R's lease: R's fill is refused and Redis keeps I's n=7.
    Off: an unconditional fill puts the pre-delete n=0 over the re-inserted row.
    Then, in both: a second delete leaves a miss (get returns None) and a second re-insert is
    published and served from Redis."""
    if protection == "off":
        replace_script(monkeypatch, Script.FILL, NAIVE_FILL_ALWAYS)
    cache = make_cache()
    factory = installed(cache, db)
    insert_behind_cache(db, 1, n=0)
    key = entry_key(cache, RcItem, 1)

    def delete_then_reinsert() -> None:
        with factory() as d:
            obj = d.get(RcItem, 1)
            assert obj is not None
            d.delete(obj)
            d.commit()
        assert entry_state(client, key) is None
        with factory() as i:
            i.add(RcItem(id=1, n=7))
            i.commit()
        assert redis_n(cache, client, db, 1) == 7

    with factory() as r, right_after_select(db, delete_then_reinsert):
        got = r.get(RcItem, 1)
        assert got is not None and got.n == 0  # loaded before the delete
    assert in_database(db, 1) == 7

    if protection == "on":
        assert read(factory, db, 1) == (7, "cache")
    else:
        assert read(factory, db, 1) == (0, "cache")  # a row version from before the delete

    with factory() as d:
        obj = d.get(RcItem, 1)
        assert obj is not None
        d.delete(obj)
        d.commit()
    assert entry_state(client, key) != "value"
    assert read(factory, db, 1) == (None, "db")
    with factory() as i:
        i.add(RcItem(id=1, n=8))
        i.commit()
    assert read(factory, db, 1) == (8, "cache")


#: The naive negative cache's "no such row" entry (the library has no negative entries).
NEGATIVE = b"N"


@PROTECTION
def test_get_of_a_missing_row_then_an_insert(
    protection: str,
    db: Engine,
    make_cache: Callable[..., WriteThroughCache],
    client: redis.Redis,
) -> None:
    """Missing row, then an insert by another session. The library caches no absence: a get of
    a missing row returns None and leaves at most a lease, which the inserter's lock voids.

    Sequential: get(5) → None; another session inserts 5 and commits; get(5) is served n=5.
    Interleaved: R misses on 6 and its SELECT finds nothing; before R returns, I inserts 6 and
    commits (published); R returns None (right at its read time).

    Protection: readers of 6 are served I's row from Redis.
    Off: a naive negative cache (remembers "no such row" under the entry key after a get that
    found nothing, unguarded by any lease, and serves it as None) hides the committed row."""
    cache = make_cache()
    factory = installed(cache, db)

    def get(session: Session, pk: int) -> RcItem | None:
        if protection == "on":
            return session.get(RcItem, pk)
        key = entry_key(cache, RcItem, pk)
        if client.get(key) == NEGATIVE:
            return None
        found = session.get(RcItem, pk)
        if found is None:
            client.set(key, NEGATIVE)
        return found

    def reader(pk: int) -> tuple[int | None, str]:
        with factory() as s, capture_sql(db) as sql:
            obj = get(s, pk)
            value = None if obj is None else obj.n
        return value, ("cache" if not sql else "db")

    assert reader(5) == (None, "db")
    assert entry_state(client, entry_key(cache, RcItem, 5)) != "value"
    with factory() as i:
        i.add(RcItem(id=5, n=5))
        i.commit()
    assert reader(5) == (5, "cache")

    def insert_six() -> None:
        with factory() as i:
            i.add(RcItem(id=6, n=6))
            i.commit()
        assert redis_n(cache, client, db, 6) == 6

    with factory() as r, right_after_select(db, insert_six):
        assert get(r, 6) is None
    assert in_database(db, 6) == 6

    if protection == "on":
        assert redis_n(cache, client, db, 6) == 6
        assert reader(6) == (6, "cache")
    else:
        assert client.get(entry_key(cache, RcItem, 6)) == NEGATIVE
        assert reader(6) == (None, "cache")  # the committed row is hidden


#: a publish that leaves an entry whose lock is gone as it is (the real one deletes it: what is
#: there may have been filled before the COMMIT)
NAIVE_PUBLISH_KEEPS_WHAT_IT_FINDS = """
local written = 0
for j = 1, #KEYS / 2 do
  local k, gk = KEYS[2 * j - 1], KEYS[2 * j]
  local payload, ttl = ARGV[2 * j], ARGV[2 * j + 1]
  local v = redis.call('GET', k)
  local lock = (v and string.byte(v, 1) == 76) and read_lock(v) or nil
  if lock and lock[1][ARGV[1]] then
    if payload ~= '' and lock[2] == 0 and current_gen(gk) == lock[5] then
      redis.call('SET', k, 'V' .. lock[5] .. ':' .. payload, 'PX', ttl)
      written = written + 1
    else
      redis.call('DEL', k)
    end
  end
end
return written
"""


@pytest.mark.parametrize(
    ("protection", "ending"),
    [
        pytest.param(protection, ending, id=f"{ending}-protection_{protection}")
        for ending in ("publishes", "background", "publish_fails", "dies")
        for protection in ("on", "off")
        # a writer that dies, or whose publish fails, runs no publish script
        if protection == "on" or ending in ("publishes", "background")
    ],
)
def test_an_evicted_lock_serves_the_old_row_only_until_the_publish_lands(
    protection: str,
    ending: str,
    monkeypatch: pytest.MonkeyPatch,
    db: Engine,
    make_cache: Callable[..., WriteThroughCache],
    client: redis.Redis,
) -> None:
    """The documented residual of eviction (docs/consistency.md, "Eviction of locks"),
    exactly. W flushes n=2 (its lock is in Redis); Redis evicts the lock; R misses, loads n=1
    (W has not committed) and fills it; W commits. Its publish finds its lock gone and removes
    what is there, so n=1 can be read after ``commit()`` returned only until that publish
    lands: not at all with a synchronous publish, until the background worker's publish with
    ``publish="background"``, until W's journal replays when its publish fails (another
    process reads n=1 until W's next read does it), until the TTL when W dies between its
    COMMIT and its publish.

    Off: a publish that leaves an entry whose lock is gone as it finds it keeps n=1 for good."""
    if protection == "off":
        replace_script(monkeypatch, Script.PUBLISH, NAIVE_PUBLISH_KEEPS_WHAT_IT_FINDS)
    background = ending == "background"
    cache = make_cache(**({"publish": "background"} if background else {}))
    factory = installed(cache, db)
    insert_behind_cache(db, 1, n=1)
    key = entry_key(cache, RcItem, 1)
    publisher = cache._write.publisher
    with factory() as w:
        obj = w.get(RcItem, 1)
        assert obj is not None
        obj.n = 2
        w.flush()
        assert entry_state(client, key) == "lock"
        client.delete(key)  # evicted
        assert read(factory, db, 1) == (1, "db")  # R: a miss, filled with the row before
        assert redis_n(cache, client, db, 1) == 1
        if ending == "dies":
            _commit_and_die(w, monkeypatch, cache)
        elif ending == "publish_fails":
            with monkeypatch.context() as failing:  # as for a Redis that did not answer
                failing.setattr(cache._backend, "publish", lambda *args, **kwargs: None)
                w.commit()
        else:
            if background:
                assert publisher is not None
                publisher._go.clear()  # the publish stays queued
            w.commit()
    assert in_database(db, 1) == 2
    if ending == "publishes":
        if protection == "off":
            assert read(factory, db, 1) == (1, "cache")  # stale, after W's commit returned
            return
        assert entry_state(client, key) is None
        assert read(factory, db, 1) == (2, "db")
        return
    if ending == "publish_fails":
        other = installed(make_cache(), db)  # another process: W's journal is not its own
        assert read(other, db, 1) == (1, "cache")  # the old row, after commit() returned
        assert read(factory, db, 1) == (2, "db")  # W's next read replays its journal first
        assert read(other, db, 1) == (2, "cache")
        return
    assert read(factory, db, 1) == (1, "cache")  # the old row, after commit() returned
    if ending == "dies":
        assert client.pttl(key) > 0  # until the entry's TTL
        return
    assert publisher is not None
    publisher._go.set()
    assert cache.flush_publishes()
    if protection == "off":
        assert read(factory, db, 1) == (1, "cache")  # stale for good
        return
    assert entry_state(client, key) is None
    assert read(factory, db, 1) == (2, "db")


def test_a_key_journaled_again_while_a_replay_runs_stays_journaled(
    monkeypatch: pytest.MonkeyPatch,
    db: Engine,
    make_cache: Callable[..., WriteThroughCache],
    client: redis.Redis,
) -> None:
    """A replay invalidates the keys it found journaled, then forgets them. The same key
    journaled again meanwhile (a publish failing on the background worker's thread after the
    replay read the journal) was forgotten with them: the second writer's lock stayed until
    ``lock_timeout`` and, had Redis evicted it, what a reader filled over it until the TTL,
    where docs/consistency.md promises the writer's journal replay. It stays journaled now,
    and this process's next read replays it."""
    cache = make_cache(lock_timeout=60)
    factory = installed(cache, db)
    insert_behind_cache(db, 1, n=1)
    key = entry_key(cache, RcItem, 1)
    pair = [key, key.rsplit(":", 1)[0]]  # the entity key and its bucket's generation key
    backend, journal = cache._backend, cache._journal
    assert backend.lock(pair, "first", 60_000)
    journal.add_pairs(pair, "first")  # its publish failed: journaled with its owner token
    invalidate = backend.invalidate
    raced: list[str] = []

    def replay_meets_a_second_failure(pairs: Any, ended_owners: Any = ()) -> bool:
        if not raced:  # another thread, between the replay's read of the journal and its end
            raced.append("second")
            assert backend.lock(pair, "second", 60_000)
            journal.add_pairs(pair, "second")
        return invalidate(pairs, ended_owners)

    monkeypatch.setattr(backend, "invalidate", replay_meets_a_second_failure)
    # the read replays "first", then "second" (still journaled), whose lock ends: R fills
    assert read(factory, db, 1) == (1, "db")
    assert raced and entry_state(client, key) == "value"
    assert cache.stats().journal_size == 0
    assert read(factory, db, 1) == (1, "cache")
