"""sqlmodel-cache: ``session.get`` caching for SQLModel classes, through its sync transport.

It needs SQLModel classes (``table=True``) with ``__cache_config__``; the ones below map the very
same ``bench_*`` tables and columns as ``benchmarks.models`` (on SQLModel's own metadata, which
is never used to create anything). Its listeners go on ``sqlmodel.Session``, so the other rows'
plain SQLAlchemy sessions never see them. Its keys are ``sqlmodelcache:<ClassName>:id=<pk>``
whatever ``key_prefix`` says (0.1.x ignores it), hence the ``BenchSmc`` class names: the clean-up
deletes ``sqlmodelcache:BenchSmc*``.
"""

# No `from __future__ import annotations`: SQLModel reads these annotations at class creation.

import datetime as dt
import decimal
from collections.abc import Callable
from time import perf_counter_ns
from typing import Any, Optional

import redis
from sqlalchemy import Column, Numeric, Text, select
from sqlmodel import Field, Relationship, Session, SQLModel
from sqlmodel_cache import CacheConfig, SQLModelCache
from sqlmodel_cache.keys import build_key
from sqlmodel_cache.transport import RedisSyncTransport

from ..context import COMMIT_SIZES, REDIS_SOCKET_TIMEOUT
from ..core import change_rows, count_sql, no_sql_check, values_check
from ..data import delete_pattern
from ..harness import Variant
from ..models import CATEGORY_TABLE, DEPARTMENT_TABLE, ITEM_TABLE, SECTION_TABLE
from ..redis_count import counting_redis
from . import PeerRows
from .common import combine_checks, detached_loader, new_keys_size, timed_read

NAME = "sqlmodel-cache"
KEY_PATTERN = "sqlmodelcache:BenchSmc*"
INTERCEPTS_EVERY_SELECT = (
    "its hook takes every ORM SELECT of a cached class and builds the key from the "
    "execute-time parameters only (a select() carries its values in the statement)"
)


class BenchSmcDepartment(SQLModel, table=True):
    __tablename__ = DEPARTMENT_TABLE
    __cache_config__ = CacheConfig(ttl=3600)

    id: int = Field(primary_key=True)
    name: str


class BenchSmcSection(SQLModel, table=True):
    __tablename__ = SECTION_TABLE
    __cache_config__ = CacheConfig(ttl=3600)

    id: int = Field(primary_key=True)
    name: str
    department_id: int = Field(foreign_key=f"{DEPARTMENT_TABLE}.id")
    department: Optional[BenchSmcDepartment] = Relationship()  # noqa: UP045 (SQLModel needs it)


class BenchSmcCategory(SQLModel, table=True):
    __tablename__ = CATEGORY_TABLE
    __cache_config__ = CacheConfig(ttl=3600)

    id: int = Field(primary_key=True)
    name: str
    section_id: int = Field(foreign_key=f"{SECTION_TABLE}.id")
    section: Optional[BenchSmcSection] = Relationship()  # noqa: UP045


class BenchSmcItem(SQLModel, table=True):
    __tablename__ = ITEM_TABLE
    __cache_config__ = CacheConfig(ttl=3600)

    id: int = Field(primary_key=True)
    name: str
    description: str = Field(sa_column=Column(Text))
    price: decimal.Decimal = Field(sa_column=Column(Numeric(10, 2)))
    active: bool
    created_at: dt.datetime
    quantity: int
    category_id: int = Field(foreign_key=f"{CATEGORY_TABLE}.id")
    category: Optional[BenchSmcCategory] = Relationship()  # noqa: UP045


