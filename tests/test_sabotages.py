"""Every stress sabotage still breaks the cache: a short scenario per name in
``stress.worker.SABOTAGES``.

A sabotage (``stress.worker.sabotage``) patches private attributes of the library to make the
cache naive on purpose; the stress checker must then find violations. A library refactor can
leave a patch in place that nothing calls any more: the sabotaged stress run then finds
nothing and proves nothing (``unlocked-background-publish`` went inert that way once). So
each sabotage here drives one deterministic interleaving, on real Redis and PostgreSQL, twice:

* sabotaged, the cache does the wrong thing a user can observe (Redis holds a VALUE over a
  writer's lock, or a value older than a completed commit; a reader is served it; a near-cache
  copy survives a commit; two tenants share an entry);
* intact (the same scenario without the sabotage), it does the right thing.

The test is parametrized over ``SABOTAGES``: a new sabotage without a scenario fails here.
Caches are built as the stress worker builds them: the sabotage applied right after the
cache is made, before it is installed. Sabotages that patch a module (``databases._schemas``,
``loading._read_was_fresh``) are undone after each test.

Each scenario runs on both flavours. The asyncio one is an ``--asyncio-workers`` worker's: the
cache given Redis's URL, the sabotage applied to its asyncio flavour, ``async_sessionmaker``
factories on asyncpg, and the scenario run in one SQLAlchemy greenlet on an event loop, on
each AsyncSession's sync session (as ``AsyncSession.run_sync`` runs code): the cache's hooks
await ``redis.asyncio`` there. The sync flavour's patches never reach those hooks: a
sabotage whose patch reached only them shows the intact behaviour here and fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from _flavours import async_url
from sqlalchemy import event, func, select
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from sqlalchemy_writethrough import (
    CachedModel,
    NearCacheOptions,
    WriteThroughCache,
    databases,
    flavours,
    from_cache,
    loading,
)
from sqlalchemy_writethrough._sa_compat import await_, greenlet_spawn
from stress.redis_server import RedisServer
from stress.worker import SABOTAGES, sabotage

from _cache_helpers import LASTING, cached_values, entry_key, entry_state, near_of, serving
from _servers import capture_sql, reset_schema

#: this module's tables and schemas: its own names, so that a run beside another on the same
#: PostgreSQL database touches nothing of the other's
SUFFIX = uuid.uuid4().hex[:6]
TABLE = f"sab_item_{SUFFIX}"


class Base(DeclarativeBase):
    pass


class SbItem(Base, CachedModel):
    __tablename__ = TABLE

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    n: Mapped[int]


# ----------------------------------------------------------------------------- fixtures


@dataclass
class Ctx:
    """What a scenario needs: the database, Redis, and a cache maker that sabotages (or not)."""

    #: the engine the sessions' SQL goes through (the async engine's sync core for asyncio)
    engine: Engine
    redis_url: str
    prefix: str
    #: the sabotage under test, or None for the intact twin
    sabotage: str | None
    client: redis.Redis
    #: "sync", or "asyncio" (the scenario runs in a greenlet on ``loop``)
    flavour: str = "sync"
    loop: asyncio.AbstractEventLoop | None = None
    made: list[WriteThroughCache] = field(default_factory=list)
    clients: list[redis.Redis] = field(default_factory=list)

    @property
    def sabotaged(self) -> bool:
        return self.sabotage is not None

    @property
    def is_async(self) -> bool:
        return self.flavour == "asyncio"

    def cache(self, url: str | None = None, **options: Any) -> WriteThroughCache:
        """A cache built as a stress worker builds its own: sabotaged right after it is made.
        An asyncio worker's is given the URL, and its asyncio flavour is the one sabotaged."""
        if self.is_async:
            cache = WriteThroughCache(
                url or self.redis_url,
                prefix=self.prefix,
                stats_interval=None,
                socket_timeout=2,
                **options,
            )
        else:
            client = redis.Redis.from_url(url or self.redis_url, socket_timeout=2)
            self.clients.append(client)
            cache = WriteThroughCache(client, prefix=self.prefix, stats_interval=None, **options)
        self.made.append(cache)
        sabotage(cache, self.sabotage, self.flavour)
        return cache

    def publisher(self, cache: WriteThroughCache) -> Any:
        """The background publisher of the flavour the sessions use."""
        hooks = cache._async_flavour() if self.is_async else cache._sync
        assert hooks is not None
        return hooks.write.publisher

    def flush_publishes(self, cache: WriteThroughCache, timeout: float) -> bool:
        """``cache.flush_publishes()``; awaited on the loop for asyncio, whose publisher is a
        task there (called from the scenario's greenlet)."""
        if self.is_async:
            return bool(await_(cache.aflush_publishes(timeout)))
        return cache.flush_publishes(timeout)

    def close(self, cache: WriteThroughCache) -> None:
        """``cache.close()``, or ``aclose()`` awaited from the scenario's greenlet."""
        if self.is_async:
            await_(cache.aclose())
        else:
            cache.close()

    def run(self, scenario: Callable[[Ctx], None]) -> None:
        """The scenario: called, or for asyncio run in a greenlet on the loop."""
        if self.loop is None:
            scenario(self)
        else:
            self.loop.run_until_complete(greenlet_spawn(scenario, self))

    def near_cache(self, **options: Any) -> WriteThroughCache:
        """A cache with a near cache whose copies outlive any slow step of the test: a
        sabotaged scenario reads a copy after a commit, and a copy that expired meanwhile
        (a commit slower than ``LASTING`` on a loaded CI machine) hides the sabotage. No
        scenario waits for a copy to expire; each waits for a heartbeat (``serving``), a
        quarter of the bound."""
        return self.cache(near_cache=NearCacheOptions(staleness=2 * LASTING), **options)


