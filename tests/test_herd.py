"""Thundering herd: many readers of one cold row, at once, against the real servers.

The first reader takes the lease and loads the row; with ``fill_wait`` the others poll Redis
briefly for its fill instead of loading the same row themselves. Without it (``fill_wait=0``)
each of them goes to the database: correct, but the herd reaches the database.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import redis
from sqlalchemy import String, event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from sqlalchemy_writethrough import CachedModel, WriteThroughCache

from _servers import reset_schema

READERS = 50

pytestmark = pytest.mark.databases("postgresql", "mariadb")


class Base(DeclarativeBase):
    pass


class HdItem(Base, CachedModel):
    __tablename__ = "hd_item"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))


@pytest.fixture
def seeded(engine: Engine) -> Iterator[Engine]:
    reset_schema(engine, Base.metadata)
    with Session(engine) as session:
        session.add(HdItem(id=1, name="cold"))
        session.commit()
    yield engine


def herd(engine: Engine, redis_url: str, prefix: str, fill_wait: float) -> tuple[int, list[str]]:
    """Run READERS concurrent gets of one cold row; (database loads of it, names read)."""
    engine.dispose()
    engine.pool._pool.maxsize = READERS  # type: ignore[attr-defined]
    cache = WriteThroughCache(
        redis.Redis.from_url(redis_url, socket_timeout=2, max_connections=READERS + 5),
        prefix=prefix,
        fill_wait=fill_wait,
    )
    factory = sessionmaker(engine)
    cache.install(factory)
    loads: list[str] = []

    def count(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        if "hd_item" in statement:
            loads.append(statement)

    event.listen(engine, "before_cursor_execute", count)
    start = threading.Barrier(READERS)
    names: list[str] = []

    def reader() -> None:
        start.wait(timeout=30)
        with factory() as session:
            item = session.get(HdItem, 1)
            assert item is not None
            names.append(item.name)

    threads = [threading.Thread(target=reader) for _ in range(READERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    event.remove(engine, "before_cursor_execute", count)
    cache.uninstall(factory)
    assert not any(t.is_alive() for t in threads)
    return len(loads), names


def test_herd_on_a_cold_row_loads_it_about_once(
    seeded: Engine, redis_url: str, prefix: str
) -> None:
    # the waiters stop waiting as soon as the fill lands (milliseconds on a quiet machine);
    # the bound is long because on a loaded 2-core CI machine the first reader's load, on a
    # new connection, once took longer than 0.5 s, and 28 waiters gave up and loaded it
    loads, names = herd(seeded, redis_url, prefix, fill_wait=5.0)
    assert names == ["cold"] * READERS
    print(
        f"\n{READERS} concurrent readers of one cold row, fill_wait=5.0: {loads} database load(s)"
    )
    assert loads <= 2


def test_without_waiting_the_herd_reaches_the_database(
    seeded: Engine, redis_url: str, prefix: str
) -> None:
    loads, names = herd(seeded, redis_url, prefix, fill_wait=0)
    assert names == ["cold"] * READERS
    print(f"\n{READERS} concurrent readers of one cold row, fill_wait=0: {loads} database load(s)")
    assert loads >= 1
