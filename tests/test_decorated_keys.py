"""Primary keys of a ``TypeDecorator`` type: the "backend-agnostic GUID" recipe of SQLAlchemy
1.x's documentation (fastapi-users' tables still key on it), a UUID stored as 16 bytes
(sqlalchemy-utils' ``UUIDType``), and a type whose values are no key at all.

These models used to be refused ("not cached yet"). A key is now the value a load of the row
holds (what ``process_result_value`` returns): a get, a lazy load or an IN batch with such a
value is served from the cache, and one that is not (a UUID given as text, which a load turns
into a UUID) goes to the database, as would a write whose identity holds one (it invalidates
the model's entries). What is observed: the SQL each read emits and what it returns.
"""

from __future__ import annotations

import uuid
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import ForeignKey, LargeBinary, String, TypeDecorator, Uuid, select
from sqlalchemy.dialects import mysql, postgresql
from sqlalchemy.engine import Dialect, Engine
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    mapped_column,
    relationship,
    sessionmaker,
)

from sqlalchemy_writethrough import CachedModel, ConfigurationError, WriteThroughCache, from_cache
from stress.models import GUID  # the recipe, as fastapi-users-db-sqlalchemy ships it

from _servers import capture_sql, reset_schema


class BinaryUUID(TypeDecorator[uuid.UUID]):
    """A UUID in 16 bytes: the stored form's kind (bytes) is no key kind, the loaded one is."""

    impl = LargeBinary(16)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> Any:
        if dialect.name in ("mysql", "mariadb"):  # a BLOB cannot be a key there
            return dialect.type_descriptor(mysql.BINARY(16))
        return dialect.type_descriptor(LargeBinary(16))

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        return None if value is None else value.bytes

    def process_result_value(self, value: Any, dialect: Dialect) -> Any:
        return None if value is None else uuid.UUID(bytes=bytes(value))


