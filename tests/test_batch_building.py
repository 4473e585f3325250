"""The batch read's own decoding and building (``select(M).where(M.id.in_(ids))`` with
``from_cache()``): what it takes shortcuts for must read exactly as the single-row path.

* ``ModelLayout.decode_rows`` (one loop: unpacking, the class tag, the columns, the key) says
  of each entry what ``decode_row`` and the key check say, whatever the entry holds: a decimal
  or naive datetime stored as a string is converted inline, and one that is not such a string
  is a miss, never an error;
* instances built from an entry own their values: a change to one (never committed) is seen
  by no later read, from Redis or from the near cache's copies;
* ``build_persistent_many`` hands a decoded dict over as the instance's ``__dict__`` only where
  ``object.__new__`` and SQLAlchemy's state attribute make that what ``new_instance`` does, and
  inlines ``_WeakInstanceDict._add_unpresent``: an upgrade that changes either fails here.
"""

from __future__ import annotations

import datetime as dt
import decimal
import inspect as pyinspect
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
from sqlalchemy import DateTime, Numeric, String, create_engine, inspect, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from sqlalchemy_writethrough import CachedModel, WriteThroughCache, _sa_compat, codec, from_cache
from sqlalchemy_writethrough.model import ModelLayout

from _cache_helpers import entry_key, installed, near_of, seed, serving
from _servers import capture_sql, reset_schema

pytestmark = pytest.mark.databases("sqlite")


class Base(DeclarativeBase):
    pass


class BbRow(Base, CachedModel):
    __tablename__ = "bb_row"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(50))
    price: Mapped[decimal.Decimal | None] = mapped_column(Numeric(10, 2))
    at: Mapped[dt.datetime | None] = mapped_column(DateTime)


class BbOwnNew(Base, CachedModel):
    """A class whose ``__new__`` gives each instance something of its own."""

    __tablename__ = "bb_own_new"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(50))

    def __new__(cls, *args: Any, **kwargs: Any) -> BbOwnNew:
        instance = super().__new__(cls)
        instance.__dict__["made_by_new"] = True
        return instance


def rows(*ids: int) -> list[BbRow]:
    return [
        BbRow(
            id=i,
            name=f"row {i}",
            price=None if i % 3 == 0 else decimal.Decimal(i * 37).scaleb(-2),
            at=None if i % 4 == 0 else dt.datetime(2024, 1, 2, 3, 4, 5, i * 1001),
        )
        for i in ids
    ]


@pytest.fixture
def setup(
    engine: Engine, redis_url: str, prefix: str
) -> Iterator[tuple[sessionmaker[Session], WriteThroughCache]]:
    reset_schema(engine, Base.metadata)
    cache = WriteThroughCache(redis_url, prefix=prefix, stats_interval=None)
    factory = sessionmaker(engine)
    cache.install(factory)
    with factory() as session:
        session.add_all(rows(*range(1, 13)))
        session.add_all([BbOwnNew(id=i, name=f"own {i}") for i in (1, 2)])
        session.commit()
    yield factory, cache
    cache.uninstall(factory)
    cache.close()


def batch(factory: sessionmaker[Session], model: Any, ids: list[int]) -> list[tuple[Any, ...]]:
    with factory() as session:
        found = session.scalars(select(model).where(model.id.in_(ids)).options(from_cache()))
        return [tuple(getattr(obj, a.key) for a in inspect(model).column_attrs) for obj in found]


