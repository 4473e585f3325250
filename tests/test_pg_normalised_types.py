"""PostgreSQL types whose values the database rewrites on the way in: a full-text search
vector (``TSVECTOR``), network and MAC addresses (``INET``, ``CIDR``, ``MACADDR``), and
``HSTORE``.

A catalogue's search vector is computed by the database: by a trigger from the row's other
columns (``tsvector_update_trigger``, what SQLAlchemy-Searchable installs), or by
``to_tsvector()``; a value the application assigns is normalised (lexemes sorted, positions
merged). The cache had no stored form for the type: ``register()`` raised, and
``register_all()`` left the whole model out, its gets all going to the database. Now a load
fills the entry with the text the driver returned, and a commit writing the row invalidates
it (``cache.models()`` says why). The same held for a profile's ``INET`` column (a last login
address), a catalogue's ``HSTORE`` of attributes, ``CIDR`` and ``MACADDR``: each loads as what
the driver makes of it (text on psycopg2; an ``ipaddress`` object on psycopg 3 and asyncpg, a
dict for an hstore), which the entry gives back, class included.

What is observed: what a get returns against a load without the cache, the SQL a get
emits, what Redis holds after a commit, and the reason ``cache.models(engine)`` gives.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import pytest
import redis
import sqlalchemy as sa
from sqlalchemy import String
from sqlalchemy.dialects.postgresql import CIDR, HSTORE, INET, MACADDR, TSVECTOR
from sqlalchemy.engine import Engine
from sqlalchemy.ext.mutable import MutableDict
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from sqlalchemy_writethrough import WriteThroughCache, WriteThroughWarning

from _cache_helpers import cache_on, entry_key, entry_state
from _servers import capture_sql, reset_schema

pytestmark = pytest.mark.databases("postgresql")


class Base(DeclarativeBase):
    pass


class SvArticle(Base):
    """Its search vector is the trigger's, from title and body."""

    __tablename__ = "sv_article"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    title: Mapped[str] = mapped_column(String(80))
    body: Mapped[str] = mapped_column(sa.Text)
    search_vector: Mapped[str | None] = mapped_column(TSVECTOR)


class SvTagged(Base):
    """Its vector is what the application assigns (no trigger)."""

    __tablename__ = "sv_tagged"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    tags: Mapped[str | None] = mapped_column(TSVECTOR)


class SvHost(Base):
    """A profile's addresses and a catalogue's attributes (changed in place, tracked)."""

    __tablename__ = "sv_host"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    address: Mapped[object | None] = mapped_column(INET)
    network: Mapped[object | None] = mapped_column(CIDR)
    mac: Mapped[str | None] = mapped_column(MACADDR)
    attributes: Mapped[dict[str, str | None] | None] = mapped_column(
        MutableDict.as_mutable(HSTORE)  # type: ignore[arg-type]
    )


@pytest.fixture
def searchable(engine: Engine) -> Iterator[Engine]:
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE EXTENSION IF NOT EXISTS hstore")
    reset_schema(engine, Base.metadata)
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP TRIGGER IF EXISTS sv_article_vector ON sv_article")
        conn.exec_driver_sql(
            "CREATE TRIGGER sv_article_vector BEFORE INSERT OR UPDATE ON sv_article "
            "FOR EACH ROW EXECUTE FUNCTION "
            "tsvector_update_trigger(search_vector, 'pg_catalog.simple', title, body)"
        )
    yield engine


@pytest.fixture
def cached(
    searchable: Engine, redis_url: str, prefix: str
) -> Iterator[tuple[WriteThroughCache, sessionmaker[Session]]]:
    with cache_on(searchable, redis_url, prefix) as (cache, made):
        with warnings.catch_warnings():
            # the warning that each commit invalidates (said once, when mappers configure)
            warnings.simplefilter("ignore", WriteThroughWarning)
            cache.register(SvArticle)
            cache.register(SvTagged)
            cache.register(SvHost)
            Base.registry.configure()
        yield cache, made


def _loaded(made: sessionmaker[Session], model: type, key: int) -> dict[str, object]:
    """The row as the database has it (no cache: populate_existing of a query)."""
    with made() as session:
        row = session.scalars(sa.select(model).where(model.id == key)).one()  # type: ignore[attr-defined]
        return {c.key: getattr(row, c.key) for c in sa.inspect(model).column_attrs}


def _got(made: sessionmaker[Session], model: type, key: int) -> dict[str, object]:
    with made() as session:
        row = session.get(model, key)
        assert row is not None
        return {c.key: getattr(row, c.key) for c in sa.inspect(model).column_attrs}


