"""sqlacache: query caching with row-level invalidation, asyncio only (``AsyncSession``).

sqlacache caches *statement results* (a hash of the compiled SQL and its parameters, plus a
per-table version read from Redis on every lookup) through cashews, and evicts them by row tags
after COMMIT. It only works with ``AsyncSession`` and imports only with ``greenlet`` installed.
Its models are resolved by dotted path, hence the module-level classes below, mapped onto the
same ``bench_*`` tables; the async engine is ``postgresql+psycopg`` (psycopg 3's asyncio mode).

The benchmark drives one asyncio event loop from the interleaved rounds; each operation is
timed *inside* its coroutine, so the loop's own start/stop cost is not charged to sqlacache.

sqlacache 0.1.x puts its ``do_orm_execute`` and commit/rollback listeners on the global
``sqlalchemy.orm.Session`` class, and for a session bound elsewhere its hook runs the
statement itself. Left there, every other row of this benchmark (plain SQLAlchemy, ours, the
other peers) would pay for it; after ``bind()`` the benchmark moves those listeners onto the
sync session class of sqlacache's own ``async_sessionmaker``, which changes nothing for
sqlacache's sessions.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import decimal
import logging
from collections.abc import Callable, Coroutine
from time import perf_counter_ns
from typing import Any

from sqlalchemy import ForeignKey, Numeric, String, Text, event, select
from sqlalchemy.ext.asyncio import AsyncAttrs, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

from ..context import COMMIT_SIZES
from ..core import change_rows, count_sql, same_row
from ..data import delete_pattern, glob_escape
from ..harness import Variant
from ..models import CATEGORY_TABLE, DEPARTMENT_TABLE, ITEM_TABLE, SECTION_TABLE, TABLE_PREFIX
from . import PeerRows
from .common import new_keys_size

NAME = "sqlacache"


class SqlacBase(AsyncAttrs, DeclarativeBase):
    pass


class SqlacDepartment(SqlacBase):
    __tablename__ = DEPARTMENT_TABLE
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(50))


class SqlacSection(SqlacBase):
    __tablename__ = SECTION_TABLE
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(50))
    department_id: Mapped[int] = mapped_column(ForeignKey(f"{DEPARTMENT_TABLE}.id"))
    department: Mapped[SqlacDepartment] = relationship(lazy="select")


class SqlacCategory(SqlacBase):
    __tablename__ = CATEGORY_TABLE
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(50))
    section_id: Mapped[int] = mapped_column(ForeignKey(f"{SECTION_TABLE}.id"))
    section: Mapped[SqlacSection] = relationship(lazy="select")


class SqlacItem(SqlacBase):
    __tablename__ = ITEM_TABLE
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(100))
    description: Mapped[str] = mapped_column(Text)
    price: Mapped[decimal.Decimal] = mapped_column(Numeric(10, 2))
    active: Mapped[bool]
    created_at: Mapped[dt.datetime]
    quantity: Mapped[int]
    category_id: Mapped[int] = mapped_column(ForeignKey(f"{CATEGORY_TABLE}.id"))
    category: Mapped[SqlacCategory] = relationship(lazy="select")


class SqlacSyncSession(Session):
    """The sync session class behind sqlacache's AsyncSessions (its listeners go here)."""


MODELS = (SqlacItem, SqlacCategory, SqlacSection, SqlacDepartment)


