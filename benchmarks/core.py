"""The rows measured on this library, on plain SQLAlchemy + PostgreSQL, and the Redis floor."""

from __future__ import annotations

import contextlib
import datetime as dt
import decimal
import statistics
from collections.abc import Callable, Iterator
from time import perf_counter_ns
from typing import Any

import msgpack
from sqlalchemy import event, inspect, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import sessionmaker

from sqlalchemy_writethrough import _sa_compat, from_cache
from sqlalchemy_writethrough.protocol import payload_of

from .context import Env
from .data import item_row
from .harness import Variant
from .models import ITEM_COLUMNS, Item
from .peers.common import combine_checks, detached_loader, timed_read

# --------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def count_sql(engine: Engine) -> Iterator[list[str]]:
    """Collect the SQL statements sent through ``engine`` while active."""
    statements: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(statement)

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield statements
    finally:
        event.remove(engine, "before_cursor_execute", record)


def no_sql_check(engine: Engine, op: Callable[[int], int], what: str) -> Callable[[], str | None]:
    """A check that says so when an op meant to be served from a cache sent SQL."""

    def check() -> str | None:
        with count_sql(engine) as statements:
            op(0)
        if statements:
            return f"{what}: {len(statements)} SQL statement(s) per operation"
        return None

    return check


def item_values(obj: Any) -> tuple[Any, ...]:
    return tuple(getattr(obj, name) for name in ITEM_COLUMNS)


def expected_values(pk: int) -> tuple[Any, ...]:
    row = item_row(pk)
    return tuple(row[name] for name in ITEM_COLUMNS)


def same_row(obj: Any, pk: int) -> str | None:
    """None when ``obj`` holds exactly row ``pk`` (same values, same Python types)."""
    got = item_values(obj)
    want = expected_values(pk)
    for name, g, w in zip(ITEM_COLUMNS, got, want, strict=True):
        if g != w or type(g) is not type(w):
            return f"{name}: got {g!r} ({type(g).__name__}), expected {w!r}"
    return None


def values_check(load: Callable[[int], Any], pk: int) -> Callable[[], str | None]:
    """A check that the row a variant returns equals the database row."""

    def check() -> str | None:
        problem = same_row(load(pk), pk)
        return f"returned a different row ({problem})" if problem else None

    return check


# --------------------------------------------------------------------------- warm-up


def warm_ours(env: Env) -> None:
    """Fill our cache with every row the read benchmarks use, and the lazy-load chain."""
    with env.cached() as s:
        for pk in dict.fromkeys([*env.read_pks, *(pk for ids in env.batches for pk in ids)]):
            s.get(Item, pk)
            s.expunge_all()
    for pk in env.read_pks:
        with env.cached() as s:
            item = s.get(Item, pk)
            assert item is not None
            _ = item.category.section.department.name
    layout = env.cache._layout_for(inspect(Item))  # private: the entry's key
    assert layout is not None
    keys = env.cache._keys(layout, env.engine)
    missing = 0
    for pk in dict.fromkeys([*env.read_pks, *(pk for ids in env.batches for pk in ids)]):
        key = keys.pair([pk])[0]
        raw = env.redis.get(key)
        if raw is None or raw[:1] != b"V":
            missing += 1
            continue
        floor_key = f"{env.prefix}:floor:{pk}"
        env.redis.set(floor_key, raw)
        env.floor_keys[pk] = floor_key
        env.floor_entries[pk] = raw
    if missing:
        print(f"  ! {missing} of {len(env.read_pks)} rows were not cached after the warm-up")
    if env.baseline_cached is not None:
        warm_baseline(env)


def warm_baseline(env: Env) -> None:
    """The baseline version's cache (``--baseline``) holds the same rows as ours."""
    maker = env.baseline_cached
    assert maker is not None
    with maker() as s:
        for pk in dict.fromkeys([*env.read_pks, *(pk for ids in env.batches for pk in ids)]):
            s.get(Item, pk)
            s.expunge_all()
    for pk in env.read_pks:
        with maker() as s:
            item = s.get(Item, pk)
            assert item is not None
            _ = item.category.section.department.name


def baseline_variant(env: Env, key: str, label: str, op: Callable[[int], int] | None) -> Variant:
    """The baseline version's row beside one of ours (``--baseline``)."""
    return Variant(
        key,
        f"{label}, baseline ({env.baseline_name})",
        "baseline",
        op,
        note="the same operation through the --baseline version of the library",
    )


# --------------------------------------------------------------------------- rows


