"""``select(M).where(M.id.in_(ids)).options(from_cache())``: many rows by primary key.

Every row found in Redis comes from one MGET (one round trip whatever the number of rows); the
missing rows come from one database query and are filled, as single misses are. The result
holds the same rows as the database query would, in primary key order (the order an IN query
without ORDER BY gives on SQLite and InnoDB, and on PostgreSQL while the rows lie in key order);
with ORDER BY the query goes to the database.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import String, TypeDecorator, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from sqlalchemy_writethrough import CachedModel, WriteThroughCache, from_cache

from _servers import COUNTED, capture_sql, counting_redis, reset_schema


class Base(DeclarativeBase):
    pass


class BrItem(Base, CachedModel):
    __tablename__ = "br_item"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))


class BrCode(Base, CachedModel):
    """A string primary key: "1" is another row than BrItem's 1."""

    __tablename__ = "br_code"
    code: Mapped[str] = mapped_column(String(20), primary_key=True)
    name: Mapped[str] = mapped_column(String(50))


@pytest.fixture
def setup(
    engine: Engine, redis_url: str, prefix: str
) -> Iterator[tuple[sessionmaker[Session], WriteThroughCache, object]]:
    reset_schema(engine, Base.metadata)
    client, counter = counting_redis(redis_url)
    cache = WriteThroughCache(client, prefix=prefix, **COUNTED)
    factory = sessionmaker(engine)
    cache.install(factory)
    with factory() as session:
        session.add_all([BrItem(id=i, name=f"item {i}") for i in range(1, 151)])
        session.commit()
    yield factory, cache, counter
    cache.uninstall(factory)
    client.close()


def names(rows: list[BrItem]) -> list[tuple[int, str]]:
    return [(r.id, r.name) for r in rows]


def test_all_hits_are_one_round_trip_and_no_sql(engine: Engine, setup: tuple) -> None:
    factory, cache, counter = setup
    ids = list(range(1, 101))
    counter.reset()
    with capture_sql(engine) as sql, factory() as session:
        rows = session.scalars(select(BrItem).where(BrItem.id.in_(ids)).options(from_cache())).all()
    assert names(rows) == [(i, f"item {i}") for i in ids]
    assert sql == []
    assert counter.count == 1
    assert cache.stats().hits == 100


def test_misses_load_once_and_fill(engine: Engine, setup: tuple) -> None:
    factory, cache, counter = setup
    for pk in (3, 5, 8):
        cache.invalidate(BrItem, pk)
    ids = [8, 1, 5, 999, 3, 1]  # a duplicate and a row that does not exist
    counter.reset()
    with capture_sql(engine) as sql, factory() as session:
        rows = session.scalars(select(BrItem).where(BrItem.id.in_(ids)).options(from_cache())).all()
    assert names(rows) == [(1, "item 1"), (3, "item 3"), (5, "item 5"), (8, "item 8")]
    assert len(sql) == 1, "one query for the missing rows"
    assert counter.count == 3, "one MGET, the leases in one round trip, the fills in one"
    with Session(engine) as plain:
        expected = plain.scalars(select(BrItem).where(BrItem.id.in_(ids))).all()
        assert names(rows) == names(expected)
    with capture_sql(engine) as sql, factory() as session:
        again = session.scalars(
            select(BrItem).where(BrItem.id.in_([3, 5, 8])).options(from_cache())
        )
        assert names(list(again)) == [(3, "item 3"), (5, "item 5"), (8, "item 8")]
    assert sql == [], "the misses were filled"


@pytest.mark.parametrize("cached", ["every row", "some rows", "none"])
def test_rows_come_in_the_order_the_database_gives_them(
    engine: Engine, setup: tuple, cached: str
) -> None:
    """An IN query without ORDER BY promises no order, but applications come to rely on the
    one their database gives: by primary key on SQLite and InnoDB, and on PostgreSQL while
    the rows lie in key order (as here). The rows came in the order of the list, so the
    same query changed its order with the cache's temperature."""
    factory, cache, _ = setup
    ids = [9, 2, 7, 4, 12, 1]
    if cached == "some rows":
        for pk in (2, 12):
            cache.invalidate(BrItem, pk)
    elif cached == "none":
        for pk in ids:
            cache.invalidate(BrItem, pk)
    stmt = select(BrItem).where(BrItem.id.in_(ids))
    with Session(engine) as plain:
        expected = names(list(plain.scalars(stmt)))
    with factory() as session:
        rows = session.scalars(stmt.options(from_cache())).all()
    assert names(rows) == expected == [(i, f"item {i}") for i in sorted(ids)]