@pytest.fixture
def engine(postgresql_url: str) -> Iterator[Engine]:
    eng = sa.create_engine(postgresql_url)
    reset_schema(eng, Base.metadata)
    try:
        yield eng
    finally:
        eng.dispose()


@pytest.fixture(params=[None, "sabotaged"], ids=["intact", "sabotaged"])
def ctx(
    request: pytest.FixtureRequest,
    engine: Engine,
    postgresql_url: str,
    redis_url: str,
    prefix: str,
    redis_client: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Ctx]:
    # the sabotages that patch a module: whatever they set is undone after the test
    monkeypatch.setattr(databases, "_schemas", databases._schemas)
    monkeypatch.setattr(loading, "_read_was_fresh", loading._read_was_fresh)
    name: str = request.node.callspec.params["name"]
    flavour: str = request.node.callspec.params["flavour"]
    context = Ctx(engine, redis_url, prefix, name if request.param else None, redis_client)
    async_engine: AsyncEngine | None = None
    if flavour == "asyncio":
        async_engine = create_async_engine(async_url(postgresql_url))
        context.flavour, context.engine = flavour, async_engine.sync_engine
        context.loop = asyncio.new_event_loop()
    try:
        yield context
    finally:
        for cache in context.made:
            for hooks in (cache._sync, cache._async):
                if hooks is not None and hooks.write.publisher is not None:
                    hooks.write.publisher._go.set()
            if context.loop is not None:
                context.loop.run_until_complete(cache.aclose())
            else:
                cache.close()
        for client in context.clients:
            client.close()
        if context.loop is not None:
            assert async_engine is not None
            context.loop.run_until_complete(async_engine.dispose())
            context.loop.close()


# ------------------------------------------------------------------------------ helpers


class AsyncFactory:
    """An installed ``async_sessionmaker`` handing out its AsyncSessions' sync sessions, for a
    scenario run in the greenlet (as a stress asyncio worker's ``_async_factories``)."""

    def __init__(self, maker: async_sessionmaker[Any]) -> None:
        self.maker = maker
        #: the Session class its sessions run: where their events can be listened to
        self.session_class = flavours.sync_session_class(maker)

    def __call__(self) -> Session:
        return self.maker().sync_session


