"""Invariant 8, fuzzed: bad cache contents are harmless.

Hypothesis writes damaged entries under the key of a row that exists in the database, then the
row is read through the cache. Whatever the entry held (random bytes; a VALUE header of the
current generation with random payload bytes; valid msgpack of arbitrary structures; a payload
of another format version; a real payload cut short; another model's or another row's payload;
a real row with one column of the wrong type; random LOCK and LEASE entries with or without a
TTL; a well-formed LOCK of a writer that died), ``session.get``:

* returns the database row, field by field, and raises nothing;
* counts the entry as a decode error or a miss (never a hit), with a log line for a decode error;
* and the cache recovers by itself: once the entry is gone or has expired, one read fills it
  and the next is served from Redis with no SQL.

Nothing is ever unpickled: a pickle in the payload is just another undecodable payload.
"""

from __future__ import annotations

import dataclasses
import logging
import pickle
import time as time_module
from collections.abc import Callable, Iterator
from datetime import datetime
from decimal import Decimal
from typing import Any

import msgpack
import pytest
import redis
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from sqlalchemy import DateTime, Numeric, String, inspect
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from sqlalchemy_writethrough import CachedModel, WriteThroughCache
from sqlalchemy_writethrough.codec import FORMAT_VERSION

from _cache_helpers import entry_key, keyspace
from _servers import capture_sql, reset_schema

pytestmark = pytest.mark.databases("sqlite", "postgresql")

LOG_NAME = "sqlalchemy_writethrough"


class Base(DeclarativeBase):
    pass


class FzItem(Base, CachedModel):
    __tablename__ = "fz_item"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(40))
    qty: Mapped[int] = mapped_column()
    price: Mapped[Decimal] = mapped_column(Numeric(10, 2))
    at: Mapped[datetime] = mapped_column(DateTime)


class FzOther(Base, CachedModel):
    """Another model, with another layout: its payloads must not decode as an FzItem."""

    __tablename__ = "fz_other"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    title: Mapped[str] = mapped_column(String(40))


ROW = {
    "id": 1,
    "name": "widget",
    "qty": 7,
    "price": Decimal("12.50"),
    "at": datetime(2024, 5, 6, 7, 8, 9),
}
#: positions (after the class tag) of FzItem's stored columns, and their stored msgpack types
STORED_TYPES: dict[int, type] = {1: int, 2: str, 3: int, 4: str, 5: str}


@dataclasses.dataclass
class Fz:
    engine: Engine
    client: redis.Redis
    cache: WriteThroughCache
    cached: sessionmaker[Session]
    key: str
    gen_key: str
    real: bytes  # a VALUE entry of ROW as a fill writes it ('V' gen ':' payload)
    other_row: bytes  # the payload of FzItem row 2
    other_model: bytes  # the payload of FzOther row 1

    def generation(self) -> bytes:
        gen = self.client.get(self.gen_key)
        assert gen is not None
        return gen

    def payload(self) -> bytes:
        return self.real[self.real.index(b":", 1) + 1 :]


def _payload_of(client: redis.Redis, key: str) -> bytes:
    raw = client.get(key)
    assert raw is not None and raw[:1] == b"V", raw
    return raw[raw.index(b":", 1) + 1 :]


@pytest.fixture
def fz(engine: Engine, redis_url: str, prefix: str) -> Iterator[Fz]:
    reset_schema(engine, Base.metadata)
    client = redis.Redis.from_url(redis_url, socket_timeout=1)
    # fill_wait=0: a reader finding another's lease goes to the database at once
    cache = WriteThroughCache(client, prefix=prefix, fill_wait=0)
    cached = sessionmaker(engine)
    cache.install(cached)
    with cached() as s:
        s.add_all([FzItem(**ROW), FzItem(**{**ROW, "id": 2, "name": "other"})])
        s.add(FzOther(id=1, title="not an item"))
        s.commit()
    key = entry_key(cache, FzItem, 1)
    gen_key = keyspace(cache, FzItem).pair([1])[1]
    real = client.get(key)
    assert real is not None and real[:1] == b"V"
    try:
        yield Fz(
            engine=engine,
            client=client,
            cache=cache,
            cached=cached,
            key=key,
            gen_key=gen_key,
            real=real,
            other_row=_payload_of(client, entry_key(cache, FzItem, 2)),
            other_model=_payload_of(client, entry_key(cache, FzOther, 1)),
        )
    finally:
        client.close()


SETTINGS = settings(
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# -------------------------------------------------------------------------- strategies

#: msgpack values of every kind, nested
MSGPACK: st.SearchStrategy[Any] = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**63), 2**64 - 1),
        st.floats(),
        st.text(max_size=12),
        st.binary(max_size=12),
    ),
    lambda children: st.one_of(
        st.lists(children, max_size=7),
        st.dictionaries(st.one_of(st.text(max_size=6), st.integers(-5, 5)), children, max_size=4),
    ),
    max_leaves=12,
)