def test_decode_rows_says_what_decode_row_says_of_every_entry() -> None:
    dialect = create_engine("sqlite://").dialect
    cache = WriteThroughCache("redis://127.0.0.1:1", stats_interval=None)
    layout = ModelLayout(BbRow.__mapper__, cache._defaults, cache.prefix, 16)
    version = bytes([codec.FORMAT_VERSION])

    def payload(*values: Any) -> bytes:
        return version + msgpack.packb(list(values))

    good = payload(0, 7, "seven", "1.50", "2024-01-02T03:04:05.000006")
    entries: list[tuple[Any, int]] = [
        (good, 7),
        (good, 8),  # another key's row
        (payload(0, 9, "nine", None, None), 9),
        (payload(0, 9, "nine", "1E+3", "2024-01-02"), 9),
        (payload(0, 9, "nine", "1.5.0", None), 9),  # not a decimal
        (payload(0, 9, "nine", 150, None), 9),  # not a string
        (payload(0, 9, "nine", None, "2024-01-02T03:04:05+01:00"), 9),  # aware
        (payload(0, 9, "nine", None, "yesterday"), 9),
        # another stored form: the column's decoder's, as on the single-entry path
        (payload(0, 9, "nine", None, ["2024-01-02T03:04:05", "UTC", 0]), 9),
        (payload(0, 9, 9, None, None), 9),  # a column of another type
        (payload(0, 9, "nine", None), 9),  # a column short
        (payload(1, 9, "nine", None, None), 9),  # another class's tag
        (payload(False, 9, "nine", None, None), 9),
        (payload(0.0, 9, "nine", None, None), 9),
        (version + msgpack.packb({"a": 1}), 9),
        (version + b"\xc1", 9),
        (bytes([codec.FORMAT_VERSION + 1]) + msgpack.packb([0, 9, "nine", None, None]), 9),
        (version, 9),
        (b"", 9),
        (False, 9),
        (memoryview(b"??" + good)[2:], 7),
    ]
    expected: list[Any] = []
    for entry, pk in entries:
        try:
            if entry is False:
                raise codec.DecodeError("absent")
            _, values = layout.decode_row(entry, dialect)
            expected.append(values if values["id"] == pk else None)
        except (codec.DecodeError, ValueError):
            expected.append(None)
    found, variants = layout.decode_rows([e for e, _ in entries], dialect, [p for _, p in entries])
    assert variants is None  # one class: no class per row
    assert found == expected
    assert found[0] == {
        "id": 7,
        "name": "seven",
        "price": decimal.Decimal("1.50"),
        "at": dt.datetime(2024, 1, 2, 3, 4, 5, 6),
    }
    assert found[2] == {"id": 9, "name": "nine", "price": None, "at": None}
    assert found[3] is not None and str(found[3]["price"]) == "1E+3"  # as stored, exactly
    assert [i for i, values in enumerate(found) if values is not None] == [0, 2, 3, 8, 20]
    # the single-entry path raises DecodeError for what the batch path refuses
    for index in (4, 5, 6, 7):
        with pytest.raises(codec.DecodeError):
            layout.decode_row(entries[index][0], dialect)
    cache.close()


def test_a_batch_from_redis_reads_what_the_database_holds(
    engine: Engine, setup: tuple[sessionmaker[Session], WriteThroughCache]
) -> None:
    factory, _ = setup
    ids = list(range(1, 13))
    with factory() as session:
        from_db = [
            (r.id, r.name, r.price, r.at)
            for r in session.scalars(select(BbRow).where(BbRow.id.in_(ids)))
        ]
    assert batch(factory, BbRow, ids) == from_db  # filled
    with capture_sql(engine) as sql:
        assert batch(factory, BbRow, ids) == from_db  # from Redis
    assert sql == []


def test_a_damaged_decimal_in_a_batch_is_a_miss_loaded_from_the_database(
    engine: Engine, setup: tuple[sessionmaker[Session], WriteThroughCache], redis_url: str
) -> None:
    import redis

    factory, cache = setup
    ids = [1, 2, 4]
    expected = batch(factory, BbRow, ids)
    client = redis.Redis.from_url(redis_url)
    try:
        key = entry_key(cache, BbRow, 2)
        raw = client.get(key)
        assert raw is not None
        header = raw[: raw.index(b":", 1) + 1]
        client.set(
            key, header + bytes([codec.FORMAT_VERSION]) + msgpack.packb([0, 2, "x", "1.2.3", None])
        )
    finally:
        client.close()
    before = cache.stats()
    with capture_sql(engine) as sql:
        assert batch(factory, BbRow, ids) == expected
    assert len(sql) == 1
    after = cache.stats()
    assert after.decode_errors - before.decode_errors == 1
    assert after.hits - before.hits == 2


