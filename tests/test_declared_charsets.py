"""MySQL/MariaDB string columns declared with a character set other than utf8mb4 (a
column's ``charset``, ``collation``, ``national``, ``ascii`` or ``unicode``, or its table's
``mysql_charset``): in a lenient ``sql_mode`` a character the set cannot hold is stored as
``?`` (an emoji in ``utf8mb3``, ``é`` in ``ascii``), and a ``TEXT``'s 65,535 bytes hold fewer
characters in ``utf32``. The cache predicted the value as written and served ``é`` for the
``?`` the database held; such values now invalidate, and the rest still write through.

What is observed: each value a get returns after its commit, against a fresh load of the row,
on a connection whose session runs ``SET sql_mode = ''``; and, in the default strict mode,
that values the column holds are still served from what the commit wrote, with no SQL.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from sqlalchemy_writethrough import WriteThroughCache

from _cache_helpers import caching_all, entry_key, entry_state, one_column_models, served_and_stored
from _servers import capture_sql, reset_schema

pytestmark = pytest.mark.databases("mariadb")


class Base(DeclarativeBase):
    pass


ACCENTED = ["héllo", "naïve café", "\u00a0"]
BEYOND_BMP = ["😀", "a😀b"]

#: name -> (the column's type, values it holds, values it cannot hold)
DECLARED: dict[str, tuple[Any, list[str], list[str]]] = {
    "latin1": (mysql.VARCHAR(20, charset="latin1"), ["abc", *ACCENTED], ["😀", "a\u0301", "€"]),
    "ascii": (mysql.VARCHAR(20, charset="ascii"), ["abc", "a b\t"], [*ACCENTED, "😀"]),
    "ascii_flag": (mysql.VARCHAR(20, ascii=True), ["abc", *ACCENTED], ["😀"]),
    "utf8mb3": (mysql.VARCHAR(20, charset="utf8mb3"), ["abc", *ACCENTED], BEYOND_BMP),
    "national": (mysql.NVARCHAR(20), ["abc", *ACCENTED], BEYOND_BMP),
    "generic_national": (sa.NVARCHAR(20), ["abc", *ACCENTED], BEYOND_BMP),
    "unicode_flag": (mysql.VARCHAR(20, unicode=True), ["abc", *ACCENTED], BEYOND_BMP),
    "collation": (sa.String(20, collation="latin1_swedish_ci"), ["abc", "é"], ["😀"]),
    "char": (mysql.CHAR(2, charset="latin1"), ["ab", "éa"], ["😀a"]),
    "text": (mysql.TEXT(charset="latin1"), ["abc", "é"], ["😀"]),
    # 65,535 bytes: 16,383 characters of utf32, 32,767 of ucs2
    "text_utf32": (mysql.TEXT(charset="utf32"), ["x" * 16383, "😀"], ["x" * 16384, "x" * 20000]),
    "text_ucs2": (mysql.TEXT(charset="ucs2"), ["x" * 32767, "é"], ["x" * 32768, "😀"]),
    "utf8mb4": (mysql.VARCHAR(20, charset="utf8mb4"), ["abc", *ACCENTED, *BEYOND_BMP], []),
}

MODELS = one_column_models(Base, "cs", {name: t for name, (t, _, _) in DECLARED.items()})


class TableCharset(Base):
    """A table declaring its character set: its columns without one of their own take it."""

    __tablename__ = "cs_table_latin1"
    __table_args__ = {"mysql_charset": "latin1"}

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    value: Mapped[str] = mapped_column(sa.String(20))


MODELS["table"] = TableCharset
DECLARED["table"] = (None, ["abc", "é"], ["😀", "€"])


@pytest.fixture
def lenient(
    engine: Engine, redis_url: str, prefix: str
) -> Iterator[tuple[WriteThroughCache, sessionmaker[Session]]]:
    reset_schema(engine, Base.metadata)
    lenient = sa.create_engine(
        engine.url, connect_args={"init_command": "SET SESSION sql_mode = ''"}
    )
    try:
        with caching_all(lenient, redis_url, prefix, Base) as found:
            yield found
    finally:
        lenient.dispose()


def test_a_get_after_a_commit_returns_what_the_database_stored(
    lenient: tuple[WriteThroughCache, sessionmaker[Session]], redis_client: redis.Redis
) -> None:
    """(and a value the declared character set holds is still written through: the catalog
    says the same character set, so the check of each value is enough)"""
    cache, made = lenient
    wrong = []
    changed = 0  # not vacuous: the database did change values
    for name, model in MODELS.items():
        _, holds, cannot = DECLARED[name]
        for key, value in enumerate([*holds, *cannot]):

            def written(
                model: Any = model, key: int = key, value: str = value, name: str = name
            ) -> None:
                if value in DECLARED[name][1]:
                    state = entry_state(redis_client, entry_key(cache, model, key))
                    assert state == "value", (name, value[:12])

            found = served_and_stored(made, model, key, value, after_commit=written)
            assert found is not None, (name, value)  # a lenient mode refuses nothing here
            got, stored = found
            changed += stored != value
            if got != stored:
                wrong.append((name, value[:12], got[:12], stored[:12]))
    assert wrong == []
    assert changed >= 20


def test_values_the_character_set_holds_are_still_written_through(
    engine: Engine, redis_url: str, prefix: str, redis_client: redis.Redis
) -> None:
    reset_schema(engine, Base.metadata)
    with caching_all(engine, redis_url, prefix, Base) as (cache, made):
        for name, model in MODELS.items():
            for key, value in enumerate(DECLARED[name][1]):
                with made() as session:
                    session.add(model(id=key, value=value))
                    session.commit()
                assert entry_state(redis_client, entry_key(cache, model, key)) == "value", (
                    name,
                    value[:12],
                )
                with made() as session, capture_sql(engine) as sql:
                    assert session.get(model, key).value == value
                assert sql == []


class Legacy(DeclarativeBase):
    pass


class LegacyName(Legacy):
    """A table of a server whose database defaults to latin1 (as MySQL did before 8.0); the
    model declares no character set: only the catalog knows it."""

    __tablename__ = "cs_legacy"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    value: Mapped[str] = mapped_column(sa.String(20))


@pytest.fixture
def legacy_table(engine: Engine) -> Iterator[None]:
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE IF EXISTS cs_legacy")
        conn.exec_driver_sql(
            "CREATE TABLE cs_legacy (id INTEGER PRIMARY KEY, value VARCHAR(20)) "
            "CHARACTER SET latin1"
        )
    yield
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE IF EXISTS cs_legacy")


def test_a_character_set_only_the_database_knows_invalidates_in_a_lenient_mode(
    engine: Engine, legacy_table: None, redis_url: str, prefix: str, redis_client: redis.Redis
) -> None:
    """The cache reads the character sets of the schema's columns once per pool, when its
    sessions run a lenient ``sql_mode``: a commit of a column in one narrower than utf8mb4
    that the model does not declare invalidates (the report says why), so a get loads what
    the database stored. In strict mode nothing changes: such values are refused."""
    lenient = sa.create_engine(
        engine.url, connect_args={"init_command": "SET SESSION sql_mode = ''"}
    )
    try:
        with caching_all(lenient, redis_url, prefix, Legacy) as (cache, made):
            for key, value in enumerate(["abc", "é", "😀", "a😀"]):
                found = served_and_stored(made, LegacyName, key, value)
                assert found is not None
                assert found[0] == found[1], (value, found)
            report = cache.models(lenient)[LegacyName]
            assert "cs_legacy.value is stored in latin1" in report.commits_invalidate_because
    finally:
        lenient.dispose()
    with caching_all(engine, redis_url, prefix + "s", Legacy) as (cache, made):
        with made() as session:
            session.add(LegacyName(id=10, value="é"))
            session.commit()
        assert entry_state(redis_client, entry_key(cache, LegacyName, 10)) == "value"
        assert cache.models(engine)[LegacyName].commits_invalidate_because == ""


class Synonyms(DeclarativeBase):
    pass


class Utf8Name(Synonyms):
    """Declared ``utf8``, which MariaDB's catalog calls ``utf8mb3`` (MySQL 8.0's too)."""

    __tablename__ = "cs_utf8_synonym"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    value: Mapped[str] = mapped_column(mysql.VARCHAR(20, charset="utf8"))


class WiderName(Synonyms):
    """Declared ``utf8`` on a column the database stores in ``latin1`` (see
    ``synonym_tables``): ``ā`` and ``😀`` would pass the declaration's check and be stored as
    ``?``."""

    __tablename__ = "cs_wider"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    value: Mapped[str] = mapped_column(mysql.VARCHAR(20, charset="utf8"))


@pytest.fixture
def synonym_tables(engine: Engine) -> Iterator[None]:
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE IF EXISTS cs_utf8_synonym")
        Utf8Name.__table__.create(conn)
        conn.exec_driver_sql("DROP TABLE IF EXISTS cs_wider")
        conn.exec_driver_sql(
            "CREATE TABLE cs_wider (id INTEGER PRIMARY KEY, value VARCHAR(20) CHARACTER SET latin1)"
        )
    yield
    with engine.begin() as conn:
        for table in ("cs_utf8_synonym", "cs_wider"):
            conn.exec_driver_sql(f"DROP TABLE IF EXISTS {table}")


def test_a_character_set_declared_by_another_name_still_writes_through(
    engine: Engine,
    synonym_tables: None,
    redis_url: str,
    prefix: str,
    redis_client: redis.Redis,
) -> None:
    """A model declaring ``utf8``, which the catalog names ``utf8mb3``, checks values as the
    database needs: in a lenient mode its commits wrote nothing through (every one
    invalidated, the report naming the column as undeclared); now only the values utf8mb3
    cannot hold do. A declaration of another set than the column's (``utf8`` on ``latin1``)
    still makes every commit invalidate."""
    lenient = sa.create_engine(
        engine.url, connect_args={"init_command": "SET SESSION sql_mode = ''"}
    )
    try:
        with caching_all(lenient, redis_url, prefix, Synonyms) as (cache, made):
            report = cache.models(lenient)
            assert report[Utf8Name].commits_invalidate_because == ""
            assert "cs_wider.value is stored in latin1" in (
                report[WiderName].commits_invalidate_because
            )
            with made() as session:
                session.add(Utf8Name(id=1, value="é"))
                session.commit()
            assert entry_state(redis_client, entry_key(cache, Utf8Name, 1)) == "value"
            for key, (model, value) in enumerate(
                [(Utf8Name, "😀"), (WiderName, "ā"), (WiderName, "😀")], 2
            ):
                found = served_and_stored(made, model, key, value)
                assert found is not None and found[0] == found[1] == "?", (model, value, found)
    finally:
        lenient.dispose()