def test_identity_map_objects_are_returned_as_they_are(engine: Engine, setup: tuple) -> None:
    factory, _, _ = setup
    with factory() as session:
        mine = session.get(BrItem, 2)
        assert mine is not None
        with session.no_autoflush:
            mine.name = "edited, not flushed"
            rows = session.scalars(
                select(BrItem).where(BrItem.id.in_([1, 2])).options(from_cache())
            ).all()
        assert rows[1] is mine and mine.name == "edited, not flushed"


def test_order_by_and_no_option_go_to_the_database(engine: Engine, setup: tuple) -> None:
    factory, _, _ = setup
    with capture_sql(engine) as sql, factory() as session:
        rows = session.scalars(
            select(BrItem)
            .where(BrItem.id.in_([3, 1, 2]))
            .order_by(BrItem.name.desc())
            .options(from_cache())
        ).all()
        assert [r.id for r in rows] == [3, 2, 1]
        session.scalars(select(BrItem).where(BrItem.id.in_([1, 2]))).all()
    assert len(sql) == 2


def test_rows_changed_since_are_not_served_stale(engine: Engine, setup: tuple) -> None:
    factory, _, _ = setup
    with factory() as session:
        item = session.get(BrItem, 4)
        assert item is not None
        item.name = "renamed"
        session.commit()
    with factory() as session:
        rows = session.scalars(select(BrItem).where(BrItem.id.in_([4, 5])).options(from_cache()))
        assert names(list(rows)) == [(4, "renamed"), (5, "item 5")]


class Shouting:
    """What the column loads as: a value its own type cannot bind again."""

    def __init__(self, text: str) -> None:
        self.text = text


class ShoutingText(TypeDecorator[Any]):
    impl = String(50)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Any) -> Any:
        if isinstance(value, Shouting):
            raise TypeError("a loaded value cannot be bound again")
        return value

    def process_result_value(self, value: Any, dialect: Any) -> Any:
        return None if value is None else Shouting(value)


class BrNote(Base, CachedModel):
    __tablename__ = "br_note"
    id: Mapped[int] = mapped_column(primary_key=True)
    body: Mapped[Any] = mapped_column(ShoutingText)


def test_a_row_that_cannot_be_stored_is_served_from_the_database(
    engine: Engine, setup: tuple
) -> None:
    """A fill that cannot encode its row stores nothing and raises nothing, on both paths."""
    factory, cache, _ = setup
    with factory() as session:
        session.add_all([BrNote(id=1, body="one"), BrNote(id=2, body="two")])
        session.commit()
    cache.invalidate(BrNote)  # misses: the loads below try to fill
    with factory() as session:
        rows = session.scalars(select(BrNote).where(BrNote.id.in_([1, 2])).options(from_cache()))
        assert [r.body.text for r in rows] == ["one", "two"]
    with factory() as session:
        note = session.get(BrNote, 1)
        assert note is not None and note.body.text == "one"


def test_damaged_entries_in_a_batch_are_misses_and_the_rest_hits(
    engine: Engine, setup: tuple, redis_url: str
) -> None:
    """Among the entries one read fetches, garbage and another key's row are each a miss
    (counted, logged, removed) loaded from the database; every other entry is a hit."""
    import redis

    from _cache_helpers import entry_key

    factory, cache, _ = setup
    client = redis.Redis.from_url(redis_url)
    try:
        garbage_key = entry_key(cache, BrItem, 4)
        raw = client.get(garbage_key)
        assert raw is not None
        header = raw[: raw.index(b":", 1) + 1]
        client.set(garbage_key, header + b"\x01not msgpack")
        swapped_key = entry_key(cache, BrItem, 6)
        row6, row7 = client.get(swapped_key), client.get(entry_key(cache, BrItem, 7))
        assert row6 is not None and row7 is not None
        own_header = row6[: row6.index(b":", 1) + 1]  # its bucket's generation
        client.set(swapped_key, own_header + row7[row7.index(b":", 1) + 1 :])
    finally:
        client.close()
    before = cache.stats()
    with capture_sql(engine) as sql, factory() as session:
        rows = session.scalars(
            select(BrItem).where(BrItem.id.in_(list(range(1, 11)))).options(from_cache())
        ).all()
    assert sorted(names(rows)) == [(i, f"item {i}") for i in range(1, 11)]
    assert len(sql) == 1
    after = cache.stats()
    assert after.decode_errors - before.decode_errors == 2
    assert after.hits - before.hits == 8