def test_a_change_to_an_instance_is_seen_by_no_later_read(db: Engine, caches: Any) -> None:
    """Each instance owns its values (the decoded dict is its ``__dict__``): from Redis, then
    from the near cache's copies, whose decoding is kept for the next hits."""
    cache = caches()
    factory = installed(db, cache)
    seed(factory, *rows(1, 2, 3))
    serving(cache)
    expected = batch(factory, BbRow, [1, 2, 3])
    for _ in range(3):  # from Redis, then from the copies
        with factory() as session:
            found = session.scalars(
                select(BbRow).where(BbRow.id.in_([1, 2, 3])).options(from_cache())
            ).all()
            assert [(r.id, r.name, r.price, r.at) for r in found] == expected
            for r in found:
                r.name = "changed"
                r.price = decimal.Decimal("0.01")
                session.expunge(r)
            session.rollback()
    assert batch(factory, BbRow, [1, 2, 3]) == expected
    assert near_of(cache).hits == 12  # every read after the first: from the copies


@pytest.fixture
def db(engine: Engine) -> Engine:
    reset_schema(engine, Base.metadata)
    return engine


def test_a_class_with_its_own_new_keeps_what_new_gave(
    setup: tuple[sessionmaker[Session], WriteThroughCache],
) -> None:
    factory, _ = setup
    assert batch(factory, BbOwnNew, [1, 2]) == [(1, "own 1"), (2, "own 2")]  # filled
    with factory() as session:
        found = session.scalars(
            select(BbOwnNew).where(BbOwnNew.id.in_([1, 2])).options(from_cache())
        ).all()
        assert [(o.id, o.name, o.__dict__.get("made_by_new")) for o in found] == [
            (1, "own 1", True),
            (2, "own 2", True),
        ]
        assert not session.dirty


def test_build_persistent_many_hands_owned_values_over() -> None:
    """An owned dict becomes the instance's ``__dict__``, the state in it, as
    ``ClassManager.new_instance`` and ``_state_setter`` would store it; the identity map holds
    the state as ``_WeakInstanceDict._add_unpresent`` would."""
    from sqlalchemy.orm.base import DEFAULT_STATE_ATTR, instance_dict
    from sqlalchemy.orm.instrumentation import ClassManager

    # run alone (xdist), nothing else has configured the mappers: an attribute read needs it,
    # as any ORM load would have done before. This module's only: configure_mappers() would
    # configure every mapper the worker's other modules made meanwhile (20 s to a minute)
    inspect(BbRow).registry.configure()
    manager = inspect(BbRow).class_manager
    assert manager.STATE_ATTR == DEFAULT_STATE_ATTR == "_sa_instance_state"
    assert manager.dict_getter() is instance_dict
    assert type(manager).new_instance is ClassManager.new_instance
    source = pyinspect.getsource(_sa_compat.WEAK_INSTANCE_DICT._add_unpresent)
    assert "self._dict[key] = state" in source
    assert "state._instance_dict = self._wr" in source

    session = Session()
    assert type(session.identity_map) is _sa_compat.WEAK_INSTANCE_DICT
    mapper = inspect(BbRow)
    values = [{"id": n, "name": f"n{n}", "price": None, "at": None} for n in (1, 2)]
    keys = [mapper.identity_key_from_primary_key((n,)) for n in (1, 2)]
    objs = _sa_compat.build_persistent_many(
        session, mapper, list(zip(keys, values, strict=True)), (), True
    )
    for obj, key, given in zip(objs, keys, values, strict=True):
        state = inspect(obj)
        assert obj.__dict__ is given and given[DEFAULT_STATE_ATTR] is state
        assert state.persistent and state.key == key and state.session_id == session.hash_key
        assert (
            session.identity_map.get(key) is obj and state._instance_dict() is session.identity_map
        )
        assert obj.name == given["name"]
    assert not session.dirty
    # not owned: the dicts are copied, as before
    other = Session()
    kept = [{"id": 3, "name": "n3", "price": None, "at": None}]
    (obj,) = _sa_compat.build_persistent_many(
        other, mapper, [(mapper.identity_key_from_primary_key((3,)), kept[0])], ()
    )
    assert obj.__dict__ is not kept[0] and DEFAULT_STATE_ATTR not in kept[0]
    session.close()
    other.close()