def read_floor(client: Any, key: str) -> Any:
    """The floor's work: GET the bytes, unpack the row payload."""
    raw = client.get(key)
    return msgpack.unpackb(payload_of(raw)[1:], raw=False)


def floor_variant(env: Env) -> Variant:
    """redis-py GET of the exact bytes our cache stores for the row, plus msgpack decoding."""
    client = env.redis

    def op(i: int) -> int:
        key = env.floor_keys[env.read_pk(i)]
        t0 = perf_counter_ns()
        read_floor(client, key)
        return perf_counter_ns() - t0

    return Variant(
        key="floor",
        label="floor: redis-py GET + msgpack.unpackb",
        who="floor",
        op=op,
        note=(
            "GET of a plain key holding a copy of our entry's bytes, then msgpack.unpackb of "
            "its row payload (no ORM object built)"
        ),
    )


def orm_floor_variant(env: Env) -> Variant:
    """``session.get`` whose ``do_orm_execute`` handler does only the floor's work (GET and
    unpack) and returns no row: what SQLAlchemy's own get machinery adds to the floor, i.e.
    the least any cache behind ``do_orm_execute`` can cost. No instance is built."""
    client = env.redis
    maker = sessionmaker(env.engine)
    current: list[str] = [""]

    @event.listens_for(maker, "do_orm_execute")
    def answer(orm_state: Any) -> Any:
        read_floor(client, current[0])
        return _sa_compat.make_result([], "Item")  # the library's private result builder

    def op(i: int) -> int:
        pk = env.read_pk(i)
        current[0] = env.floor_keys[pk]
        t0 = perf_counter_ns()
        with maker() as s:
            s.get(Item, pk)
        return perf_counter_ns() - t0

    return Variant(
        key="floor.orm",
        label="bound: session.get answered by a do_orm_execute handler doing only the floor",
        who="floor",
        op=op,
        note=(
            "the floor's GET + unpack inside SQLAlchemy's session.get (new session per "
            "operation); the handler returns no row, so no instance is built"
        ),
    )


def session_variant(env: Env) -> Variant:
    """A new ``Session`` opened and closed with nothing done in it: what every
    ``session.get`` row of the group pays before reading anything (new session per
    operation)."""
    maker = env.plain

    def op(i: int) -> int:
        t0 = perf_counter_ns()
        with maker():
            pass
        return perf_counter_ns() - t0

    return Variant(
        key="session",
        label="bound: a new Session opened and closed, nothing else",
        who="floor",
        op=op,
        note="`with maker() as s: pass` (plain sessionmaker): every session.get row here pays it",
    )


def _get_one(s: Any, pk: int) -> Any:
    return s.get(Item, pk)


def _select_one(s: Any, pk: int) -> Any:
    return s.execute(select(Item).where(Item.id == pk).options(from_cache())).scalar_one()


def _select_one_uncached(s: Any, pk: int) -> Any:
    return s.execute(select(Item).where(Item.id == pk)).scalar_one()


#: the rows the near-cache row cycles through: a near cache is for rows read again and again
NEAR_HOT_ROWS = 20


def pk_variants(env: Env) -> list[Variant]:
    get_pg = timed_read(env.plain, env.read_pk, _get_one)
    get_cached = timed_read(env.cached, env.read_pk, _get_one)
    select_cached = timed_read(env.cached, env.read_pk, _select_one)
    select_pg = timed_read(env.plain, env.read_pk, _select_one_uncached)
    some_pk = env.read_pks[0]
    extra = []
    if env.near_cached is not None:
        hot = env.read_pks[:NEAR_HOT_ROWS]
        get_near = timed_read(env.near_cached, lambda i: hot[i % len(hot)], _get_one)
        extra.append(
            Variant(
                "get.near",
                "session.get, our cache with near_cache=True (warm)",
                "ours",
                get_near,
                note=f"new session per operation; {NEAR_HOT_ROWS} hot rows, each read again "
                "well within the 1 s a copy lives (a copy expired costs one Redis read)",
                check=combine_checks(
                    no_sql_check(env.engine, get_near, "went to PostgreSQL"),
                    values_check(detached_loader(env.near_cached, _get_one), some_pk),
                ),
            )
        )
    if env.baseline_cached is not None:
        get_baseline = timed_read(env.baseline_cached, env.read_pk, _get_one)
        extra.append(baseline_variant(env, "get.baseline", "session.get", get_baseline))
    if env.baseline_near_cached is not None:
        hot = env.read_pks[:NEAR_HOT_ROWS]
        near_baseline = timed_read(env.baseline_near_cached, lambda i: hot[i % len(hot)], _get_one)
        extra.append(
            baseline_variant(
                env, "get.near.baseline", "session.get, near_cache=True", near_baseline
            )
        )
    return [
        *extra,
        floor_variant(env),
        orm_floor_variant(env),
        session_variant(env),
        Variant(
            "get.pg",
            "session.get, PostgreSQL, no cache",
            "postgresql",
            get_pg,
            note="new session per operation",
        ),
        Variant(
            "get.cached",
            "session.get, our cache (warm)",
            "ours",
            get_cached,
            note="new session per operation",
            check=combine_checks(
                no_sql_check(env.engine, get_cached, "went to PostgreSQL"),
                values_check(detached_loader(env.cached, _get_one), some_pk),
            ),
        ),
        Variant(
            "select.cached",
            "select(M).where(M.id == x).options(from_cache())",
            "ours",
            select_cached,
            check=combine_checks(
                no_sql_check(env.engine, select_cached, "went to PostgreSQL"),
                values_check(detached_loader(env.cached, _select_one), some_pk),
            ),
        ),
        Variant(
            "select.pg",
            "select(M).where(M.id == x), PostgreSQL, no cache",
            "postgresql",
            select_pg,
        ),
    ]