#: values of none of the types FzItem stores (int, str): a wrong-typed column must be refused.
#: (No str: "5" or "2024-01-01" would be a valid, merely different, decimal or datetime.)
WRONG_VALUES: st.SearchStrategy[Any] = st.one_of(
    st.booleans(),
    st.floats(),
    st.binary(max_size=8),
    st.lists(st.integers(-(2**63), 2**63 - 1), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(-5, 5), max_size=2),
)

Build = Callable[[Fz], bytes]


def _looks_like_our_row(structure: Any) -> bool:
    """A structure that could decode as FzItem row 1 (the right length and key): the one
    kind of msgpack a cache cannot tell from a real entry, so not generated."""
    return (
        type(structure) is list
        and len(structure) == 6
        and type(structure[1]) is int
        and structure[1] == 1
    )


def value_entries() -> st.SearchStrategy[tuple[str, Build]]:
    """(description, how to build the bytes) of a damaged VALUE, or plain garbage."""

    def header(fz: Fz) -> bytes:
        return b"V" + fz.generation() + b":"

    anything = st.binary(max_size=64).map(lambda b: ("random bytes", lambda fz: b))
    payload_bytes = st.binary(max_size=64).map(
        lambda b: ("VALUE with random payload bytes", lambda fz: header(fz) + b)
    )
    structures = (
        MSGPACK.filter(lambda x: not _looks_like_our_row(x))
        .map(lambda x: bytes([FORMAT_VERSION]) + msgpack.packb(x, use_bin_type=True))
        .map(lambda p: ("VALUE with arbitrary msgpack", lambda fz: header(fz) + p))
    )
    other_version = st.integers(0, 255).filter(lambda v: v != FORMAT_VERSION)
    versions = other_version.map(
        lambda v: (
            f"payload of format version {v}",
            lambda fz: header(fz) + bytes([v]) + fz.payload()[1:],
        )
    )
    truncated = st.floats(0, 1, exclude_max=True).map(
        lambda f: ("a real entry cut short", lambda fz: fz.real[: int(len(fz.real) * f)])
    )
    wrong_column = st.tuples(st.sampled_from(sorted(STORED_TYPES)), WRONG_VALUES, MSGPACK).map(
        lambda t: ("a real row with a wrong-typed column", lambda fz: _wrong_column(fz, *t))
    )
    others = st.sampled_from(
        [
            ("another row's payload", lambda fz: header(fz) + fz.other_row),
            ("another model's payload", lambda fz: header(fz) + fz.other_model),
            ("a pickle", lambda fz: header(fz) + pickle.dumps(ROW)),
            ("an oversized payload", lambda fz: header(fz) + fz.payload() + b"\x00" * 2**20),
            ("a VALUE of an old generation", lambda fz: b"Vold:" + fz.payload()),
            ("a VALUE without a separator", lambda fz: b"V" + fz.generation()),
            ("an empty string", lambda fz: b""),
        ]
    )
    return st.one_of(anything, payload_bytes, structures, versions, truncated, wrong_column, others)


def _wrong_column(fz: Fz, position: int, wrong: Any, str_for_int: Any) -> bytes:
    """The real row with the column at ``position`` replaced by a value of another type (a
    bool where an int is stored is one too)."""
    row = msgpack.unpackb(fz.payload()[1:], raw=False)
    if STORED_TYPES[position] is int and type(str_for_int) is str:
        wrong = str_for_int  # where an int is stored, any string is wrong ("1" too)
    row[position] = wrong
    return b"V" + fz.generation() + b":" + bytes([FORMAT_VERSION]) + msgpack.packb(row)


def lock_and_lease_entries() -> st.SearchStrategy[tuple[str, Build, int | None]]:
    """(description, bytes, TTL in ms or None) of a LOCK or LEASE entry."""
    ttl = st.sampled_from([None, 5, 40])  # ms: no TTL (damage), or expiring soon
    raw = st.tuples(st.sampled_from([b"L", b"E"]), st.binary(max_size=40), ttl).map(
        lambda t: (f"{t[0].decode()} + random bytes", lambda fz: t[0] + t[1], t[2])
    )
    lock_shapes = st.tuples(
        st.dictionaries(st.text(min_size=1, max_size=8), st.just(1), min_size=1, max_size=3),
        st.sampled_from([0, 1]),
        st.one_of(st.just(False), st.text(max_size=20)),  # prev: none, or garbage
        ttl,
    )
    locks = lock_shapes.map(
        lambda t: (
            "a well-formed LOCK of a writer that died",
            lambda fz: b"L" + msgpack.packb([t[0], t[1], t[2], False, fz.generation().decode()]),
            t[3],
        )
    )
    structures = st.tuples(MSGPACK, ttl).map(
        lambda t: ("L + arbitrary msgpack", lambda fz: b"L" + msgpack.packb(t[0]), t[1])
    )
    return st.one_of(raw, locks, structures)


