"""The near cache (``near_cache=``) under batch reads: ``select(M).where(M.id.in_(ids))`` with
``from_cache()``.

* an IN list whose rows are all in memory sends no Redis command and no SQL;
* one partly in memory sends one MGET, of the other keys only; a miss among them is loaded
  from the database and filled as before, and what that MGET finds is copied;
* another cache's commit to one of the rows is seen once its message arrives, and never
  later than the staleness bound (a writer that sends no message);
* the fill race, per key: an invalidation processed during the MGET keeps its key (its
  bucket's keys) from being stored, the others are stored;
* a model that opts out, a near cache that is not serving, and the loads that bypass the
  cache (locking, populate_existing, ``from_cache(False)``) read as without it;
* hits from one copy share no value a caller can change.

The asyncio flavour: ``test_near_cache_asyncio.py``. Tests that need a message wait for it;
none asserts a duration, except the bound itself, measured from when the commit returned.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from sqlalchemy import JSON, String, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from sqlalchemy_writethrough import CachedModel, NearCacheOptions, from_cache

from _cache_helpers import (
    BOUND,
    entry_key,
    installed,
    monitored,
    near_of,
    seed,
    serving,
    wait_until,
)
from _servers import capture_sql, reset_schema

#: the caches' epoch check interval: these tests list the commands a batch read sends, and a
#: periodic check (every second by default) falling into one under load adds an EVALSHA
QUIET = 3600.0

pytestmark = pytest.mark.databases("sqlite")


class Base(DeclarativeBase):
    pass


class NbItem(Base, CachedModel):
    __tablename__ = "nb_item"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(50))


class NbFar(Base, CachedModel):
    """A model that opts out of the near cache."""

    __tablename__ = "nb_far"
    __writethrough__ = {"near_cache": False}

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(50))


class NbDoc(Base, CachedModel):
    """A model with a value a caller can change in place."""

    __tablename__ = "nb_doc"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(50))
    doc: Mapped[dict[str, Any]] = mapped_column(JSON)


@pytest.fixture
def db(engine: Engine) -> Engine:
    reset_schema(engine, Base.metadata)
    return engine


def rename(factory: sessionmaker[Session], name: str, pk: int) -> None:
    with factory() as s:
        obj = s.get(NbItem, pk)
        assert obj is not None
        obj.name = name
        s.commit()


def batch(
    factory: sessionmaker[Session], ids: list[int], model: type = NbItem, **options: Any
) -> list[tuple[int, str]]:
    """(id, name) of each row an IN list of ``ids`` read with ``from_cache()`` returns."""
    with factory() as s:
        stmt = select(model).where(model.id.in_(ids)).options(from_cache())  # type: ignore[attr-defined]
        if options:
            stmt = stmt.execution_options(**options)
        return [(row.id, row.name) for row in s.scalars(stmt)]


def items(*ids: int, suffix: str = "") -> list[tuple[int, str]]:
    """The rows of ``ids`` as a batch returns them: in key order, as the database does."""
    return [(i, f"n{i}{suffix}") for i in sorted(ids)]


def words(command: str) -> list[str]:
    """A command as MONITOR shows it, in words (the keys have no spaces)."""
    return [w.strip('"') for w in command.split(" ")]


# ------------------------------------------------------------------------------ tests


def test_an_in_list_in_memory_sends_no_redis_command_and_no_sql(
    db: Engine,
    caches: Any,
    redis_url: str,
    prefix: str,
) -> None:
    cache = caches(epoch_check_interval=QUIET)
    factory = installed(db, cache)
    seed(factory, *[NbItem(id=i, name=f"n{i}") for i in range(1, 6)])
    serving(cache)
    near = near_of(cache)
    ids = [3, 1, 5, 2, 4]
    assert batch(factory, ids) == items(*ids)  # from Redis, now in memory
    assert near.stores == 5 and near.hits == 0
    with monitored(redis_url, prefix) as commands, capture_sql(db) as sql:
        assert batch(factory, ids) == items(*ids)  # the order asked for, as before
        assert batch(factory, [4, 4, 2]) == items(4, 2)
    assert commands == []
    assert sql == []
    assert near.hits == 7
    stats = cache.stats()
    assert stats.near_hits == 7 and stats.hits == 12
    assert stats.models["NbItem"].near_hits == 7


def test_an_in_list_partly_in_memory_sends_one_mget_of_the_rest(
    db: Engine,
    caches: Any,
    redis_url: str,
    prefix: str,
) -> None:
    cache = caches(epoch_check_interval=QUIET)
    factory = installed(db, cache)
    seed(factory, *[NbItem(id=i, name=f"n{i}") for i in range(1, 7)])
    cache.invalidate(NbItem, 6)  # a miss in Redis: loaded from the database, filled
    serving(cache)
    near = near_of(cache)
    assert batch(factory, [1, 2, 3]) == items(1, 2, 3)
    key_of = {i: entry_key(cache, NbItem, i, bind=db) for i in range(1, 7)}
    with monitored(redis_url, prefix) as commands, capture_sql(db) as sql:
        assert batch(factory, [1, 2, 3, 4, 5, 6, 7]) == items(1, 2, 3, 4, 5, 6)
    mgets = [words(c) for c in commands if words(c)[0].upper() == "MGET"]
    assert len(mgets) == 1
    asked = set(mgets[0][1:])
    assert {key_of[i] for i in (4, 5, 6)} <= asked
    assert not {key_of[i] for i in (1, 2, 3)} & asked
    assert len(sql) == 1  # 6 and 7 (not in the database): one query, as without it
    assert near.hits == 3
    assert key_of[6] not in near._entries  # loaded from the database: not a copy
    assert {key_of[i] for i in (1, 2, 3, 4, 5)} <= near._entries.keys()
    # 6 was filled: the next batch reads it (only it) from Redis, then from memory
    with monitored(redis_url, prefix) as commands, capture_sql(db) as sql:
        assert batch(factory, [6, 5, 4, 3, 2, 1]) == items(6, 5, 4, 3, 2, 1)
    assert [words(c)[0].upper() for c in commands] == ["MGET"]
    assert key_of[6] in words(commands[0]) and key_of[5] not in words(commands[0])
    assert sql == []
    with monitored(redis_url, prefix) as commands:
        assert batch(factory, [6, 5, 4, 3, 2, 1]) == items(6, 5, 4, 3, 2, 1)
    assert commands == []


def test_another_process_commit_is_seen_once_its_message_arrives(
    db: Engine,
    caches: Any,
) -> None:
    reader, writer = caches(), caches()
    mine, theirs = installed(db, reader), installed(db, writer)
    seed(theirs, *[NbItem(id=i, name=f"n{i}") for i in (1, 2, 3)])
    serving(reader)
    near = near_of(reader)
    assert batch(mine, [1, 2, 3]) == items(1, 2, 3)
    assert batch(mine, [1, 2, 3]) == items(1, 2, 3)
    assert near.hits == 3
    key = entry_key(reader, NbItem, 2, bind=db)
    seen = near.messages
    rename(theirs, "b", pk=2)
    wait_until(lambda: key not in near._entries, "the writer's first message")
    assert batch(mine, [1, 2, 3]) == [(1, "n1"), (2, "b"), (3, "n3")]  # once it arrives
    assert near.hits >= 5  # 1 and 3 from memory
    # its lock's message, then its publish's: a read that began before the second one was
    # processed keeps no copy of 2 (the fill race); once both are, the next read copies it
    wait_until(lambda: near.messages >= seen + 2, "the writer's messages")
    assert batch(mine, [1, 2, 3]) == [(1, "n1"), (2, "b"), (3, "n3")]
    hits = near.hits
    assert batch(mine, [1, 2, 3]) == [(1, "n1"), (2, "b"), (3, "n3")]
    assert near.hits == hits + 3


def test_a_writer_that_sends_no_message_is_seen_within_the_bound(
    db: Engine,
    caches: Any,
) -> None:
    reader = caches(near_cache=NearCacheOptions(staleness=BOUND))
    writer = caches(near_cache=False)  # its scripts publish nothing
    mine, theirs = installed(db, reader), installed(db, writer)
    seed(theirs, *[NbItem(id=i, name=f"n{i}") for i in (1, 2, 3)])
    serving(reader)
    assert batch(mine, [1, 2, 3]) == items(1, 2, 3)
    rename(theirs, "b", pk=2)
    committed = time.monotonic()  # commit() has returned
    while True:
        began = time.monotonic()
        seen = batch(mine, [1, 2, 3])
        if seen[1] != (2, "n2"):
            break
        # the old row, served from memory: only by a read that began within the bound
        assert began - committed <= BOUND, "served older than the staleness bound"
    assert seen == [(1, "n1"), (2, "b"), (3, "n3")]


@pytest.mark.parametrize(
    ("during", "messages", "stored"),
    [
        ("its row committed", 2, (1, 3)),
        ("its model invalidated", 1, ()),
        ("another row committed", 2, (1, 2, 3)),
    ],
)
def test_a_value_read_before_an_invalidation_is_not_stored_after_it(
    db: Engine,
    caches: Any,
    during: str,
    messages: int,
    stored: tuple[int, ...],
) -> None:
    """The batch's MGET and its stores are split by another process's write and its
    messages, processed in between: each key is stored unless that write touched it (its
    bucket)."""
    reader, writer = caches(), caches()
    mine, theirs = installed(db, reader), installed(db, writer)
    seed(theirs, *[NbItem(id=i, name=f"n{i}") for i in (1, 2, 3, 4)])
    serving(reader)
    near = near_of(reader)
    backend: Any = reader._backend
    real_peek_many = backend.peek_many
    raced = threading.Event()

    def peek_then_write(pairs: Any) -> Any:
        found = real_peek_many(pairs)  # the rows as they were
        if not raced.is_set():
            raced.set()
            seen = near.messages
            if during == "its row committed":
                rename(theirs, "b", pk=2)
            elif during == "its model invalidated":
                writer.invalidate(NbItem)
            else:
                rename(theirs, "b", pk=4)
            wait_until(lambda: near.messages >= seen + messages, "the writer's messages")
        return found

    backend.peek_many = peek_then_write
    try:
        assert batch(mine, [1, 2, 3]) == items(1, 2, 3)  # what Redis held when it began
    finally:
        del backend.peek_many
    assert near.refused == 3 - len(stored)
    assert set(near._entries) == {entry_key(reader, NbItem, i, bind=db) for i in stored}
    after = [(1, "n1"), (2, "n2" if during != "its row committed" else "b"), (3, "n3")]
    for _ in range(2):  # the rest from Redis, then all from memory
        assert batch(mine, [1, 2, 3]) == after
    assert len(near) == 3


def test_a_model_that_opts_out_reads_its_batches_from_redis(
    db: Engine,
    caches: Any,
    redis_url: str,
    prefix: str,
) -> None:
    cache = caches(epoch_check_interval=QUIET)
    factory = installed(db, cache)
    seed(factory, *[NbFar(id=i, name=f"n{i}") for i in (1, 2)])
    serving(cache)
    near = near_of(cache)
    assert batch(factory, [1, 2], NbFar) == items(1, 2)
    with monitored(redis_url, prefix) as commands, capture_sql(db) as sql:
        assert batch(factory, [1, 2], NbFar) == items(1, 2)
    assert [words(c)[0].upper() for c in commands] == ["MGET"]
    assert sql == []
    assert len(near) == 0 and near.hits == 0
    assert cache.stats().near_hits == 0


def test_a_near_cache_not_serving_sends_batches_to_redis(
    db: Engine,
    caches: Any,
    redis_url: str,
    prefix: str,
) -> None:
    """A stalled subscriber (its heartbeats late): the batch goes to Redis whole (the copies
    it holds are not served), nothing is kept; once it serves again, batches are copied and served from memory again."""
    cache = caches(epoch_check_interval=QUIET)
    factory = installed(db, cache)
    seed(factory, *[NbItem(id=i, name=f"n{i}") for i in (1, 2, 3)])
    serving(cache)
    near = near_of(cache)
    assert batch(factory, [1, 2]) == items(1, 2)
    stall = threading.Event()
    handle = near._handle

    def stalled(message: dict[str, Any]) -> None:
        stall.wait(10)
        handle(message)

    near._handle = stalled  # type: ignore[method-assign]
    try:
        wait_until(lambda: not near.serving(), "the heartbeat to be late")
        hits, stores = near.hits, near.stores
        with monitored(redis_url, prefix) as commands:
            assert batch(factory, [1, 2, 3]) == items(1, 2, 3)
        mgets = [words(c) for c in commands if words(c)[0].upper() == "MGET"]
        assert len(mgets) == 1
        assert {entry_key(cache, NbItem, i, bind=db) for i in (1, 2, 3)} <= set(mgets[0])
        assert near.hits == hits and near.stores == stores  # nothing served, nothing kept
    finally:
        stall.set()
        del near._handle
    serving(cache)
    assert batch(factory, [1, 2, 3]) == items(1, 2, 3)  # copied (1 and 2 may have expired)
    hits = near.hits
    assert batch(factory, [1, 2, 3]) == items(1, 2, 3)
    assert near.hits == hits + 3


def test_loads_that_bypass_the_cache_read_the_database(
    db: Engine,
    caches: Any,
) -> None:
    cache = caches(epoch_check_interval=QUIET)
    factory = installed(db, cache)
    seed(factory, *[NbItem(id=i, name=f"n{i}") for i in (1, 2)])
    serving(cache)
    assert batch(factory, [1, 2]) == items(1, 2)  # in memory
    with db.begin() as conn:  # behind the cache: only loads that read the database see it
        conn.execute(update(NbItem).values(name="db"))
    assert batch(factory, [1, 2], populate_existing=True) == [(1, "db"), (2, "db")]
    with factory() as s:
        stmt = select(NbItem).where(NbItem.id.in_([1, 2]))
        locked = s.scalars(stmt.options(from_cache()).with_for_update()).all()
        assert [(r.id, r.name) for r in locked] == [(1, "db"), (2, "db")]
    with factory() as s:
        off = s.scalars(stmt.options(from_cache(False))).all()
        assert [(r.id, r.name) for r in off] == [(1, "db"), (2, "db")]
    assert batch(factory, [1, 2]) == items(1, 2)  # the plain batch: from memory


def test_batch_hits_from_one_copy_share_no_value_a_caller_can_change(
    db: Engine,
    caches: Any,
) -> None:
    cache = caches(epoch_check_interval=QUIET)
    factory = installed(db, cache)
    seed(factory, *[NbDoc(id=i, name=f"n{i}", doc={"k": [i]}) for i in (1, 2)])
    serving(cache)
    for _ in range(3):  # from Redis, then twice from the copies
        with factory() as s:
            docs = s.scalars(select(NbDoc).where(NbDoc.id.in_([1, 2])).options(from_cache()))
            found = list(docs)
            assert [(d.id, d.doc) for d in found] == [(1, {"k": [1]}), (2, {"k": [2]})]
            for d in found:
                d.doc["k"].append(0)  # in place, never committed
            s.rollback()
    assert near_of(cache).hits == 4


def test_batch_hits_from_kept_decodings_give_each_instance_its_own_values(
    db: Engine, caches: Any, redis_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch whose entries are all copies decoded before is built from their kept
    decodings in one loop (``_kept_rows``, checked here to be the path taken), without SQL
    or a Redis command, and each instance gets values of its own: a change never committed
    is not served by the next hit."""
    from sqlalchemy_writethrough import loading

    cache = caches(epoch_check_interval=QUIET)
    factory = installed(db, cache)
    seed(factory, *[NbItem(id=i, name=f"n{i}") for i in (1, 2, 3)])
    serving(cache)
    taken: list[bool] = []
    real = loading._kept_rows

    def spy(*args: Any) -> Any:
        rows = real(*args)
        taken.append(rows is not None)
        return rows

    monkeypatch.setattr(loading, "_kept_rows", spy)
    assert batch(factory, [1, 2, 3]) == items(1, 2, 3)  # from Redis, copied
    assert batch(factory, [3, 1, 2]) == items(3, 1, 2)  # the copies decoded, decodings kept
    with capture_sql(db) as statements, monitored(redis_url, prefix) as commands:
        for _ in range(2):
            with factory() as s:
                found = list(
                    s.scalars(select(NbItem).where(NbItem.id.in_([1, 2, 3])).options(from_cache()))
                )
                assert [(o.id, o.name) for o in found] == items(1, 2, 3)
                for o in found:
                    o.name = "changed"  # never committed
    assert statements == []
    assert commands == []
    assert taken == [False, True, True]
    assert near_of(cache).hits >= 8