def test_the_batch_loops_agree_with_the_single_entry_functions() -> None:
    """``unpack_rows`` and ``current_payloads`` (one loop per batch) say what ``unpack_row``
    and ``current_payload`` say of each entry, whatever it holds."""
    import msgpack

    from sqlalchemy_writethrough import codec, protocol

    version = bytes([codec.FORMAT_VERSION])
    payloads: list[Any] = [
        codec.pack_row([0, 1, "x"]),
        False,
        b"",
        version,
        bytes([codec.FORMAT_VERSION + 1]) + msgpack.packb([0, 1]),
        version + b"\xc1garbage",
        version + msgpack.packb({"a": 1}),
        version + msgpack.packb([]),
        memoryview(b"??" + codec.pack_row([0, 2, None]))[2:],
    ]
    expected: list[Any] = []
    for payload in payloads:
        try:
            expected.append(None if payload is False else codec.unpack_row(payload))
        except codec.DecodeError:
            expected.append(None)
    assert codec.unpack_rows(payloads) == expected
    assert expected[0] == [0, 1, "x"] and expected[-1] == [0, 2, None]

    gen = b"t1.2"
    values: list[Any] = [b"Vt1.2:abc", b"Vt1.3:abc", b"Et1.2:x", None, b"V", b"Vt1.2", "Vt1.2:s"]
    gens: list[Any] = [gen, gen, gen, gen, gen, gen, gen]
    gens[1] = None
    single = [protocol.current_payload(v, g) for v, g in zip(values, gens, strict=True)]
    batch = protocol.current_payloads([*values, b"trailing generation reply"], gens)
    assert [bytes(p) if p is not False else p for p in batch] == [
        bytes(p) if p is not False else p for p in single
    ]
    assert bytes(batch[0]) == b"abc"


def test_keys_of_int_primary_keys_read_again_are_the_same() -> None:
    """A keyspace keeps the keys of the int primary keys it computed lately (a bounded
    memo): the keys it gives for a pk read again, in a batch or alone, after the memo was
    forgotten, are the ones a fresh keyspace computes."""
    from sqlalchemy_writethrough import keys as keys_module
    from sqlalchemy_writethrough.keys import KeySpace

    used = KeySpace("p", "br_item", "digest", 16)
    values = [*range(keys_module._PAIRS + 10), -5, 10**20, 3, 3]
    expected = [KeySpace("p", "br_item", "digest", 16).pair([v]) for v in values]
    assert used.pairs_of(values) == expected  # the memo overflows once on the way
    assert [used.pair([v]) for v in values] == expected
    assert used.pairs_of(values[:5]) == expected[:5]
    assert used.pairs_of(values[-4:]) == expected[-4:]  # all kept: looked up at once
    with pytest.raises(TypeError):  # True == 1, kept: still no key of its own
        used.pairs_of([1, True])
    assert used.pair(["a string"]) == KeySpace("p", "br_item", "digest", 16).pair(["a string"])
    assert len(set(expected[:20])) == 20