# ---------------------------------------------------------------------------- checking


def _values(obj: Any) -> dict[str, Any]:
    return {p.key: getattr(obj, p.key) for p in inspect(FzItem).column_attrs}


def read_with_bad_entry(
    fz: Fz, caplog: pytest.LogCaptureFixture, bad: bytes, ttl_ms: int | None, what: str
) -> None:
    """Write ``bad`` under row 1's key, read row 1, and check the read and the recovery."""
    if ttl_ms is None:
        fz.client.set(fz.key, bad)
    else:
        fz.client.set(fz.key, bad, px=ttl_ms)
    before = fz.cache.stats()
    caplog.clear()
    with fz.cached() as s:
        obj = s.get(FzItem, 1)
        assert obj is not None, what
        assert _values(obj) == ROW, what
    after = fz.cache.stats()
    assert after.hits == before.hits, f"{what}: served as a hit"
    decode_errors = after.decode_errors - before.decode_errors
    misses = after.misses - before.misses
    assert decode_errors or misses, f"{what}: neither a decode error nor a miss"
    if decode_errors:
        logged = [r for r in caplog.records if r.name == LOG_NAME and r.levelno >= logging.WARNING]
        assert logged, f"{what}: a decode error without a log line"
    recovers(fz, bad, what)


def recovers(fz: Fz, bad: bytes, what: str) -> None:
    """Once the bad entry is gone (replaced, or expired: bounded wait), one read loads and
    fills the row and the next is a hit with no SQL."""
    deadline = time_module.monotonic() + 2.0
    while fz.client.get(fz.key) == bad and time_module.monotonic() < deadline:
        time_module.sleep(0.002)
    assert fz.client.get(fz.key) != bad, f"{what}: the bad entry stayed"
    with fz.cached() as s:
        assert s.get(FzItem, 1) is not None  # a hit, or the load that fills
    hits = fz.cache.stats().hits
    with fz.cached() as s, capture_sql(fz.engine) as sql:
        obj = s.get(FzItem, 1)
        assert obj is not None
        values = _values(obj)
    assert sql == [], f"{what}: the cache did not recover"
    assert fz.cache.stats().hits == hits + 1
    with sessionmaker(fz.engine)() as s:
        fresh = s.get(FzItem, 1)
        assert fresh is not None
        assert values == _values(fresh), what


# ------------------------------------------------------------------------------- tests


def test_damaged_values_are_misses(fz: Fz, caplog: pytest.LogCaptureFixture) -> None:
    """Garbage, damaged VALUEs and payloads of other formats, rows or models under a row's key:
    ``get`` returns the database row, counts a decode error or a miss, and the entry heals."""
    caplog.set_level(logging.WARNING, logger=LOG_NAME)

    @SETTINGS
    @given(entry=value_entries())
    @example(entry=("random bytes", lambda fz: b"\x80\x00garbage"))
    @example(entry=("VALUE header only", lambda fz: b"V" + fz.generation() + b":"))
    def prop(entry: tuple[str, Build]) -> None:
        what, build = entry
        read_with_bad_entry(fz, caplog, build(fz), None, what)

    prop()


def test_damaged_locks_and_leases_are_misses(fz: Fz, caplog: pytest.LogCaptureFixture) -> None:
    """Random LOCK ('L...') and LEASE ('E...') entries, with and without a TTL, and well-formed
    locks of writers that died: ``get`` returns the database row; the entry is replaced at once
    when it is damaged (no TTL, or a LOCK that does not decode) or expires by itself; either
    way the cache recovers."""
    caplog.set_level(logging.WARNING, logger=LOG_NAME)

    @SETTINGS
    @given(entry=lock_and_lease_entries())
    @example(entry=("E without a TTL", lambda fz: b"Esomebody:" + fz.generation(), None))
    @example(entry=("L without a TTL", lambda fz: b"L\x90", None))
    def prop(entry: tuple[str, Build, int | None]) -> None:
        what, build, ttl_ms = entry
        read_with_bad_entry(fz, caplog, build(fz), ttl_ms, what)

    prop()


def test_damaged_entry_on_a_write_path(fz: Fz) -> None:
    """A commit that updates a row whose entry is garbage (no TTL) replaces it: afterwards the
    cache serves the committed row."""
    for bad in (b"\x00\xff", b"Lnot msgpack", b"V" + fz.generation() + b":\x01\xc1"):
        fz.client.set(fz.key, bad)
        with fz.cached() as s:
            obj = s.get(FzItem, 1)
            assert obj is not None
            obj.qty += 1
            s.commit()
        recovers(fz, bad, repr(bad))