def installed(cache: WriteThroughCache, bind: Any) -> Any:
    """A factory with ``cache`` installed: a sessionmaker, or on the sync core of an async
    engine (the asyncio flavour) an :class:`AsyncFactory`."""
    if bind.dialect.is_async:
        maker = async_sessionmaker(AsyncEngine(bind), expire_on_commit=False)
        cache.install(maker)
        return AsyncFactory(maker)
    factory = sessionmaker(bind, expire_on_commit=False)
    cache.install(factory)
    return factory


def session_events(factory: Any) -> Any:
    """Where to listen to the session events of ``factory``'s sessions."""
    return factory.session_class if isinstance(factory, AsyncFactory) else factory


def insert_behind_cache(engine: Engine, **rows: int) -> None:
    """Rows the cache has never seen (Core on a plain connection): ``{"1": n, ...}``."""
    with engine.begin() as conn:
        conn.execute(sa.insert(SbItem), [{"id": int(pk), "n": n} for pk, n in rows.items()])


def get(factory: sessionmaker[Session], engine: Engine, pk: int = 1) -> tuple[int | None, str]:
    """What a new reader's ``session.get`` returns: (n, "cache" when no SQL ran, else "db")."""
    with factory() as s, capture_sql(engine) as sql:
        obj = s.get(SbItem, pk)
        value = None if obj is None else obj.n
    return value, ("cache" if not sql else "db")


def batch(factory: sessionmaker[Session], engine: Engine, *pks: int) -> tuple[list[int], str]:
    """What a new reader's IN-list read with ``from_cache()`` returns: (the n's by id,
    "cache" when no SQL ran, else "db")."""
    stmt = select(SbItem).where(SbItem.id.in_(pks)).options(from_cache())
    with factory() as s, capture_sql(engine) as sql:
        found = {obj.id: obj.n for obj in s.scalars(stmt)}
    return [found[pk] for pk in pks], ("cache" if not sql else "db")


def commit_n(factory: sessionmaker[Session], pk: int, n: int) -> None:
    with factory() as s:
        obj = s.get(SbItem, pk)
        assert obj is not None
        obj.n = n
        s.commit()


def redis_n(ctx: Ctx, cache: WriteThroughCache, pk: int = 1, bind: Any = None) -> int | None:
    """``n`` of the VALUE Redis holds for the row (None unless the entry is a VALUE)."""
    values = cached_values(
        cache, ctx.client, SbItem, pk, dialect=ctx.engine.dialect, bind=bind or ctx.engine
    )
    return None if values is None else int(values["n"])


