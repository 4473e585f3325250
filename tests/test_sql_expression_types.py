"""Types that wrap their values in SQL: ``bind_expression`` on the way in (``lower(?)``,
``pgp_sym_encrypt(?, key)``), ``column_expression`` on the way out (``pgp_sym_decrypt(col,
key)``), as SQLAlchemy's documentation shows under "Applying SQL-level Bind/Result
Processing".

A commit published the value the flush sent, which the database never stored: a get served
``"ABC"`` where every load returns ``"abc"``, and the plaintext of an encrypted column where a
load returns what ``column_expression`` computes. Such a column is now never predicted: its
commits invalidate (with a warning naming it), and fills store what a load returned. A primary
key of such a type is not cached (the key a value names is the database's to decide).
What is observed: what a get returns against a load without the cache, and the SQL it emits.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import LargeBinary, String, TypeDecorator, func, type_coerce
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from sqlalchemy_writethrough import (
    CachedModel,
    ConfigurationError,
    WriteThroughCache,
    WriteThroughWarning,
)

from _cache_helpers import installed
from _servers import capture_sql, reset_schema


class LowerString(TypeDecorator[str]):
    """Lower-cased by the database on the way in."""

    impl = String(40)
    cache_ok = True

    def bind_expression(self, bindvalue: Any) -> Any:
        return func.lower(bindvalue)


class UpperOnLoad(TypeDecorator[str]):
    """Stored as sent, upper-cased by every SELECT."""

    impl = String(40)
    cache_ok = True

    def column_expression(self, col: Any) -> Any:
        return func.upper(col)


class PGPString(TypeDecorator[str]):
    """SQLAlchemy's documented pgcrypto recipe: encrypted in SQL, decrypted in SQL."""

    impl = LargeBinary
    cache_ok = True

    def __init__(self, passphrase: str) -> None:
        super().__init__()
        self.passphrase = passphrase

    def bind_expression(self, bindvalue: Any) -> Any:
        bindvalue = type_coerce(bindvalue, String)
        return func.pgp_sym_encrypt(bindvalue, self.passphrase)

    def column_expression(self, col: Any) -> Any:
        return func.pgp_sym_decrypt(col, self.passphrase)


class Base(DeclarativeBase):
    pass


class SxAccount(Base, CachedModel):
    __tablename__ = "sx_account"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    email: Mapped[str] = mapped_column(LowerString)
    code: Mapped[str] = mapped_column(UpperOnLoad)
    plain: Mapped[str] = mapped_column(String(40))


class PgBase(DeclarativeBase):
    pass


class SxSecret(PgBase, CachedModel):
    __tablename__ = "sx_secret"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    username: Mapped[str] = mapped_column(String(40))
    password: Mapped[str] = mapped_column(PGPString("this is my passphrase"))


@pytest.fixture
def cache(redis_url: str, prefix: str) -> Iterator[WriteThroughCache]:
    made = WriteThroughCache(redis_url, prefix=prefix, stats_interval=None)
    yield made
    made.redis.close()


def _read(factory: sessionmaker[Session], model: type, pk: int) -> tuple[dict[str, Any], int]:
    """(the row's column values as a get returns them, the statements it emitted)."""
    with factory() as session, capture_sql(session.get_bind()) as statements:
        row = session.get(model, pk)
        assert row is not None
        values = {c.key: getattr(row, c.key) for c in sa.inspect(model).column_attrs}
    return values, len(statements)


def _fresh(engine: Engine, model: type, pk: int) -> dict[str, Any]:
    with Session(engine) as session:
        row = session.get(model, pk)
        assert row is not None
        return {c.key: getattr(row, c.key) for c in sa.inspect(model).column_attrs}


def _served_as_loaded(
    factory: sessionmaker[Session], engine: Engine, model: type, cached: bool = True
) -> None:
    """A get after the commit returns what a load returns, and the next one too (a hit when
    ``cached``)."""
    first, _ = _read(factory, model, 1)
    assert first == _fresh(engine, model, 1)
    again, statements = _read(factory, model, 1)
    assert again == first
    assert statements == 0 if cached else statements > 0


def test_values_sql_changes_are_read_as_the_database_returns_them(
    engine: Engine, cache: WriteThroughCache
) -> None:
    reset_schema(engine, Base.metadata)
    factory = installed(engine, cache)
    with factory() as session:
        session.add(SxAccount(id=1, email="Ann@Example.COM", code="abc", plain="x"))
        session.commit()
    _served_as_loaded(factory, engine, SxAccount)
    assert _fresh(engine, SxAccount, 1)["email"] == "ann@example.com"
    with factory() as session:
        row = session.get(SxAccount, 1)
        assert row is not None
        row.email, row.code = "Bob@Example.COM", "def"
        session.commit()
    _served_as_loaded(factory, engine, SxAccount)
    assert _fresh(engine, SxAccount, 1)["code"] == "DEF"
    cache.uninstall(factory)


@pytest.mark.databases("postgresql")
def test_the_documented_pgcrypto_recipe(engine: Engine, cache: WriteThroughCache) -> None:
    """The recipe of SQLAlchemy's documentation: the column's stored type is bytes and a
    load returns text (``column_expression`` decrypts it), so its rows are never stored and
    every get reads the database, which decrypts; the ciphertext stays in the database."""
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE EXTENSION IF NOT EXISTS pgcrypto")
    reset_schema(engine, PgBase.metadata)
    factory = installed(engine, cache)
    with factory() as session:
        session.add(SxSecret(id=1, username="some user", password="some password"))
        session.commit()
    _served_as_loaded(factory, engine, SxSecret, cached=False)
    with engine.connect() as conn:  # stored encrypted
        stored = conn.execute(sa.text("SELECT password FROM sx_secret")).scalar_one()
        assert b"some password" not in bytes(stored)
    cache.uninstall(factory)


def test_such_a_column_is_announced_and_such_a_key_refused(
    redis_url: str, prefix: str, cache: WriteThroughCache
) -> None:
    class LocalBase(DeclarativeBase):
        pass

    class SxNoted(LocalBase, CachedModel):
        __tablename__ = "sx_noted"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        email: Mapped[str] = mapped_column(LowerString)

    class SxKeyed(LocalBase, CachedModel):
        __tablename__ = "sx_keyed"
        email: Mapped[str] = mapped_column(LowerString, primary_key=True)

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with pytest.raises(ConfigurationError, match=r"SxKeyed.email: .*bind_expression"):
                LocalBase.registry.configure()
        noted = [
            str(w.message)
            for w in caught
            if issubclass(w.category, WriteThroughWarning) and "SxNoted.email" in str(w.message)
        ]
        assert len(noted) == 1 and "bind_expression" in noted[0], noted
    finally:
        LocalBase.registry.dispose()