def batch_variants(env: Env) -> list[Variant]:
    def make(maker: sessionmaker[Any], *opts: Any) -> Callable[[int], int]:

        def op(i: int) -> int:
            ids = env.batch(i)
            t0 = perf_counter_ns()
            with maker() as s:
                rows = s.execute(select(Item).where(Item.id.in_(ids)).options(*opts)).scalars()
                n = len(rows.all())
            elapsed = perf_counter_ns() - t0
            if n != len(ids):
                raise AssertionError(f"expected {len(ids)} rows, got {n}")
            return elapsed

        return op

    cached = make(env.cached, from_cache())

    def batch_check() -> str | None:
        before = env.cache.stats()
        with count_sql(env.engine) as statements:
            cached(0)
        after = env.cache.stats()
        if statements:
            return (
                "not served from cache yet: went to PostgreSQL "
                f"({len(statements)} SQL statement(s), {after.hits - before.hits} cache hits "
                "per operation)"
            )
        return None

    client = env.redis
    bound_maker = sessionmaker(env.engine)
    current: list[list[str]] = [[]]

    @event.listens_for(bound_maker, "do_orm_execute")
    def answer(orm_state: Any) -> Any:
        for raw in client.mget(current[0]):
            msgpack.unpackb(payload_of(raw)[1:], raw=False)
        return _sa_compat.make_result([], "Item")  # the library's private result builder

    def bound_op(i: int) -> int:
        ids = env.batch(i)
        current[0] = [env.floor_keys[pk] for pk in ids]
        t0 = perf_counter_ns()
        with bound_maker() as s:
            s.execute(select(Item).where(Item.id.in_(ids))).scalars().all()
        return perf_counter_ns() - t0

    extra = []
    if env.baseline_cached is not None:
        # the baseline's own option: ours is another class to it (a database load)
        baseline_op = make(env.baseline_cached, env.baseline_module.from_cache())
        baseline = baseline_variant(env, "batch.baseline", "100 rows by pk", baseline_op)

        def baseline_check() -> str | None:
            with count_sql(env.engine) as statements:
                baseline_op(0)
            if statements:
                return f"not served from cache: {len(statements)} SQL statement(s)"
            return None

        baseline.check = baseline_check
        extra.append(baseline)
    near_rows = []  # beside the Redis row
    if env.near_cached is not None:
        near = make(env.near_cached, from_cache())
        near_cache = env.near_cache
        assert near_cache is not None

        def near_check() -> str | None:
            near(0)  # copied into memory, if it was not yet
            before = near_cache.stats()
            with count_sql(env.engine) as statements:
                near(0)
            served = near_cache.stats().near_hits - before.near_hits
            if statements or served != len(env.batch(0)):
                return (
                    f"not served from the near cache: {served} of {len(env.batch(0))} rows "
                    f"from memory, {len(statements)} SQL statement(s)"
                )
            return None

        near_rows.append(
            Variant(
                "batch.near",
                "100 rows by pk: select ... IN .options(from_cache()), near_cache=True (warm)",
                "ours",
                near,
                note=f"the {len(env.batches)} id lists read again well within the 1 s a copy lives "
                "(a copy expired costs one MGET of the expired keys)",
                check=near_check,
            )
        )
    if env.baseline_near_cached is not None:
        near_rows.append(
            baseline_variant(
                env,
                "batch.near.baseline",
                "100 rows by pk, near_cache=True",
                make(env.baseline_near_cached, env.baseline_module.from_cache()),
            )
        )
    return [
        *extra,
        Variant(
            "batch.floor",
            "bound: the same select answered by a handler doing one MGET + unpack of the rows",
            "floor",
            bound_op,
            note=(
                "SQLAlchemy's select machinery around one MGET of copies of the 100 entries and "
                "their unpacking; no instance is built"
            ),
        ),
        Variant(
            "batch.pg",
            "100 rows by pk: select ... IN, PostgreSQL",
            "postgresql",
            make(env.plain),
        ),
        Variant(
            "batch.cached",
            "100 rows by pk: select ... IN .options(from_cache())",
            "ours",
            cached,
            check=batch_check,
        ),
        *near_rows,
    ]


