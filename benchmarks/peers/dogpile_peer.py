"""dogpile.cache with the query option from SQLAlchemy's documentation (``dogpile_recipe``).

Same ``Item`` model as our rows, a plain ``sessionmaker`` with the recipe's ``do_orm_execute``
hook on its own engine (same URL and pool settings; see ``CHAIN_START_EXECUTION`` for why), a
region on the ``dogpile.cache.redis`` backend (pickled values).
"""

from __future__ import annotations

from collections.abc import Callable
from time import perf_counter_ns
from typing import Any

from sqlalchemy import create_engine, select
from sqlalchemy.orm import sessionmaker

from ..context import COMMIT_SIZES, REDIS_SOCKET_TIMEOUT
from ..core import no_sql_check, values_check
from ..harness import Variant
from ..models import Category, Item, Section
from . import PeerRows
from .common import combine_checks, detached_loader, new_keys_size, timed_read
from .dogpile_recipe import FromCache, ORMCache, RelationshipCache, md5_key_mangler

NAME = "dogpile.cache recipe"

#: The recipe's key ignores statement options, so a parent cached by a plain ``FromCache()`` get
#: is pickled without the ``RelationshipCache`` options and its lazy loads would go to the
#: database. The chain's parent is therefore cached under its own key (the recipe's
#: ``cache_key`` argument), as the documentation suggests for statements needing their own key.
CHAIN_START = FromCache(cache_key="chain")
#: The recipe's options are not part of SQLAlchemy's compiled-statement cache key either, and
#: the options a loaded object passes on to its lazy loads come from the compiled statement:
#: once ``session.get(Item, x, options=[FromCache()])`` is compiled, a later
#: ``session.get(Item, x, options=[FromCache(), RelationshipCache(...)])`` reuses that compiled
#: form and its objects carry no RelationshipCache. The (untimed) load that starts the chain
#: therefore skips the compiled cache, and the peer has its own engine, so that the other rows'
#: lazy loads (same SQL, no options) are not the ones compiled first.
CHAIN_START_EXECUTION = {"compiled_cache": None}