@contextlib.contextmanager
def right_after_select(engine: Engine, action: Callable[[], None]) -> Iterator[None]:
    """Run ``action`` once, right after the next SELECT of the module's table was answered by
    the database (the rows are in the cursor; the cache has not filled yet)."""
    fired: list[bool] = []

    def hook(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if fired or TABLE not in statement or not statement.lstrip().upper().startswith("SELECT"):
            return
        fired.append(True)
        action()

    event.listen(engine, "after_cursor_execute", hook)
    try:
        yield
    finally:
        event.remove(engine, "after_cursor_execute", hook)
    assert fired, "the reader never reached the database"


# ---------------------------------------------------------------------------- scenarios


def fill_over_a_lock(ctx: Ctx, batch_read: bool) -> None:
    """R misses row 1 and loads n=1; W updates it to n=2 and flushes (its LOCK voids R's
    lease) before R fills. Intact: R's fill is refused, the entry stays locked, and after W's
    commit readers get n=2. Sabotaged: R's fill writes n=1 over W's lock; a reader after W's
    COMMIT reached the database (before its publish) is served n=1 from Redis."""
    cache = ctx.cache()
    factory = installed(cache, ctx.engine)
    insert_behind_cache(ctx.engine, **{"1": 1, "2": 1})
    key = entry_key(cache, SbItem, 1, bind=ctx.engine)
    with factory() as w:

        def writer_flushes() -> None:
            obj = w.get(SbItem, 1)
            assert obj is not None
            obj.n = 2
            w.flush()
            assert entry_state(ctx.client, key) == "lock"

        with right_after_select(ctx.engine, writer_flushes):
            if batch_read:
                assert batch(factory, ctx.engine, 1, 2) == ([1, 1], "db")
            else:
                assert get(factory, ctx.engine) == (1, "db")
        if ctx.sabotaged:
            assert entry_state(ctx.client, key) == "value"
            assert redis_n(ctx, cache) == 1  # filled over W's lock
        else:
            assert entry_state(ctx.client, key) == "lock"

        seen: list[tuple[int | None, str]] = []

        def between_commit_and_publish(session: Session) -> None:
            if session is w:
                seen.append(get(factory, ctx.engine))

        # on the factory's class now; taken off after, or it keeps that class, so the cache,
        # alive (SQLAlchemy keys a class's listeners weakly by the class)
        events = session_events(factory)
        events = getattr(events, "class_", events)
        event.listen(events, "after_commit", between_commit_and_publish, insert=True)
        try:
            w.commit()
        finally:
            event.remove(events, "after_commit", between_commit_and_publish)
    # stale: the database had committed n=2 when the reader was served n=1
    assert seen == ([(1, "cache")] if ctx.sabotaged else [(2, "db")])


def scenario_unguarded_fill(ctx: Ctx) -> None:
    fill_over_a_lock(ctx, batch_read=False)


def scenario_unguarded_batch_fill(ctx: Ctx) -> None:
    fill_over_a_lock(ctx, batch_read=True)


def scenario_stale_snapshot_fill(ctx: Ctx) -> None:
    """R's REPEATABLE READ snapshot is taken; W commits n=2 and publishes; the entry is
    evicted; R misses and loads n=1 from its old snapshot. Intact: R does not fill. Sabotaged:
    R fills n=1, which the next reader is served from Redis after W's commit."""
    cache = ctx.cache()
    factory = installed(cache, ctx.engine)
    rr = installed(cache, ctx.engine.execution_options(isolation_level="REPEATABLE READ"))
    insert_behind_cache(ctx.engine, **{"1": 1})
    key = entry_key(cache, SbItem, 1, bind=ctx.engine)
    with rr() as r:
        assert r.scalar(select(func.count()).select_from(SbItem)) == 1  # R's snapshot
        commit_n(factory, 1, 2)
        assert redis_n(ctx, cache) == 2
        ctx.client.delete(key)  # evicted
        got = r.get(SbItem, 1)
        assert got is not None and got.n == 1  # right for R's snapshot
    if ctx.sabotaged:
        assert redis_n(ctx, cache) == 1
        assert get(factory, ctx.engine) == (1, "cache")
    else:
        assert entry_state(ctx.client, key) != "value"
        assert get(factory, ctx.engine) == (2, "db")


def scenario_no_epoch_check(ctx: Ctx) -> None:
    """n=1 cached, Redis saves a snapshot, n=2 committed and published, Redis restarts from the
    snapshot (n=1 back in Redis). Intact: the new epoch is noticed and the reader gets n=2 from
    the database. Sabotaged: the reader is served n=1 from Redis."""
    with RedisServer() as server:
        cache = ctx.cache(server.url)
        factory = installed(cache, ctx.engine)
        insert_behind_cache(ctx.engine, **{"1": 1})
        assert get(factory, ctx.engine) == (1, "db")
        assert get(factory, ctx.engine) == (1, "cache")
        server.admin().save()  # the snapshot holds n=1
        commit_n(factory, 1, 2)
        assert get(factory, ctx.engine) == (2, "cache")
        server.restart()  # from the snapshot: n=1 is back
        raw = server.admin().get(entry_key(cache, SbItem, 1, bind=ctx.engine))
        assert raw is not None and raw[:1] == b"V", "the restart must restore the old entry"
        got = get(factory, ctx.engine)
        ctx.close(cache)
    assert got == ((1, "cache") if ctx.sabotaged else (2, "db"))


def scenario_unlocked_background_publish(ctx: Ctx) -> None:
    """``publish="background"``, the worker held: W commits n=2 over a cached n=1. Intact:
    until the publish lands the entry stays locked and a reader gets n=2 from the database.
    Sabotaged: the commit gave its locks up first, the previous VALUE n=1 is back in Redis and
    a reader is served it."""
    cache = ctx.cache(publish="background")
    factory = installed(cache, ctx.engine)
    publisher = ctx.publisher(cache)
    assert publisher is not None
    insert_behind_cache(ctx.engine, **{"1": 1})
    assert get(factory, ctx.engine) == (1, "db")
    assert get(factory, ctx.engine) == (1, "cache")
    key = entry_key(cache, SbItem, 1, bind=ctx.engine)
    publisher._go.clear()  # hold the worker: the publish stays queued
    try:
        commit_n(factory, 1, 2)
        assert cache.stats().pending_publishes == 1
        if ctx.sabotaged:
            assert redis_n(ctx, cache) == 1  # the previous value, before the publish
            assert get(factory, ctx.engine) == (1, "cache")
        else:
            assert entry_state(ctx.client, key) == "lock"
            assert get(factory, ctx.engine) == (2, "db")
    finally:
        publisher._go.set()
    assert ctx.flush_publishes(cache, timeout=20.0)
    # intact: the publish wrote n=2; sabotaged: it found its locks gone and left a miss
    assert get(factory, ctx.engine)[0] == 2


def scenario_deaf_near_cache(ctx: Ctx) -> None:
    """Two processes (two caches, one Redis): the reader keeps a copy of n=1; the writer
    commits n=2; the reader has handled every message since. Intact: the copy was dropped and
    the reader gets n=2. Sabotaged: the reader is served n=1 from memory."""
    reader, writer = ctx.near_cache(), ctx.near_cache()
    mine, theirs = installed(reader, ctx.engine), installed(writer, ctx.engine)
    insert_behind_cache(ctx.engine, **{"1": 1})
    serving(reader)
    key = entry_key(reader, SbItem, 1, bind=ctx.engine)
    assert get(mine, ctx.engine) == (1, "db")
    assert get(mine, ctx.engine) == (1, "cache")
    assert key in near_of(reader)._entries
    commit_n(theirs, 1, 2)
    serving(reader)  # the writer's message has been handled
    hits = near_of(reader).hits
    if ctx.sabotaged:
        assert get(mine, ctx.engine) == (1, "cache")
        assert near_of(reader).hits == hits + 1  # from memory
    else:
        assert key not in near_of(reader)._entries
        assert get(mine, ctx.engine) == (2, "cache")  # from Redis


def scenario_deaf_near_batch(ctx: Ctx) -> None:
    """The same with IN-list reads: the reader keeps copies of rows 1 and 2 from a batch read;
    the writer commits row 1 n=2. Intact: the next batch read gets n=2. Sabotaged: it is
    served n=1 from memory."""
    reader, writer = ctx.near_cache(), ctx.near_cache()
    mine, theirs = installed(reader, ctx.engine), installed(writer, ctx.engine)
    insert_behind_cache(ctx.engine, **{"1": 1, "2": 1})
    serving(reader)
    assert batch(mine, ctx.engine, 1, 2) == ([1, 1], "db")
    assert batch(mine, ctx.engine, 1, 2) == ([1, 1], "cache")  # from Redis, copies kept
    near = near_of(reader)
    hits = near.hits
    assert batch(mine, ctx.engine, 1, 2) == ([1, 1], "cache")
    assert near.hits == hits + 2  # both from memory
    commit_n(theirs, 1, 2)
    serving(reader)  # the writer's message has been handled
    got = batch(mine, ctx.engine, 1, 2)
    assert got == (([1, 1], "cache") if ctx.sabotaged else ([2, 1], "cache"))


def scenario_deaf_own_near(ctx: Ctx) -> None:
    """One process keeps a copy of n=1 and commits n=2 itself. Intact: its next read gets
    n=2 at once. Sabotaged: it is served n=1 from memory, even once its own message came
    back."""
    cache = ctx.near_cache()
    factory = installed(cache, ctx.engine)
    insert_behind_cache(ctx.engine, **{"1": 1})
    serving(cache)
    assert get(factory, ctx.engine) == (1, "db")
    assert get(factory, ctx.engine) == (1, "cache")
    commit_n(factory, 1, 2)
    assert get(factory, ctx.engine) == ((1, "cache") if ctx.sabotaged else (2, "cache"))
    serving(cache)  # its own message has been handled too
    assert get(factory, ctx.engine) == ((1, "cache") if ctx.sabotaged else (2, "cache"))


def scenario_tenant_blind_keys(ctx: Ctx) -> None:
    """Two tenants' schemas, each with its own row 1 (n=1 and n=2), reached through
    ``schema_translate_map``. Intact: each tenant is served its own row from the cache.
    Sabotaged: both share one entry: the second tenant is served the first one's row."""
    names = [f"sab_t{i}_{SUFFIX}" for i in (1, 2)]
    with ctx.engine.begin() as conn:
        for i, name in enumerate(names, 1):
            conn.exec_driver_sql(f"DROP SCHEMA IF EXISTS {name} CASCADE")
            conn.exec_driver_sql(f"CREATE SCHEMA {name}")
            tenant = conn.execution_options(schema_translate_map={None: name})
            Base.metadata.create_all(tenant)
            tenant.execute(sa.insert(SbItem), [{"id": 1, "n": i}])
    try:
        cache = ctx.cache()
        binds = [ctx.engine.execution_options(schema_translate_map={None: n}) for n in names]
        first, second = (installed(cache, bind) for bind in binds)
        assert get(first, ctx.engine) == (1, "db")
        assert get(first, ctx.engine) == (1, "cache")
        keys = {entry_key(cache, SbItem, 1, bind=bind) for bind in binds}
        if ctx.sabotaged:
            assert len(keys) == 1
            assert get(second, ctx.engine) == (1, "cache")  # the other tenant's row
        else:
            assert len(keys) == 2
            assert get(second, ctx.engine) == (2, "db")
            assert get(second, ctx.engine) == (2, "cache")
    finally:
        with ctx.engine.begin() as conn:
            for name in names:
                conn.exec_driver_sql(f"DROP SCHEMA IF EXISTS {name} CASCADE")


def scenario_blind_triggers(ctx: Ctx) -> None:
    """A ``BEFORE UPDATE`` trigger stores ten times the ``n`` written. Intact: a commit of n=2
    invalidates, and the next read loads 20 and fills. Sabotaged: the commit writes n=2
    through, and readers are served 2, which the database never held."""
    function = f"sab_times_ten_{SUFFIX}"
    with ctx.engine.begin() as conn:
        conn.exec_driver_sql(
            f"CREATE OR REPLACE FUNCTION {function}() RETURNS trigger AS $$ BEGIN "
            "NEW.n := NEW.n * 10; RETURN NEW; END $$ LANGUAGE plpgsql"
        )
        conn.exec_driver_sql(
            f"CREATE TRIGGER {function} BEFORE UPDATE ON {TABLE} FOR EACH ROW "
            f"EXECUTE FUNCTION {function}()"
        )
    try:
        factory = installed(ctx.cache(), ctx.engine)
        insert_behind_cache(ctx.engine, **{"1": 1})
        assert get(factory, ctx.engine) == (1, "db")
        assert get(factory, ctx.engine) == (1, "cache")
        commit_n(factory, 1, 2)
        if ctx.sabotaged:
            assert get(factory, ctx.engine) == (2, "cache")
        else:
            assert get(factory, ctx.engine) == (20, "db")
            assert get(factory, ctx.engine) == (20, "cache")
    finally:
        with ctx.engine.begin() as conn:
            conn.exec_driver_sql(f"DROP TRIGGER IF EXISTS {function} ON {TABLE}")
            conn.exec_driver_sql(f"DROP FUNCTION IF EXISTS {function}()")


def scenario_blind_self_writers(ctx: Ctx) -> None:
    """An ``AFTER UPDATE`` trigger copies row 1's ``n`` into row 2. Intact: a commit of row 1
    invalidates the model whole, and row 2 is read again from the database. Sabotaged: only
    row 1's entry is invalidated, and readers of row 2 are served its old value."""
    function = f"sab_copy_{SUFFIX}"
    with ctx.engine.begin() as conn:
        conn.exec_driver_sql(
            f"CREATE OR REPLACE FUNCTION {function}() RETURNS trigger AS $$ BEGIN "
            f"UPDATE {TABLE} SET n = NEW.n WHERE id = 2; RETURN NULL; END $$ LANGUAGE plpgsql"
        )
        conn.exec_driver_sql(
            f"CREATE TRIGGER {function} AFTER UPDATE ON {TABLE} FOR EACH ROW "
            f"WHEN (NEW.id = 1) EXECUTE FUNCTION {function}()"
        )
    try:
        factory = installed(ctx.cache(), ctx.engine)
        insert_behind_cache(ctx.engine, **{"1": 1, "2": 1})
        assert get(factory, ctx.engine, 2) == (1, "db")
        assert get(factory, ctx.engine, 2) == (1, "cache")
        commit_n(factory, 1, 5)
        if ctx.sabotaged:
            assert get(factory, ctx.engine, 2) == (1, "cache")
        else:
            assert get(factory, ctx.engine, 2) == (5, "db")
            assert get(factory, ctx.engine, 2) == (5, "cache")
    finally:
        with ctx.engine.begin() as conn:
            conn.exec_driver_sql(f"DROP TRIGGER IF EXISTS {function} ON {TABLE}")
            conn.exec_driver_sql(f"DROP FUNCTION IF EXISTS {function}()")


SCENARIOS: dict[str, Callable[[Ctx], None]] = {
    "unguarded-fill": scenario_unguarded_fill,
    "stale-snapshot-fill": scenario_stale_snapshot_fill,
    "no-epoch-check": scenario_no_epoch_check,
    "unlocked-background-publish": scenario_unlocked_background_publish,
    "deaf-near-cache": scenario_deaf_near_cache,
    "tenant-blind-keys": scenario_tenant_blind_keys,
    "unguarded-batch-fill": scenario_unguarded_batch_fill,
    "deaf-near-batch": scenario_deaf_near_batch,
    "deaf-own-near": scenario_deaf_own_near,
    "blind-triggers": scenario_blind_triggers,
    "blind-self-writers": scenario_blind_self_writers,
}


# -------------------------------------------------------------------------------- tests


@pytest.mark.timeout(30)
@pytest.mark.parametrize("flavour", ["sync", "asyncio"])
@pytest.mark.parametrize("name", SABOTAGES)
def test_the_sabotage_breaks_what_the_intact_cache_keeps(name: str, flavour: str, ctx: Ctx) -> None:
    scenario = SCENARIOS.get(name)
    assert scenario is not None, (
        f"sabotage {name!r} has no scenario here: add one showing it still acts"
    )
    ctx.run(scenario)
    if not ctx.sabotaged:
        assert all(cache.stats().errors == 0 for cache in ctx.made), "Redis errors: proves nothing"


def test_every_scenario_is_of_a_sabotage() -> None:
    assert set(SCENARIOS) == set(SABOTAGES)


def test_an_unknown_sabotage_is_refused(redis_url: str, prefix: str) -> None:
    cache = WriteThroughCache(redis_url, prefix=prefix, stats_interval=None)
    try:
        with pytest.raises(ValueError, match="unknown sabotage"):
            sabotage(cache, "no-such-sabotage")
        with pytest.raises(ValueError, match="unknown flavour"):
            sabotage(cache, "unguarded-fill", "threads")
    finally:
        cache.close()