def chain_variants(env: Env) -> list[Variant]:
    def make(maker: sessionmaker[Any]) -> Callable[[int], int]:
        def op(i: int) -> int:
            pk = env.read_pk(i)
            with maker() as s:
                item = s.get(Item, pk)  # not timed: the chain starts from a loaded item
                t0 = perf_counter_ns()
                department = item.category.section.department
                elapsed = perf_counter_ns() - t0
                if department is None:
                    raise AssertionError("broken chain")
            return elapsed

        return op

    cached = make(env.cached)

    def chain_check() -> str | None:
        pk = env.read_pk(0)
        with env.cached() as s:
            item = s.get(Item, pk)
            with count_sql(env.engine) as statements:
                _ = item.category.section.department
        if statements:
            return f"{len(statements)} of 3 hops went to PostgreSQL"
        return None

    extra = []
    if env.baseline_cached is not None:
        extra.append(
            baseline_variant(env, "chain.baseline", "3 lazy loads", make(env.baseline_cached))
        )
    return [
        *extra,
        Variant(
            "chain.pg",
            "3 many-to-one lazy loads, PostgreSQL",
            "postgresql",
            make(env.plain),
            note="item.category.section.department; the item load is not timed",
        ),
        Variant(
            "chain.cached",
            "3 many-to-one lazy loads, our cache",
            "ours",
            cached,
            check=chain_check,
        ),
    ]


def change_rows(objs: list[Any]) -> None:
    """The change every commit row makes: two columns of each row."""
    cent = decimal.Decimal("0.01")
    for obj in objs:
        obj.quantity = (obj.quantity + 1) % 1000
        obj.price = obj.price + cent


def commit_variants(env: Env, size: int) -> list[Variant]:
    def make(maker: sessionmaker[Any], variant: Variant | None) -> Callable[[int], int]:
        counter = env.commit_counter

        def op(i: int) -> int:
            ids = env.commit_ids(i, size)
            with maker() as s:
                objs = list(s.scalars(select(Item).where(Item.id.in_(ids))))
                change_rows(objs)
                counter.reset()
                t0 = perf_counter_ns()
                s.commit()
                elapsed = perf_counter_ns() - t0
                if variant is not None:
                    variant.metrics.setdefault("redis_round_trips", []).append(counter.count)
            return elapsed

        return op

    plain = Variant(
        f"commit{size}.plain",
        f"commit of {size:,} changed row(s), plain SQLAlchemy",
        "postgresql",
        None,
    )
    plain.op = make(env.plain, None)
    ours = Variant(
        f"commit{size}.cached",
        f"commit of {size:,} changed row(s), with our extension",
        "ours",
        None,
    )
    ours.op = make(env.commit_cached, ours)

    # the floor of any synchronous write-through: the plain commit, then the changed rows'
    # entries (copies of our entries' bytes) sent to Redis in one round trip after COMMIT
    client = env.redis
    entry = next(iter(env.floor_entries.values()), b"") if env.floor_entries else b""

    def floor_op(i: int) -> int:
        ids = env.commit_ids(i, size)
        with env.plain() as s:
            objs = list(s.scalars(select(Item).where(Item.id.in_(ids))))
            change_rows(objs)
            mapping = {f"{env.prefix}:commit-floor:{obj.id}": entry for obj in objs}
            t0 = perf_counter_ns()
            s.commit()
            client.mset(mapping)
            elapsed = perf_counter_ns() - t0
        return elapsed

    floor = Variant(
        f"commit{size}.floor",
        f"bound: plain commit of {size:,} row(s), then one MSET of their entries",
        "floor",
        floor_op,
        note="what any write-through that mirrors synchronously after COMMIT must add",
    )
    extra = []
    if size == 1:
        # until commit() returns; the publish runs on the cache's worker, and is waited for
        # after the measurement so that it never overlaps another row's round
        commit_background = make(env.commit_background, None)
        background_cache = env.background_cache

        def background_op(i: int) -> int:
            elapsed = commit_background(i)
            background_cache.flush_publishes(timeout=10.0)
            return elapsed

        extra.append(
            Variant(
                f"commit{size}.background",
                f'commit of {size:,} changed row(s), with our extension, publish="background"',
                "ours",
                background_op,
                note="until commit() returns; the publish then runs on the cache's worker",
            )
        )
    if env.baseline_cached is not None:
        label = f"commit of {size:,} changed row(s)"
        extra.append(
            baseline_variant(env, f"commit{size}.baseline", label, make(env.baseline_cached, None))
        )
    return [plain, floor, ours, *extra]