class Code:
    """A value object no key is made of."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Code) and other.text == self.text

    def __hash__(self) -> int:
        return hash(self.text)


class CodeType(TypeDecorator[Code]):
    impl = String(20)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        return None if value is None else value.text

    def process_result_value(self, value: Any, dialect: Dialect) -> Any:
        return None if value is None else Code(value)


class Base(DeclarativeBase):
    pass


class DkUser(Base, CachedModel):
    __tablename__ = "dk_user"
    id: Mapped[uuid.UUID] = mapped_column(GUID, primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(40))


class DkToken(Base, CachedModel):
    __tablename__ = "dk_token"
    token: Mapped[str] = mapped_column(String(40), primary_key=True)
    user_id: Mapped[uuid.UUID] = mapped_column(GUID, ForeignKey("dk_user.id"))
    user: Mapped[DkUser] = relationship()


class DkDevice(Base, CachedModel):
    __tablename__ = "dk_device"
    id: Mapped[uuid.UUID] = mapped_column(BinaryUUID, primary_key=True)
    name: Mapped[str] = mapped_column(String(40))


class DkCoded(Base, CachedModel):
    __tablename__ = "dk_coded"
    code: Mapped[Code] = mapped_column(CodeType, primary_key=True)
    name: Mapped[str] = mapped_column(String(40))


@pytest.fixture
def cache(redis_url: str, prefix: str) -> Iterator[WriteThroughCache]:
    made = WriteThroughCache(redis_url, prefix=prefix, stats_interval=None)
    yield made
    made.redis.close()


@pytest.fixture
def factory(engine: Engine, cache: WriteThroughCache) -> Iterator[sessionmaker[Session]]:
    reset_schema(engine, Base.metadata)
    made = sessionmaker(engine, expire_on_commit=False)
    cache.install(made)
    yield made
    cache.uninstall(made)


def _get(factory: sessionmaker[Session], model: type, ident: Any) -> tuple[Any, int]:
    """(the row's name or None, the SELECTs the get emitted)."""
    with factory() as session, capture_sql(session.get_bind()) as statements:
        row = session.get(model, ident)
        name = None if row is None else row.name
    return name, sum(1 for s in statements if s.lstrip().upper().startswith("SELECT"))


def _served(factory: sessionmaker[Session], model: type, ident: Any) -> Any:
    """The row's name, read twice: the second read emits no SQL (filled by the first, or
    published by the commit before it)."""
    name = _get(factory, model, ident)[0]
    assert _get(factory, model, ident) == (name, 0)
    return name


@pytest.mark.parametrize("model", [DkUser, DkDevice])
def test_a_decorated_uuid_key_is_served_from_the_cache_and_kept_current(
    factory: sessionmaker[Session], model: type
) -> None:
    key = uuid.uuid4()
    with factory() as session:
        session.add(model(id=key, name="a"))
        session.commit()
    assert _served(factory, model, key) == "a"
    with factory() as session:
        row = session.get(model, key)
        row.name = "b"  # type: ignore[union-attr]
        session.commit()
    assert _served(factory, model, key) == "b"
    with factory() as session:
        session.delete(session.get(model, key))
        session.commit()
    assert _get(factory, model, key)[0] is None


def test_a_uuid_given_as_text_goes_to_the_database(factory: sessionmaker[Session]) -> None:
    """``get(User, "…")`` loads the row (the recipe binds text), but a load holds a UUID: the
    text would name another key for the same row, so that get never touches the cache."""
    key = uuid.uuid4()
    with factory() as session:
        session.add(DkUser(id=key, name="a"))
        session.commit()
    assert _served(factory, DkUser, key) == "a"
    assert _get(factory, DkUser, str(key)) == ("a", 1)
    assert _get(factory, DkUser, str(key)) == ("a", 1)


def test_an_object_keyed_by_text_still_reaches_the_cached_row(
    factory: sessionmaker[Session],
) -> None:
    """An object created with ``id="…"`` keeps the text in its identity: its writes name no key
    a load's UUID names, so they invalidate the model's entries instead of leaving the row
    cached under the UUID's key served."""
    key = uuid.uuid4()
    with factory() as session:
        mine = DkUser(id=str(key), name="a")
        session.add(mine)
        session.commit()
        assert _served(factory, DkUser, key) == "a"  # under the UUID's key
        mine.name = "b"
        session.commit()
        assert _served(factory, DkUser, key) == "b"
        session.delete(mine)
        session.commit()
    assert _get(factory, DkUser, key)[0] is None


def test_lazy_loads_and_in_batches_of_a_decorated_key(factory: sessionmaker[Session]) -> None:
    keys = [uuid.uuid4() for _ in range(3)]
    with factory() as session:
        session.add_all(DkUser(id=k, name=f"u{i}") for i, k in enumerate(keys))
        session.add(DkToken(token="t", user_id=keys[0]))
        session.commit()
    for k in keys:
        _served(factory, DkUser, k)
    with factory() as session:
        assert session.get(DkToken, "t") is not None  # filled
    with factory() as session, capture_sql(session.get_bind()) as statements:
        token = session.get(DkToken, "t")
        assert token is not None and token.user.name == "u0"  # the many-to-one, cached
        rows = session.scalars(
            select(DkUser).where(DkUser.id.in_(keys)).options(from_cache())
        ).all()
        assert sorted(r.name for r in rows) == ["u0", "u1", "u2"]
    assert statements == []


def test_a_key_type_whose_values_are_no_keys_reads_from_the_database(
    factory: sessionmaker[Session], caplog: pytest.LogCaptureFixture
) -> None:
    """Whether a TypeDecorator's values can be keys is known only from them: here they are
    not, so every read goes to the database, and every commit invalidates instead; the log
    says so once, naming the model's attribute and the values' type."""
    caplog.set_level("WARNING", logger="sqlalchemy_writethrough")
    with factory() as session:
        session.add(DkCoded(code=Code("x"), name="a"))
        session.commit()
    assert _get(factory, DkCoded, Code("x")) == ("a", 1)
    with factory() as session:
        session.get(DkCoded, Code("x")).name = "b"  # type: ignore[union-attr]
        session.commit()
    assert _get(factory, DkCoded, Code("x")) == ("b", 1)
    said = [r.getMessage() for r in caplog.records if "DkCoded.code" in r.getMessage()]
    assert len(said) == 1 and "type Code is not an int" in said[0], said


def test_invalidate_takes_a_decorated_key_as_text(
    factory: sessionmaker[Session], cache: WriteThroughCache, engine: Engine
) -> None:
    key = uuid.uuid4()
    with factory() as session:
        session.add(DkUser(id=key, name="a"))
        session.commit()
    assert _served(factory, DkUser, key) == "a"
    with engine.begin() as conn:  # behind the cache's back
        conn.execute(DkUser.__table__.update().values(name="b"))
    assert _get(factory, DkUser, key) == ("a", 0)
    assert cache.invalidate(DkUser, str(key))
    assert _get(factory, DkUser, key) == ("b", 1)
    with pytest.raises(ConfigurationError, match="'not a uuid' is not a primary key value"):
        cache.invalidate(DkUser, "not a uuid")


class TextGUID(GUID):
    """The recipe over ``Uuid(as_uuid=False)`` (the database's own text form of a UUID, which
    the cache never predicts) outside PostgreSQL."""

    def load_dialect_impl(self, dialect: Dialect) -> Any:
        if dialect.name == "postgresql":
            return dialect.type_descriptor(postgresql.UUID())
        return dialect.type_descriptor(Uuid(as_uuid=False))


def test_the_recipe_writes_through_on_every_database(factory: sessionmaker[Session]) -> None:
    """CHAR(36) holding a UUID's text (the recipe outside PostgreSQL) is a value of the
    column's full length, stored as sent: commits write it through, as PostgreSQL's UUID."""
    key = uuid.uuid4()
    with factory() as session:
        session.add(DkUser(id=key, name="a"))
        session.commit()
    assert _get(factory, DkUser, key) == ("a", 0)
    with factory() as session:
        session.add(DkToken(token="t", user_id=key))
        session.get(DkUser, key).name = "b"  # type: ignore[union-attr]
        session.commit()
    assert _get(factory, DkUser, key) == ("b", 0)
    with factory() as session, capture_sql(session.get_bind()) as statements:
        assert session.get(DkToken, "t").user_id == key  # type: ignore[union-attr]
    assert statements == []


def test_a_per_database_type_warns_only_where_its_commits_invalidate(
    engine: Engine, redis_url: str, prefix: str, db_name: str
) -> None:
    """A TypeDecorator picking its implementation per database: a warning given when the
    mapper was configured, from SQLAlchemy's default dialect's implementation ("each commit
    invalidates"), was false on the databases where the column is written through (the GUID
    recipe's CHAR there, PostgreSQL's UUID here). It is given at the first commit to a
    database whose own implementation is never exact, and only there."""

    class LocalBase(DeclarativeBase):
        pass

    name = f"dk_owned_{uuid.uuid4().hex[:8]}"  # the warnings are given once per column

    class DkOwned(LocalBase, CachedModel):
        __tablename__ = name
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        owner: Mapped[uuid.UUID] = mapped_column(TextGUID)

    cache = WriteThroughCache(redis_url, prefix=prefix, stats_interval=None)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            LocalBase.registry.configure()
            configured = [str(w.message) for w in caught if "DkOwned.owner" in str(w.message)]
            LocalBase.metadata.create_all(engine)
            made = sessionmaker(engine)
            cache.install(made)
            with made() as session:
                session.add(DkOwned(id=1, owner=uuid.uuid4()))
                session.commit()
        committed = [str(w.message) for w in caught if "DkOwned.owner" in str(w.message)]
        assert configured == []
        if db_name == "postgresql":
            assert committed == []
        else:
            assert len(committed) == 1 and "formats UUID strings" in committed[0], committed
        with made() as session:
            assert session.get(DkOwned, 1) is not None
        cache.uninstall(made)
    finally:
        LocalBase.metadata.drop_all(engine)
        LocalBase.registry.dispose()
        cache.redis.close()