def build(env: Any) -> PeerRows:
    import sqlacache

    loop = asyncio.new_event_loop()

    def run(coro: Coroutine[Any, Any, Any]) -> Any:
        return loop.run_until_complete(coro)

    key_prefix = f"{env.prefix}-sqlacache"
    async_engine = create_async_engine(env.database_url)
    sync_engine = async_engine.sync_engine
    manager = sqlacache.configure(
        backend={"url": env.settings.redis_url, "socket_timeout": 0.5},
        models={f"{m.__module__}.{m.__name__}": {"ops": "all", "timeout": 3600} for m in MODELS},
        prefix=key_prefix,
    )
    # bind() runs sqlacache's self-check of its eager-loader detection, which fails to even
    # declare its probe models on this SQLAlchemy and logs a long traceback; keep the log short.
    probe_log = logging.getLogger("sqlacache.manager")
    level = probe_log.level
    probe_log.setLevel(logging.ERROR)
    try:
        run(manager.bind(async_engine))
    finally:
        probe_log.setLevel(level)
    _retarget_listeners(manager)
    maker = async_sessionmaker(async_engine, sync_session_class=SqlacSyncSession)
    tags_pattern = f"_tag:{glob_escape(TABLE_PREFIX)}*"  # the tag sets of bench_* rows
    versions_pattern = f"__sqlacache_tv__{glob_escape(TABLE_PREFIX)}*"

    async def get(s: Any, pk: int) -> Any:
        return await s.get(SqlacItem, pk)

    async def select_one(s: Any, pk: int) -> Any:
        return (await s.execute(select(SqlacItem).where(SqlacItem.id == pk))).scalar_one()

    async def select_many(s: Any, ids: list[int]) -> list[Any]:
        result = await s.execute(select(SqlacItem).where(SqlacItem.id.in_(ids)))
        return list(result.scalars().all())

    async def walk(item: Any) -> Any:
        category = await item.awaitable_attrs.category
        section = await category.awaitable_attrs.section
        return await section.awaitable_attrs.department

    async def warm() -> None:
        for pk in env.read_pks:
            async with maker() as s:
                await get(s, pk)
                await select_one(s, pk)
            async with maker() as s:
                await walk(await get(s, pk))
        for ids in env.batches:
            async with maker() as s:
                await select_many(s, ids)

    run(warm())

    def timed_op(make: Callable[[int], Coroutine[Any, Any, int]]) -> Callable[[int], int]:
        def op(i: int) -> int:
            return int(run(make(i)))

        return op

    async def get_coro(i: int) -> int:
        pk = env.read_pk(i)
        t0 = perf_counter_ns()
        async with maker() as s:
            await get(s, pk)
        return perf_counter_ns() - t0

    async def select_coro(i: int) -> int:
        pk = env.read_pk(i)
        t0 = perf_counter_ns()
        async with maker() as s:
            await select_one(s, pk)
        return perf_counter_ns() - t0

    async def batch_coro(i: int) -> int:
        ids = env.batch(i)
        t0 = perf_counter_ns()
        async with maker() as s:
            rows = await select_many(s, ids)
        elapsed = perf_counter_ns() - t0
        if sorted(r.id for r in rows) != sorted(ids):
            raise AssertionError(f"returned {len(rows)} rows, not the {len(ids)} asked for")
        return elapsed

    async def chain_coro(i: int) -> int:
        pk = env.read_pk(i)
        async with maker() as s:
            item = await get(s, pk)
            t0 = perf_counter_ns()
            department = await walk(item)
            elapsed = perf_counter_ns() - t0
        if department is None:
            raise AssertionError("broken chain")
        return elapsed

    def commit_coro_for(size: int) -> Callable[[int], Coroutine[Any, Any, int]]:
        async def commit_coro(i: int) -> int:
            ids = env.commit_ids(i, size)
            async with maker() as s:
                stmt = (
                    select(SqlacItem)
                    .where(SqlacItem.id.in_(ids))
                    .execution_options(sqlacache_skip_interceptor=True)
                )
                objs = list((await s.execute(stmt)).scalars())
                change_rows(objs)
                t0 = perf_counter_ns()
                await s.commit()
                return perf_counter_ns() - t0

        return commit_coro

    get_op = timed_op(get_coro)
    select_op = timed_op(select_coro)
    batch_op = timed_op(batch_coro)

    def no_sql(op: Callable[[int], int]) -> Callable[[], str | None]:
        def check() -> str | None:
            with count_sql(sync_engine) as statements:
                op(0)
            return f"went to PostgreSQL: {len(statements)} SQL statement(s)" if statements else None

        return check

    def values(load: Callable[[Any, int], Coroutine[Any, Any, Any]]) -> Callable[[], str | None]:
        def check() -> str | None:
            pk = env.read_pks[0]

            async def go() -> str | None:
                async with maker() as s:
                    return same_row(await load(s, pk), pk)

            problem = run(go())
            return f"returned a different row ({problem})" if problem else None

        return check

    def both(*checks: Callable[[], str | None]) -> Callable[[], str | None]:
        def check() -> str | None:
            notes = [n for n in (c() for c in checks) if n]
            return "; ".join(notes) or None

        return check

    def chain_check() -> str | None:
        async def go() -> int:
            async with maker() as s:
                item = await get(s, env.read_pk(0))
                with count_sql(sync_engine) as statements:
                    await walk(item)
                return len(statements)

        n = run(go())
        return f"{n} of 3 hops went to PostgreSQL" if n else None

    rows: dict[str, list[Variant]] = {
        "pk": [
            Variant(
                "get.sqlacache",
                "await session.get, sqlacache (AsyncSession)",
                NAME,
                get_op,
                check=both(no_sql(get_op), values(get)),
            ),
            Variant(
                "select.sqlacache",
                "await session.execute(select(M).where(M.id == x)), sqlacache",
                NAME,
                select_op,
                check=both(no_sql(select_op), values(select_one)),
            ),
        ],
        "batch": [
            Variant(
                "batch.sqlacache",
                "100 rows by pk, sqlacache",
                NAME,
                batch_op,
                note="one cached result per exact id list (a query cache)",
                check=no_sql(batch_op),
            )
        ],
        "chain": [
            Variant(
                "chain.sqlacache",
                "3 many-to-one lazy loads (awaitable_attrs), sqlacache",
                NAME,
                timed_op(chain_coro),
                check=chain_check,
            )
        ],
    }
    for size in COMMIT_SIZES:
        rows[f"commit{size}"] = [
            Variant(
                f"commit{size}.sqlacache",
                f"await commit of {size:,} changed row(s), sqlacache",
                NAME,
                timed_op(commit_coro_for(size)),
                note="evicts the changed rows' tags after COMMIT (and publishes an invalidation "
                "message); round trips not counted",
            )
        ]

    def memory(pk: int) -> dict[str, Any] | None:
        async def load() -> None:
            async with maker() as s:
                await get(s, pk)

        return new_keys_size(env.redis, f"{glob_escape(key_prefix)}*", lambda: run(load()))

    def close() -> None:
        try:
            run(manager.disconnect())
            run(async_engine.dispose())
        finally:
            loop.close()
            for pattern in (f"{glob_escape(key_prefix)}*", tags_pattern, versions_pattern):
                delete_pattern(env.redis, pattern)

    return PeerRows(
        name=NAME,
        rows=rows,
        capabilities=[
            "asyncio only: measured with AsyncSession on postgresql+psycopg (async), each "
            "operation timed inside its coroutine",
            "session.get and select by pk: yes, as a query cache (key = hash of the compiled "
            "SQL and parameters; by its code, each lookup also reads a per-table version key "
            "first: 2 Redis round trips per hit)",
            "100 rows by pk: only as a query cache (one entry per exact id list)",
            "lazy loads: yes, through AsyncAttrs.awaitable_attrs",
            "commits: invalidation by row tags after COMMIT (plus a pub/sub message), no "
            "write-through",
            "bind() runs a self-check of its eager-loader detection; it raised here (its probe "
            "models do not declare), so sqlacache logs that eager-loaded statements might be "
            "cached (none are used here)",
            "installs its do_orm_execute hook on the global Session class (moved here onto its "
            "own session class so the other rows are not slowed down)",
        ],
        memory=memory,
        close=close,
    )


def _retarget_listeners(manager: Any) -> None:
    """Move the listeners sqlacache put on the global ``Session`` onto ``SqlacSyncSession``."""
    moved = []
    for target, identifier, listener in manager._listeners:
        if target is Session:
            event.remove(Session, identifier, listener)
            kwargs = {"retval": True} if identifier == "do_orm_execute" else {}
            event.listen(SqlacSyncSession, identifier, listener, **kwargs)
            moved.append((SqlacSyncSession, identifier, listener))
        else:
            moved.append((target, identifier, listener))
    manager._listeners[:] = moved