def readback_variants(env: Env) -> list[Variant]:
    """The web handler's read-back: get a row, change it, commit, read an attribute (with
    ``expire_on_commit``, the default, the read reloads the expired object). Only the read is
    timed. Each row changes rows of its own, so none reads a row another's commit changed
    behind its cache."""
    makers: list[tuple[str, str, str, Any]] = [
        ("readback.pg", "read-back after commit, PostgreSQL, no cache", "postgresql", env.plain),
        ("readback.cached", "read-back after commit, our cache", "ours", env.cached),
    ]
    if env.baseline_cached is not None:
        makers.append(("readback.baseline", "", "baseline", env.baseline_cached))
    variants = []
    for index, (key, label, who, maker) in enumerate(makers):
        pool = env.commit_pks[index :: len(makers)]

        def op(i: int, maker: Any = maker, pool: list[int] = pool) -> int:
            with maker() as s:
                pk = pool[i % len(pool)]  # loaded from the database, as the commit rows do
                item = s.scalars(select(Item).where(Item.id == pk)).one()
                change_rows([item])
                s.commit()
                t0 = perf_counter_ns()
                _ = item.name
                elapsed = perf_counter_ns() - t0
            return elapsed

        if who == "baseline":
            variants.append(baseline_variant(env, key, "read-back after commit", op))
        else:
            variants.append(Variant(key, label, who, op, note="only the attribute read is timed"))

    def readback_check() -> str | None:
        pk = env.commit_pks[1]
        with env.cached() as s:
            item = s.scalars(select(Item).where(Item.id == pk)).one()
            change_rows([item])
            s.commit()
            with count_sql(env.engine) as statements:
                _ = item.name
        if statements:
            return f"the read-back went to PostgreSQL ({len(statements)} statement(s))"
        return None

    variants[1].check = readback_check
    return variants


# --------------------------------------------------------------------------- memory


def bare_values(pk: int) -> list[Any]:
    """The row's values in their simplest msgpack-able form (datetime and Decimal as str)."""
    out: list[Any] = []
    for value in expected_values(pk):
        if isinstance(value, dt.datetime):
            value = value.isoformat()
        elif isinstance(value, decimal.Decimal):
            value = str(value)
        out.append(value)
    return out


def memory_usage(env: Env, sample: int = 100) -> dict[str, Any]:
    """Bytes per entry in Redis against the msgpack of the row's bare values."""
    layout = env.cache._layout_for(inspect(Item))
    assert layout is not None
    keys = env.cache._keys(layout, env.engine)
    strlen: list[int] = []
    usage: list[int] = []
    key_len: list[int] = []
    bare: list[int] = []
    for pk in env.read_pks[:sample]:
        key = keys.pair([pk])[0]
        n = env.redis.strlen(key)
        if not n:
            continue
        strlen.append(int(n))
        usage.append(int(env.redis.memory_usage(key, samples=0) or 0))
        key_len.append(len(key.encode()))
        bare.append(len(msgpack.packb(bare_values(pk), use_bin_type=True)))
    if not strlen:
        return {}
    return {
        "entries": len(strlen),
        "strlen": statistics.fmean(strlen),
        "memory_usage": statistics.fmean(usage),
        "key_bytes": statistics.fmean(key_len),
        "bare_msgpack": statistics.fmean(bare),
        "example_key": keys.pair([env.read_pks[0]])[0],
    }
