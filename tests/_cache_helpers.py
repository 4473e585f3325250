"""What tests need to look at the cache from outside: keys, entry states, decoded rows; the
near cache's copies, subscription and the commands Redis ran."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
import warnings
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from typing import Any

import redis
import sqlalchemy as sa
from sqlalchemy import inspect
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, mapped_column, sessionmaker

from sqlalchemy_writethrough import WriteThroughCache, WriteThroughWarning
from sqlalchemy_writethrough.keys import KeySpace
from sqlalchemy_writethrough.near import NearCache
from sqlalchemy_writethrough.protocol import payload_of


def keyspace(cache: WriteThroughCache, model: type, bind: Any = None) -> KeySpace:
    """The keys of ``model``'s rows in the database of ``bind`` (an Engine or Connection).
    Without ``bind``, a test on one database: the bind of the sessionmaker the cache is
    installed on, else the one database the model was used with."""
    layout = cache._layout_for(inspect(model))
    assert layout is not None, f"{model.__name__} is not cached"
    if bind is None:
        targets = [ref() for ref in cache._targets]
        binds = {
            cache._databases.of(b): b
            for t in targets
            if (b := getattr(t, "kw", {}).get("bind")) is not None
        }
        if len(binds) == 1:
            bind = next(iter(binds.values()))
    if bind is not None:
        return cache._keys(layout, bind)
    known = list(layout.keyspaces.values())
    assert len(known) == 1, f"{model.__name__}: which database? pass bind="
    return known[0]


def entry_key(cache: WriteThroughCache, model: type, *pk: Any, bind: Any = None) -> str:
    """The Redis key of one row of ``model`` (in the database of ``bind``, see keyspace)."""
    return keyspace(cache, model, bind).pair(list(pk))[0]


def entry_state(client: redis.Redis, key: str) -> str | None:
    """``"value"``, ``"lock"``, ``"lease"``, ``"other"`` or None (absent)."""
    raw = client.get(key)
    if raw is None:
        return None
    return {ord("V"): "value", ord("L"): "lock", ord("E"): "lease"}.get(raw[0], "other")


def cached_values(
    cache: WriteThroughCache,
    client: redis.Redis,
    model: type,
    *pk: Any,
    dialect: Any,
    bind: Any = None,
) -> dict[str, Any] | None:
    """The attribute values Redis holds for a row (None unless the entry is a VALUE)."""
    key = entry_key(cache, model, *pk, bind=bind)
    raw = client.get(key)
    if raw is None or raw[:1] != b"V":
        return None
    layout = cache._layout_for(inspect(model))
    assert layout is not None
    return layout.decode(payload_of(raw), dialect)


def prefix_keys(client: redis.Redis, prefix: str) -> list[bytes]:
    return sorted(client.scan_iter(match=f"{prefix}:*", count=1000))


# --------------------------------------------------------------------------- near cache

#: a near copy's life in the tests of the bound itself: short, so that waiting for it is short
BOUND = 0.4
#: a near copy's life in every other test: long enough to outlive a slow step on a loaded
#: machine, so that a test counting hits never sees a copy expire between two reads
LASTING = 2.0


def wait_until(condition: Callable[[], Any], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def near_of(cache: WriteThroughCache) -> NearCache:
    near = cache._near
    assert near is not None
    return near


def serving(cache: WriteThroughCache, timeout: float = 10.0) -> None:
    """Wait until the cache's subscription is confirmed and has handled every message
    published so far (a heartbeat sent after now came back)."""
    near = near_of(cache)
    now = time.monotonic()
    wait_until(
        lambda: near.serving() and near._heard >= now, "the near cache's subscription", timeout
    )


@contextlib.contextmanager
def monitored(url: str, prefix: str) -> Iterator[list[str]]:
    """Every command Redis runs while active (scripts' commands too) that names a key or
    channel of ``prefix`` (the server may be shared): read up to a marker sent at the end."""
    client = redis.Redis.from_url(url)
    other = redis.Redis.from_url(url)
    other.ping()  # connected before: its handshake is not in the list
    monitor = client.monitor()
    monitor.__enter__()
    commands: list[str] = []
    try:
        yield commands
    finally:
        marker = f"near-test-marker-{uuid.uuid4().hex}"
        try:
            other.echo(marker)
        finally:
            other.close()
        while True:
            command = monitor.next_command()["command"]
            if marker in command:
                break
            if prefix in command:
                commands.append(command)
        monitor.__exit__(None, None, None)
        client.close()


def seed(factory: Callable[[], Session], *objects: Any) -> None:
    with factory() as s:
        s.add_all(objects)
        s.commit()


def installed(db: Engine, cache: WriteThroughCache) -> sessionmaker[Session]:
    maker = sessionmaker(db)
    cache.install(maker)
    return maker


@contextlib.contextmanager
def cache_on(
    engine: Engine, redis_url: str, prefix: str, **options: Any
) -> Iterator[tuple[WriteThroughCache, sessionmaker[Session]]]:
    """A cache of its own (``options`` given, no stats thread) installed on a sessionmaker
    of ``engine``, uninstalled and closed at the end: for tests that make their database's
    objects (triggers, views, partitions) before the cache first asks about them."""
    cache = WriteThroughCache(redis_url, prefix=prefix, stats_interval=None, **options)
    made = sessionmaker(engine)
    cache.install(made)
    try:
        yield cache, made
    finally:
        cache.uninstall(made)
        cache.close()


def one_column_models(base: type, prefix: str, declared: Mapping[str, Any]) -> dict[str, type]:
    """A model per declared type, under ``base``: table ``{prefix}_{name}``, an integer key
    ``id`` and a ``value`` column of that type (to check each declaration on its own)."""
    return {
        name: type(
            f"{prefix.capitalize()}_{name}",
            (base,),
            {
                "__tablename__": f"{prefix}_{name}",
                "id": mapped_column(sa.Integer, primary_key=True, autoincrement=False),
                "value": mapped_column(type_),
            },
        )
        for name, type_ in declared.items()
    }


def served_and_stored(
    made: sessionmaker[Session],
    model: Any,
    key: int,
    value: Any,
    after_commit: Callable[[], None] | None = None,
) -> tuple[Any, Any] | None:
    """Commit a row of ``value``, then (what a get returns of it, what a fresh load of the
    row returns): after the commit the get is served from what the commit wrote to Redis
    (``after_commit`` looks at it first). None when the database refused the value (nothing
    was committed)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a driver's "Data truncated" in a lenient mode
            with made() as session:
                session.add(model(id=key, value=value))
                session.commit()
    except sa.exc.DBAPIError:
        return None
    if after_commit is not None:
        after_commit()
    with made() as session:
        served = session.get(model, key).value
    with made() as session:
        stored = session.scalars(sa.select(model.value).where(model.id == key)).one()
    return served, stored


@contextlib.contextmanager
def caching_all(
    engine: Engine, redis_url: str, prefix: str, *bases: type
) -> Iterator[tuple[WriteThroughCache, sessionmaker[Session]]]:
    """:func:`cache_on`, the cache caching every model of ``bases`` (``register_all()``; the
    warnings of columns whose commits invalidate, the subject of such tests, left unsaid)."""
    with cache_on(engine, redis_url, prefix) as (cache, made):
        register_all_quietly(cache, *bases)
        yield cache, made


def register_all_quietly(cache: WriteThroughCache, *bases: type) -> None:
    """``cache.register_all()`` of each of ``bases``, their mappers configured, without the
    warnings of columns whose commits invalidate (the subject of such tests)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", WriteThroughWarning)
        for base in bases:
            cache.register_all(base)
            base.registry.configure()  # type: ignore[attr-defined]


def while_threads_work(
    factory: Callable[[], Any],
    model: Any,
    rows: Sequence[int],
    seconds: float,
    main: Callable[[], None],
) -> tuple[list[BaseException], int]:
    """A thread per row of ``model`` (a ``name`` column) gets, renames and commits it, then
    gets the next row, through ``factory`` (a ``sessionmaker``), while ``main`` runs again and
    again for ``seconds``: what the threads raised, and how often ``main`` ran (the
    synchronous twin of :func:`while_tasks_work`)."""
    failures: list[BaseException] = []
    stop = threading.Event()

    def work(index: int) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            try:
                with factory() as session:
                    found = session.get(model, rows[index])
                    assert found is not None
                    found.name = str(n)
                    session.commit()
                    session.get(model, rows[(index + 1) % len(rows)])
            except BaseException as exc:
                failures.append(exc)
                return

    threads = [threading.Thread(target=work, args=(index,)) for index in range(len(rows))]
    for thread in threads:
        thread.start()
    runs = 0
    try:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not failures:
            main()
            runs += 1
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
    return failures, runs


async def while_tasks_work(
    maker: Any,
    model: Any,
    rows: Sequence[int],
    seconds: float,
    main: Callable[[], Awaitable[None]],
) -> tuple[list[BaseException], int]:
    """A task per row of ``model`` (a ``name`` column) gets, renames and commits it, then gets
    the next row, through ``maker`` (an ``async_sessionmaker``), while ``main`` runs again and
    again for ``seconds``: what the tasks raised, and how often ``main`` ran."""
    failures: list[BaseException] = []
    stop = asyncio.Event()

    async def work(index: int) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            try:
                async with maker() as session:
                    found = await session.get(model, rows[index])
                    assert found is not None
                    found.name = str(n)
                    await session.commit()
                    await session.get(model, rows[(index + 1) % len(rows)])
            except BaseException as exc:
                failures.append(exc)
                return

    tasks = [asyncio.create_task(work(index)) for index in range(len(rows))]
    runs = 0
    try:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not failures:
            await main()
            runs += 1
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)
    return failures, runs
