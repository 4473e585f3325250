"""``install()``, ``uninstall()`` and closing while other tasks run AsyncSessions.

The asyncio side of ``test_install_while_running.py``: an application built on
``async_sessionmaker`` uninstalls and closes its cache at shutdown (FastAPI's lifespan) while
requests finish, or a suite installs one per test on a shared factory. The other tasks'
sessions must never raise, and the factory must keep the class it had. Real tasks on one event
loop, aiosqlite and the local Redis; what is asserted is what a user sees: exceptions, the
factory's class, the values read.
"""

from __future__ import annotations

import asyncio
import gc
import warnings
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio
from sqlalchemy import String, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from sqlalchemy_writethrough import CachedModel, WriteThroughCache

from _cache_helpers import while_tasks_work

pytestmark = pytest.mark.databases("sqlite")


class Base(DeclarativeBase):
    pass


class IaRow(Base, CachedModel):
    __tablename__ = "ia_row"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(50))


class _OwnClient(redis.asyncio.Redis):
    """A client whose ``execute_command`` is the application's (metrics, a tracer)."""

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        return await super().execute_command(*args, **options)


@pytest.fixture
def run_factory(tmp_path: Path) -> Callable[[Callable[[Any], Awaitable[None]]], list[str]]:
    """Runs a coroutine function on a fresh loop, given an async_sessionmaker of four rows
    on a file database of its own (disposed at the end); what it left open: the
    ``ResourceWarning`` of each connection nobody closed, once collected."""

    def run(test: Callable[[Any], Awaitable[None]]) -> list[str]:
        async def main() -> None:
            engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'ia.db'}")
            try:
                async with engine.begin() as conn:
                    await conn.run_sync(Base.metadata.create_all)
                maker = async_sessionmaker(engine)
                async with maker() as session:
                    session.add_all([IaRow(id=n, name="0") for n in range(4)])
                    await session.commit()
                await test(maker)
            finally:
                await engine.dispose()

        gc.collect()  # earlier tests' garbage is not this test's to report
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)
            asyncio.run(main())
            gc.collect()
        return [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]

    return run


async def _committed(maker: async_sessionmaker[AsyncSession]) -> dict[int, str]:
    async with maker() as session:
        rows = await session.scalars(select(IaRow).execution_options(populate_existing=True))
        return {row.id: row.name for row in rows}


def test_uninstall_while_other_tasks_run_sessions_never_raises(
    run_factory: Callable[[Callable[[Any], Awaitable[None]]], list[str]],
    redis_url: str,
    prefix: str,
) -> None:
    """Caches installed on, uninstalled from and closed on a running ``async_sessionmaker``,
    again and again, while four tasks read and commit through it: no task raises, the
    factory keeps the Session class it had, and a cache installed after serves what was
    committed (on a keyspace of its own: commits made between two caches are no cache's to
    invalidate). A get in flight when its cache was closed opened the closed client's
    connections again, never closed: ``ResourceWarning: unclosed transport`` by the dozen."""

    async def test(maker: async_sessionmaker[AsyncSession]) -> None:
        before = dict(maker.kw)

        async def cycle() -> None:
            cache = WriteThroughCache(redis_url, prefix=prefix, stats_interval=None)
            cache.install(maker)
            await asyncio.sleep(0.005)
            cache.uninstall(maker)
            await cache.aclose()

        failures, cycles = await while_tasks_work(maker, IaRow, range(4), 4.0, cycle)
        assert failures == []
        assert cycles > 20  # not vacuous: many uninstalls ran amid the tasks' sessions
        assert maker.kw == before and maker.class_ is AsyncSession

        cache = WriteThroughCache(redis_url, prefix=f"{prefix}-after", stats_interval=None)
        cache.install(maker)
        try:
            committed = await _committed(maker)
            for _ in range(2):  # a miss that fills, then a hit
                async with maker() as session:
                    got = {n: (await session.get(IaRow, n)) for n in range(4)}
                    assert {n: row.name for n, row in got.items() if row} == committed
            assert cache.stats().hits >= 4
        finally:
            await cache.aclear()
            cache.uninstall(maker)
            await cache.aclose()

    assert run_factory(test) == []


@pytest.mark.parametrize("own", [False, True], ids=["url", "own-client"])
def test_closing_while_other_tasks_use_the_cache_never_raises(
    run_factory: Callable[[Callable[[Any], Awaitable[None]]], list[str]],
    redis_url: str,
    prefix: str,
    own: bool,
) -> None:
    """``aclose()`` of a cache built from a URL, or the application's own client (its
    ``execute_command`` its own) closed with ``aclose()`` at shutdown, while other tasks read
    and commit through the cache: their sessions go on from the database, none raises."""

    async def test(maker: async_sessionmaker[AsyncSession]) -> None:
        async def cycle() -> None:
            client = _OwnClient.from_url(redis_url) if own else None
            cache = WriteThroughCache(client or redis_url, prefix=prefix, stats_interval=None)
            cache.install(maker)
            await asyncio.sleep(0.005)
            if client is not None:
                await client.aclose()
            else:
                await cache.aclose()
            await asyncio.sleep(0.002)
            cache.uninstall(maker)
            await cache.aclose()

        failures, cycles = await while_tasks_work(maker, IaRow, range(4), 4.0, cycle)
        assert failures == []
        assert cycles > 20

    left_open = run_factory(test)
    if not own:  # a client the application closes while its tasks use it is its own
        assert left_open == []


def test_a_closed_cache_closes_again_and_sends_no_stats_without_raising(
    run_factory: Callable[[Callable[[Any], Awaitable[None]]], list[str]],
    redis_url: str,
    prefix: str,
) -> None:
    """Uninstalled and closed, a cache (stats on, the default) closed a second time (a
    shutdown hook and a lifespan both closing it) raised ``ClosedCacheError``, and so did
    ``asend_stats()``: its stats send asked the closed transport for a client. Now the second
    close does nothing and the send says False."""

    async def test(maker: async_sessionmaker[AsyncSession]) -> None:
        cache = WriteThroughCache(redis_url, prefix=prefix, stats_interval=60)
        cache.install(maker)
        async with maker() as session:
            assert await session.get(IaRow, 1) is not None
        cache.uninstall(maker)
        await cache.aclose()
        await cache.aclose()
        assert await cache.asend_stats() is False

    assert run_factory(test) == []