def test_a_trigger_computed_vector_is_served_as_the_database_has_it(
    searchable: Engine,
    cached: tuple[WriteThroughCache, sessionmaker[Session]],
    redis_client: redis.Redis,
) -> None:
    cache, made = cached
    with made() as session:
        session.add(SvArticle(id=1, title="Red Shoes", body="running shoes for trails"))
        session.commit()
    # the flush sent no vector; the trigger made one: the commit leaves a miss
    assert entry_state(redis_client, entry_key(cache, SvArticle, 1)) is None
    expected = _loaded(made, SvArticle, 1)
    assert "'shoes'" in str(expected["search_vector"])
    with capture_sql(searchable) as sql:
        assert _got(made, SvArticle, 1) == expected  # a miss: filled
    assert len(sql) == 1
    with capture_sql(searchable) as sql:
        assert _got(made, SvArticle, 1) == expected  # a hit
    assert sql == []

    with made() as session:
        article = session.get(SvArticle, 1)
        assert article is not None
        article.title = "Blue Boots"
        session.commit()
    assert entry_state(redis_client, entry_key(cache, SvArticle, 1)) is None
    changed = _loaded(made, SvArticle, 1)
    assert "'boots'" in str(changed["search_vector"])
    for _ in range(2):  # the miss that fills, then the hit
        assert _got(made, SvArticle, 1) == changed


def test_an_assigned_vector_is_served_normalised(
    cached: tuple[WriteThroughCache, sessionmaker[Session]], redis_client: redis.Redis
) -> None:
    """``"shoes boots shoes"`` is stored as ``'boots' 'shoes'``: never served as assigned."""
    cache, made = cached
    with made() as session:
        session.add(SvTagged(id=1, tags="shoes boots shoes"))
        session.commit()
    assert entry_state(redis_client, entry_key(cache, SvTagged, 1)) is None
    for _ in range(2):
        assert _got(made, SvTagged, 1) == {"id": 1, "tags": "'boots' 'shoes'"}
    assert entry_state(redis_client, entry_key(cache, SvTagged, 1)) == "value"


def test_models_says_why_a_vectors_commit_invalidates(
    searchable: Engine, cached: tuple[WriteThroughCache, sessionmaker[Session]]
) -> None:
    cache, _ = cached
    report = cache.models(searchable)
    for model in (SvArticle, SvTagged):
        [column] = [c for c in report[model].inexact_columns if c.attribute != "title"]
        assert column.column.endswith("vector") or column.column == "sv_tagged.tags"
        assert "tsvector" in column.reason


def test_register_all_caches_a_model_with_a_vector(
    searchable: Engine, redis_url: str, prefix: str
) -> None:
    """It left the model out, every get to the database."""
    with cache_on(searchable, redis_url, prefix) as (cache, made):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", WriteThroughWarning)
            cache.register_all(Base)
        report = cache.models(searchable)
        assert SvArticle in report and SvTagged in report and SvHost in report
        assert report.left_out == ()
        # the report's entries, as a user iterates them (it raised AttributeError)
        assert [info.model for info in report] == [info.model for info in report.cached]
        assert len(report) == len(report.cached) >= 2  # (and other modules' CachedModels)
        with made() as session:
            session.add(SvTagged(id=2, tags="a"))
            session.commit()
        _got(made, SvTagged, 2)
        with capture_sql(searchable) as sql:
            assert _got(made, SvTagged, 2) == {"id": 2, "tags": "'a'"}
        assert sql == []


def _host_values(made: sessionmaker[Session], key: int) -> list[tuple[str, object]]:
    """What a get returns of each column, with its class."""
    got = _got(made, SvHost, key)
    return [(type(v).__name__, v) for v in got.values()]


@pytest.mark.parametrize("driver", ["psycopg", "psycopg2"])
def test_addresses_and_an_hstore_are_served_as_the_driver_loads_them(
    searchable: Engine, redis_url: str, prefix: str, redis_client: redis.Redis, driver: str
) -> None:
    """Written as text, stored normalised (``10.0.0.01``, a MAC address in capitals and
    dashes); loaded as text by psycopg2, as ``ipaddress`` objects by psycopg 3. A get served
    from the entry returns what a load returns, class included; a change made in place to the
    hstore (MutableDict) is committed, and the next get sees it."""
    if driver == "psycopg2":
        pytest.importorskip("psycopg2")
    url = searchable.url.set(drivername=f"postgresql+{driver}")
    engine = sa.create_engine(url)
    try:
        with cache_on(engine, redis_url, prefix) as (cache, made):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", WriteThroughWarning)
                cache.register(SvHost)
                Base.registry.configure()
            with made() as session:
                session.add(
                    SvHost(
                        id=1,
                        address="10.0.0.01",
                        network="10.0.0.0/8",
                        mac="08-00-2B-01-02-03",
                        attributes={"colour": "red", "size": None},
                    )
                )
                session.commit()
            assert entry_state(redis_client, entry_key(cache, SvHost, 1)) is None
            loaded = _loaded(made, SvHost, 1)
            assert str(loaded["address"]) == "10.0.0.1"
            assert loaded["mac"] == "08:00:2b:01:02:03"
            expected = [(type(v).__name__, v) for v in loaded.values()]
            with capture_sql(engine) as sql:
                assert _host_values(made, 1) == expected  # a miss: filled
                assert _host_values(made, 1) == expected  # a hit
            assert len(sql) == 1

            with made() as session:
                host = session.get(SvHost, 1)  # from the entry
                assert host is not None and host.attributes is not None
                host.attributes["size"] = "XL"  # in place: MutableDict tells the session
                session.commit()
            assert _got(made, SvHost, 1)["attributes"] == {"colour": "red", "size": "XL"}
            assert _got(made, SvHost, 1) == _loaded(made, SvHost, 1)
    finally:
        engine.dispose()