def build(env: Any) -> PeerRows:
    client = redis.Redis.from_url(
        env.settings.redis_url,
        socket_timeout=REDIS_SOCKET_TIMEOUT,
        socket_connect_timeout=REDIS_SOCKET_TIMEOUT,
    )
    commit_client, counter = counting_redis(
        env.settings.redis_url,
        socket_timeout=REDIS_SOCKET_TIMEOUT,
        socket_connect_timeout=REDIS_SOCKET_TIMEOUT,
    )
    read_transport = RedisSyncTransport(client)
    commit_transport = RedisSyncTransport(commit_client)
    SQLModelCache.configure(transport=read_transport, default_ttl=3600, key_prefix=env.prefix)
    delete_pattern(client, KEY_PATTERN)
    engine = env.engine
    Item = BenchSmcItem

    def session() -> Session:
        return Session(engine)

    def get(s: Session, pk: int) -> Any:
        return s.get(Item, pk)

    def select_one(s: Session, pk: int) -> Any:
        return s.execute(select(Item).where(Item.id == pk)).scalar_one()

    # warm
    with session() as s:
        for pk in env.read_pks:
            get(s, pk)
            s.expunge_all()
    for pk in env.read_pks:
        with session() as s:
            item = get(s, pk)
            _ = item.category.section.department

    def loader(how: Callable[[Session, int], Any]) -> Callable[[int], Any]:
        return detached_loader(session, how)

    get_op = timed_read(session, env.read_pk, get)
    select_op = timed_read(session, env.read_pk, select_one)

    def batch_op(i: int) -> int:
        ids = env.batch(i)
        t0 = perf_counter_ns()
        with session() as s:
            rows = s.execute(select(Item).where(Item.id.in_(ids))).scalars().all()
        elapsed = perf_counter_ns() - t0
        if sorted(r.id for r in rows) != sorted(ids):
            raise AssertionError(f"returned {len(rows)} rows, not the {len(ids)} asked for")
        return elapsed

    def chain_op(i: int) -> int:
        pk = env.read_pk(i)
        with session() as s:
            item = get(s, pk)
            t0 = perf_counter_ns()
            department = item.category.section.department
            elapsed = perf_counter_ns() - t0
            if department is None:
                raise AssertionError("broken chain")
        return elapsed

    def chain_check() -> str | None:
        with session() as s:
            item = get(s, env.read_pk(0))
            with count_sql(engine) as statements:
                _ = item.category.section.department
        return f"{len(statements)} of 3 hops went to PostgreSQL" if statements else None

    def commit_op_for(size: int, variant: Variant) -> Callable[[int], int]:
        def op(i: int) -> int:
            ids = env.commit_ids(i, size)
            with session() as s:
                stmt = select(Item).where(Item.id.in_(ids)).execution_options(cache=False)
                objs = list(s.execute(stmt).scalars())
                change_rows(objs)
                config = SQLModelCache.get_config()
                config.transport = commit_transport  # count this commit's round trips
                try:
                    counter.reset()
                    t0 = perf_counter_ns()
                    s.commit()
                    elapsed = perf_counter_ns() - t0
                finally:
                    config.transport = read_transport
                variant.metrics.setdefault("redis_round_trips", []).append(counter.count)
            return elapsed

        return op

    some_pk = env.read_pks[0]
    rows: dict[str, list[Variant]] = {
        "pk": [
            Variant(
                "get.sqlmodel-cache",
                "session.get, sqlmodel-cache (sync transport)",
                NAME,
                get_op,
                check=combine_checks(
                    no_sql_check(engine, get_op, "went to PostgreSQL"),
                    values_check(loader(get), some_pk),
                ),
            ),
            Variant(
                "select.sqlmodel-cache",
                "select(M).where(M.id == x), sqlmodel-cache",
                NAME,
                select_op,
                note=INTERCEPTS_EVERY_SELECT,
                check=combine_checks(
                    no_sql_check(engine, select_op, "went to PostgreSQL"),
                    values_check(loader(select_one), some_pk),
                ),
            ),
        ],
        "batch": [
            Variant(
                "batch.sqlmodel-cache",
                "100 rows by pk, sqlmodel-cache",
                NAME,
                batch_op,
                note=INTERCEPTS_EVERY_SELECT,
                check=no_sql_check(engine, batch_op, "went to PostgreSQL"),
            )
        ],
        "chain": [
            Variant(
                "chain.sqlmodel-cache",
                "3 many-to-one lazy loads, sqlmodel-cache",
                NAME,
                chain_op,
                check=chain_check,
            )
        ],
    }
    for size in COMMIT_SIZES:
        variant = Variant(
            f"commit{size}.sqlmodel-cache",
            f"commit of {size:,} changed row(s), sqlmodel-cache",
            NAME,
            None,
            note="invalidates (deletes) the changed rows' keys after COMMIT, one DEL per row",
        )
        variant.op = commit_op_for(size, variant)
        rows[f"commit{size}"] = [variant]

    def memory(pk: int) -> dict[str, Any] | None:
        def load() -> None:
            with session() as s:
                get(s, pk)

        return new_keys_size(client, KEY_PATTERN, load)

    def close() -> None:
        SQLModelCache.reset()
        delete_pattern(client, KEY_PATTERN)
        client.close()
        commit_client.close()

    return PeerRows(
        name=NAME,
        rows=rows,
        capabilities=[
            "session.get: yes (a JSON document per row, read back through pydantic and merged "
            "into the session with merge(load=False))",
            "select by pk, 100 rows, lazy loads: every ORM SELECT of a cached class goes "
            "through its hook, which builds the key from the statement's execute-time "
            "parameters only; see each row for what happened",
            "commits: invalidation (one DEL per changed row after COMMIT), no write-through",
            f"keys are always sqlmodelcache:<Class>:id=<pk>; the key_prefix option is ignored "
            f"by {build_key.__module__}",
        ],
        memory=memory,
        close=close,
    )