def test_equal_primary_keys_of_other_types_never_share_an_int_key(
    engine: Engine, setup: tuple, redis_url: str, prefix: str
) -> None:
    """The memo of int keys never answers for a value equal to an int but of another type
    (True, 1.0), nor for another model's "1": those read the database, and the
    row they get is the one the database gives; Redis holds entries under the ints' keys
    only (0, a negative, a huge int included)."""
    import redis

    factory, _, _ = setup
    huge = 2**31 - 1  # an INTEGER column's largest
    # (MariaDB stores a row inserted with 0 in an AUTO_INCREMENT key under the next value)
    rows = [(1, "item 1"), (0, "zero"), (-7, "negative"), (huge, "huge")]
    if engine.dialect.name in ("mysql", "mariadb"):
        rows.remove((0, "zero"))
    with factory() as session:
        session.add_all([BrItem(id=pk, name=name) for pk, name in rows[1:]])
        session.add(BrCode(code="1", name="code 1"))
        session.commit()
    ints = [pk for pk, _ in rows]
    for _ in range(2):  # fills, then hits: the memo holds every int's keys
        with factory() as session:
            found = session.scalars(
                select(BrItem).where(BrItem.id.in_(ints)).options(from_cache())
            ).all()
            assert names(found) == sorted(rows)  # in key order
        for pk in ints:
            with factory() as session:
                assert session.get(BrItem, pk) is not None
    # (Decimal: SQLite binds none; True: psycopg2 binds a boolean, which PostgreSQL compares
    # with no integer, where psycopg 3's statement casts it)
    others = (1.0,) if engine.dialect.driver == "psycopg2" else (True, 1.0)
    for value in others:
        with factory() as session:
            got = session.get(BrItem, value)
            assert got is not None and (got.id, got.name) == (1, "item 1")
    with factory() as session:  # (PostgreSQL compares no integer with a boolean in IN)
        found = session.scalars(
            select(BrItem).where(BrItem.id.in_([1.0, -7])).options(from_cache())
        ).all()
        assert sorted(names(found)) == [(-7, "negative"), (1, "item 1")]
    for _ in range(2):
        with factory() as session:
            code = session.get(BrCode, "1")
            assert code is not None and code.name == "code 1"
    client = redis.Redis.from_url(redis_url)
    try:
        # entity keys only (a generation key ends with its hash tag)
        tails = {k.rsplit(b"}:", 1)[1] for k in client.scan_iter(f"{prefix}:{{br_item:*}}:*")}
        codes = {k.rsplit(b"}:", 1)[1] for k in client.scan_iter(f"{prefix}:{{br_code:*}}:*")}
    finally:
        client.close()
    assert {str(pk).encode() for pk in ints} <= tails
    assert all(tail.lstrip(b"-").isdigit() for tail in tails)
    assert codes == {b"1"}


def test_the_batch_payloads_are_those_of_current_payload() -> None:
    """``payloads_after`` (a ``startswith`` of 'V' gen ':' per entry, bytes out) finds the
    payload ``current_payload`` finds, and none where it finds none: another or no
    generation, a lease, a lock, a generation holding ':' (a generation lock may), a payload
    holding ':'."""
    from sqlalchemy_writethrough import protocol

    gens: list[Any] = [b"t1", b"t1.2", b"t1:2", None, "t1", b"", b"t1"]
    values: list[Any] = [
        b"Vt1:ab:c",
        b"Vt1.2:",
        b"Vt1:2:x",
        b"Vt1:x",
        b"Vt1:x",
        b"V:x",
        b"Et1:x",
        b"Vt1.2:x",
        b"Vt1",
        None,
        "Vt1:x",
        b"Lt1:x",
    ]
    for gen in gens:
        expected = [protocol.current_payload(v, gen) for v in values]
        got = protocol.payloads_after(values, [protocol.value_prefix(gen)] * len(values))
        assert [bytes(p) if p is not False else p for p in expected] == got
        assert all(type(p) is bytes for p in got if p is not False)
    assert protocol.payloads_after([b"Vt1:ab:c"], [b"Vt1:"]) == [b"ab:c"]


def test_the_batch_payloads_of_many_buckets_are_those_of_current_payload() -> None:
    """``payloads_after`` of an MGET's reply (the entries, then their buckets' generations)
    when the buckets differ: generations of one length (every entry current: checked and
    sliced as lists), of several lengths, and one entry of another generation or none."""
    from sqlalchemy_writethrough import protocol

    gens = [b"t1.5", b"t2.5", b"t10.5", None]
    cases: list[tuple[list[Any], list[Any]]] = [
        ([b"Vt1.5:a", b"Vt2.5:b:c", b"Vt1.5:"], [0, 1, 0]),
        ([b"Vt1.5:a", b"Vt10.5:b", b"Vt1.5:c"], [0, 2, 0]),
        ([b"Vt1.5:a", b"Vt2.5:b", b"Vt1.5:c"], [0, 0, 0]),
        ([b"Vt1.5:a", b"Vt2.5:b", b"Vt1.5:c"], [0, 3, 0]),
        ([b"Vt1.5:a", None, b"Et1.5:c"], [0, 0, 0]),
        ([b"Vt10.5:a", b"Vt1.5:b"], [2, 0]),
    ]
    for values, buckets in cases:
        reply = [*values, *gens]  # the generations follow the entries, as in an MGET's
        expected = [
            protocol.current_payload(v, gens[b]) for v, b in zip(values, buckets, strict=True)
        ]
        got = protocol.payloads_after(reply, [protocol.value_prefix(gens[b]) for b in buckets])
        assert [bytes(p) if p is not False else p for p in expected] == got
        assert all(type(p) is bytes for p in got if p is not False)