def build(env: Any) -> PeerRows:
    from dogpile.cache import make_region

    key_prefix = f"{env.prefix}:dogpile:"
    regions = {
        "default": make_region(key_mangler=md5_key_mangler(key_prefix)).configure(
            "dogpile.cache.redis",
            expiration_time=3600,
            arguments={
                "url": env.settings.redis_url,
                "redis_expiration_time": 3600 + 60,
                "distributed_lock": False,
                "socket_timeout": REDIS_SOCKET_TIMEOUT,
            },
        )
    }
    orm_cache = ORMCache(regions)
    engine = create_engine(env.database_url)
    maker = sessionmaker(engine)
    orm_cache.listen_on_session(maker)
    chain_option = (
        RelationshipCache(Item.category)
        .and_(RelationshipCache(Category.section))
        .and_(RelationshipCache(Section.department))
    )

    def get(s: Any, pk: int) -> Any:
        return s.get(Item, pk, options=[FromCache()])

    def select_one(s: Any, pk: int) -> Any:
        return s.execute(select(Item).where(Item.id == pk).options(FromCache())).scalar_one()

    # warm: every row the read benchmarks use, every 100-id list, every chain
    with maker() as s:
        for pk in env.read_pks:
            get(s, pk)
            select_one(s, pk)
            s.expunge_all()
        for ids in env.batches:
            s.execute(select(Item).where(Item.id.in_(ids)).options(FromCache())).scalars().all()
            s.expunge_all()
    for pk in env.read_pks:
        with maker() as s:
            item = s.get(
                Item,
                pk,
                options=[CHAIN_START, chain_option],
                execution_options=CHAIN_START_EXECUTION,
            )
            _ = item.category.section.department

    def loader(how: Callable[[Any, int], Any]) -> Callable[[int], Any]:
        return detached_loader(maker, how)

    get_op = timed_read(maker, env.read_pk, get)
    select_op = timed_read(maker, env.read_pk, select_one)

    def batch_op(i: int) -> int:
        ids = env.batch(i)
        t0 = perf_counter_ns()
        with maker() as s:
            n = len(
                s.execute(select(Item).where(Item.id.in_(ids)).options(FromCache())).scalars().all()
            )
        elapsed = perf_counter_ns() - t0
        if n != len(ids):
            raise AssertionError(f"expected {len(ids)} rows, got {n}")
        return elapsed

    def chain_op(i: int) -> int:
        pk = env.read_pk(i)
        with maker() as s:
            item = s.get(
                Item,
                pk,
                options=[CHAIN_START, chain_option],
                execution_options=CHAIN_START_EXECUTION,
            )
            t0 = perf_counter_ns()
            department = item.category.section.department
            elapsed = perf_counter_ns() - t0
            if department is None:
                raise AssertionError("broken chain")
        return elapsed

    def chain_check() -> str | None:
        from ..core import count_sql

        with maker() as s:
            item = s.get(
                Item,
                env.read_pk(0),
                options=[CHAIN_START, chain_option],
                execution_options=CHAIN_START_EXECUTION,
            )
            with count_sql(engine) as statements:
                _ = item.category.section.department
        return f"{len(statements)} of 3 hops went to PostgreSQL" if statements else None

    some_pk = env.read_pks[0]
    rows: dict[str, list[Variant]] = {
        "pk": [
            Variant(
                "get.dogpile",
                "session.get(..., options=[FromCache()]), dogpile recipe",
                NAME,
                get_op,
                check=combine_checks(
                    no_sql_check(engine, get_op, "went to PostgreSQL"),
                    values_check(loader(get), some_pk),
                ),
            ),
            Variant(
                "select.dogpile",
                "select(M).where(M.id == x).options(FromCache()), dogpile recipe",
                NAME,
                select_op,
                check=combine_checks(
                    no_sql_check(engine, select_op, "went to PostgreSQL"),
                    values_check(loader(select_one), some_pk),
                ),
            ),
        ],
        "batch": [
            Variant(
                "batch.dogpile",
                "100 rows by pk, dogpile recipe",
                NAME,
                batch_op,
                note="one pickled FrozenResult per exact id list (a query cache)",
                check=no_sql_check(engine, batch_op, "went to PostgreSQL"),
            )
        ],
        "chain": [
            Variant(
                "chain.dogpile",
                "3 many-to-one lazy loads, dogpile RelationshipCache",
                NAME,
                chain_op,
                check=chain_check,
            )
        ],
    }
    for size in COMMIT_SIZES:
        rows[f"commit{size}"] = [
            Variant(
                f"commit{size}.dogpile",
                f"commit of {size:,} changed row(s), dogpile recipe",
                NAME,
                None,
                note="not applicable: the recipe has no write hook, cached results go stale "
                "until they expire or are invalidated by hand",
            )
        ]

    def memory(pk: int) -> dict[str, Any] | None:
        def load() -> None:
            with maker() as s:
                get(s, pk)

        return new_keys_size(env.redis, key_prefix + "*", load)

    def close() -> None:
        from ..data import delete_pattern, glob_escape

        delete_pattern(env.redis, glob_escape(key_prefix) + "*")
        backend: Any = regions["default"].backend
        for attr in ("writer_client", "reader_client"):
            client = getattr(backend, attr, None)
            if client is not None:
                client.close()
        engine.dispose()

    return PeerRows(
        name=NAME,
        rows=rows,
        capabilities=[
            "session.get and select by pk: yes, with the FromCache option on each statement "
            "(cache-aside: one GET, a pickled FrozenResult merged into the session)",
            "100 rows by pk: only as a query cache (one entry per exact id list, no per-row reuse)",
            "lazy-load chain: yes, with RelationshipCache options on the loading statement; the "
            "parent must be cached under its own key (FromCache(cache_key=...)): the recipe's "
            "key ignores options, so a parent cached by a plain FromCache() get carries no "
            "RelationshipCache and its lazy loads go to the database; and since the recipe's "
            "options are not part of SQLAlchemy's compiled-statement cache key, the options an "
            "object passes to its lazy loads come from whichever statement of the same shape was "
            "compiled first (the chain's parent load here skips the compiled cache)",
            "commits: nothing to measure (no write hook; entries stay stale until TTL or a "
            "hand-written invalidation)",
        ],
        memory=memory,
        close=close,
    )
