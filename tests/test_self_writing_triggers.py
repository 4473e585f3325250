"""A trigger that writes other rows of its own table: one address of a user is the primary
one, and making another the primary (or deleting it) flips the rest, in a trigger. The flush
wrote one row; the trigger changed others the cache holds, and nothing told the cache: their
entries were served stale until their TTL, whichever way the write came (unit of work, ORM or
Core DML, raw SQL).

Now the cache reads, in each trigger's code (once per pool, with the other catalog
questions), which tables its statements write; a table whose triggers write it has every
write invalidate its model whole. MariaDB and MySQL refuse a trigger that writes its own
table (error 1442), so the two databases that allow it are tested. What is observed: what a
load through the cache returns against one without it, and ``cache.models(engine)``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import String, delete, text, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from sqlalchemy_writethrough import CachedModel, WriteThroughCache

from _cache_helpers import cache_on
from _servers import capture_sql, reset_schema

pytestmark = pytest.mark.databases("sqlite", "postgresql")


class Base(DeclarativeBase):
    pass


class SwAddress(Base, CachedModel):
    """Its triggers keep one primary address per user."""

    __tablename__ = "sw_address"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    user_id: Mapped[int]
    is_primary: Mapped[bool] = mapped_column(default=False)


class SwTrusted(Base, CachedModel):
    """The same trigger, but the model declares its strategy: taken at its word."""

    __tablename__ = "sw_trusted"
    __writethrough__ = {"strategy": "invalidate"}
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    user_id: Mapped[int]
    is_primary: Mapped[bool] = mapped_column(default=False)


class SwDeclared(Base, CachedModel):
    """Declares its strategy, and that its writes change its own table: the way to say it
    where the catalog cannot tell (dynamic SQL built from pieces)."""

    __tablename__ = "sw_declared"
    __writethrough__ = {"strategy": "invalidate", "also_invalidates": ["sw_declared"]}
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    user_id: Mapped[int]
    is_primary: Mapped[bool] = mapped_column(default=False)


class SwChecked(Base, CachedModel):
    """Its trigger only reads its own table."""

    __tablename__ = "sw_checked"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(20))


def _create_triggers(engine: Engine) -> None:
    with engine.begin() as conn:
        for table in ("sw_address", "sw_trusted", "sw_declared"):
            demote = (
                f"UPDATE {table} SET is_primary = {{false}} WHERE user_id = NEW.user_id "
                "AND id <> NEW.id AND is_primary"
            )
            promote = (
                f"UPDATE {table} SET is_primary = {{true}} WHERE id = "
                f"(SELECT min(id) FROM {table} WHERE user_id = OLD.user_id)"
            )
            if conn.dialect.name == "postgresql":
                conn.exec_driver_sql(
                    f"CREATE OR REPLACE FUNCTION {table}_one() RETURNS trigger AS $$ BEGIN "
                    f"IF TG_OP = 'DELETE' THEN "
                    f"IF OLD.is_primary THEN {promote.format(true='true')}; END IF; "
                    f"RETURN OLD; END IF; "
                    f"IF NEW.is_primary THEN {demote.format(false='false')}; END IF; "
                    "RETURN NEW; END $$ LANGUAGE plpgsql"
                )
                conn.exec_driver_sql(f"DROP TRIGGER IF EXISTS {table}_one ON {table}")
                conn.exec_driver_sql(
                    f"CREATE TRIGGER {table}_one AFTER INSERT OR UPDATE OR DELETE ON {table} "
                    f"FOR EACH ROW EXECUTE FUNCTION {table}_one()"
                )
            else:
                for event in ("INSERT", "UPDATE OF is_primary"):
                    name = f"{table}_{event.split()[0].lower()}"
                    conn.exec_driver_sql(f"DROP TRIGGER IF EXISTS {name}")
                    conn.exec_driver_sql(
                        f"CREATE TRIGGER {name} AFTER {event} ON {table} "
                        f"WHEN NEW.is_primary BEGIN {demote.format(false=0)}; END"
                    )
                conn.exec_driver_sql(f"DROP TRIGGER IF EXISTS {table}_delete")
                conn.exec_driver_sql(
                    f"CREATE TRIGGER {table}_delete AFTER DELETE ON {table} "
                    f"WHEN OLD.is_primary BEGIN {promote.format(true=1)}; END"
                )
        check = "SELECT count(*) FROM sw_checked"
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql(
                "CREATE OR REPLACE FUNCTION sw_checked_check() RETURNS trigger AS $$ BEGIN "
                f"IF ({check}) > 100 THEN RAISE EXCEPTION 'full'; END IF; "
                "RETURN NEW; END $$ LANGUAGE plpgsql"
            )
            conn.exec_driver_sql("DROP TRIGGER IF EXISTS sw_checked_check ON sw_checked")
            conn.exec_driver_sql(
                "CREATE TRIGGER sw_checked_check BEFORE INSERT ON sw_checked "
                "FOR EACH ROW EXECUTE FUNCTION sw_checked_check()"
            )
        else:
            conn.exec_driver_sql("DROP TRIGGER IF EXISTS sw_checked_check")
            conn.exec_driver_sql(
                "CREATE TRIGGER sw_checked_check BEFORE INSERT ON sw_checked "
                f"WHEN ({check}) > 100 BEGIN SELECT RAISE(ABORT, 'full'); END"
            )


@contextlib.contextmanager
def _installed(
    engine: Engine, redis_url: str, prefix: str
) -> Iterator[tuple[WriteThroughCache, sessionmaker[Session]]]:
    reset_schema(engine, Base.metadata)
    _create_triggers(engine)
    with cache_on(engine, redis_url, prefix) as installed:
        yield installed


def _primaries(made: sessionmaker[Session], engine: Engine, model: Any) -> tuple[Any, Any]:
    """Each address's ``is_primary``, loaded through the cache (one at a time, by key:
    served from it once cached) and without it."""
    with Session(engine) as plain:
        fresh = {a.id: a.is_primary for a in plain.query(model).order_by(model.id)}
    with made() as session:
        cached = {pk: session.get(model, pk).is_primary for pk in fresh}
    return cached, fresh


def _same(made: sessionmaker[Session], engine: Engine, model: Any = SwAddress) -> None:
    cached, fresh = _primaries(made, engine, model)
    assert cached == fresh


def test_a_trigger_that_writes_other_rows_of_its_table_leaves_no_stale_entry(
    engine: Engine, redis_url: str, prefix: str
) -> None:
    with _installed(engine, redis_url, prefix) as (cache, made):
        with made() as session:
            session.add_all(
                [SwAddress(id=1, user_id=7, is_primary=True), SwAddress(id=2, user_id=7)]
            )
            session.commit()
        _same(made, engine)  # cached now
        # the unit of work: an insert, then a change, that make another address the primary
        with made() as session:
            session.add(SwAddress(id=3, user_id=7, is_primary=True))
            session.commit()
        _same(made, engine)
        with made() as session:
            found = session.get(SwAddress, 2)
            assert found is not None
            found.is_primary = True
            session.commit()
        _same(made, engine)
        # ORM DML by primary key (which invalidates the rows it names, not the others)
        with made() as session:
            session.execute(update(SwAddress).where(SwAddress.id == 1).values(is_primary=True))
            session.commit()
        _same(made, engine)
        # raw SQL: a plain INSERT, which cannot change a row the cache holds by itself
        with made() as session:
            session.execute(
                text("INSERT INTO sw_address (id, user_id, is_primary) VALUES (4, 7, :t)"),
                {"t": True},
            )
            session.commit()
        _same(made, engine)
        # a delete: the trigger promotes another address
        with made() as session:
            session.execute(delete(SwAddress).where(SwAddress.id == 4))
            session.commit()
        assert _primaries(made, engine, SwAddress)[1] == {1: True, 2: False, 3: False}
        _same(made, engine)
        with made() as session:
            gone = session.get(SwAddress, 1)
            session.delete(gone)
            session.commit()
        assert _primaries(made, engine, SwAddress)[1] == {2: True, 3: False}
        _same(made, engine)
        said = cache.models(engine)[SwAddress].commits_invalidate_because
        assert "writes its own table" in said and "invalidate the model whole" in said


def test_what_the_report_says_of_each_kind_of_trigger(
    engine: Engine, redis_url: str, prefix: str
) -> None:
    """A model that declares its strategy is taken at its word (its triggers write only the
    row being written); a trigger that only reads its table does not make it invalidate
    whole."""
    with _installed(engine, redis_url, prefix) as (cache, made):
        with made() as session:
            session.add_all(
                [SwTrusted(id=1, user_id=7, is_primary=True), SwChecked(id=1, name="a")]
            )
            session.commit()
        report = cache.models(engine)
        assert report[SwTrusted].commits_invalidate_because == ""
        assert "its own table" not in report[SwChecked].commits_invalidate_because
        # taken at its word: the entry of the row the trigger demoted is served as it was
        _same(made, engine, SwTrusted)
        with made() as session:
            session.add(SwTrusted(id=2, user_id=7, is_primary=True))
            session.commit()
        cached, fresh = _primaries(made, engine, SwTrusted)
        assert (cached[1], fresh[1]) == (True, False)
        # declared: whole again
        with made() as session:
            session.add(SwDeclared(id=1, user_id=7, is_primary=True))
            session.commit()
        _same(made, engine, SwDeclared)
        with made() as session:
            session.add(SwDeclared(id=2, user_id=7, is_primary=True))
            session.commit()
        _same(made, engine, SwDeclared)


@pytest.mark.parametrize(
    ("code", "written"),
    [
        (
            "BEGIN UPDATE address SET is_primary = 0 WHERE id <> NEW.id; END",
            {"address"},
        ),
        ('UPDATE ONLY public."Address" SET x = 1', {"public.address"}),
        ("INSERT OR REPLACE INTO log VALUES (1); DELETE FROM s . t", {"log", "s.t"}),
        ("EXECUTE format('UPDATE node SET path = %L', p)", {"node"}),  # dynamic SQL
        ("MERGE INTO ONLY stock s USING x ON s.id = x.id", {"stock"}),
        ("IF (SELECT count(*) FROM address) > 9 THEN RAISE 'full'; END IF", set()),
        ("-- UPDATE gone SET x = 1\nNEW.updated_at = now(); RETURN NEW;", set()),
        ("UPDATE only_table SET x = 1", {"only_table"}),
        # MySQL's own forms: multi-table, modifiers, INTO left out
        ("UPDATE node n JOIN address a ON a.id = n.id SET a.x = 1", {"node", "address"}),
        ("UPDATE LOW_PRIORITY IGNORE address SET x = 1", {"address"}),
        ("DELETE node, address.* FROM node JOIN address JOIN log", {"node", "address"}),
        ("DELETE FROM node, address USING node JOIN address JOIN log", {"node", "address"}),
        ("INSERT address (x) VALUES (1) ON DUPLICATE KEY UPDATE gone = 2", {"address"}),
        ("REPLACE DELAYED address VALUES (1)", {"address"}),
        ("TRUNCATE TABLE ONLY node, address RESTART IDENTITY", {"node", "address"}),
        # a header's words are not statements; FOR/DO UPDATE name no table
        ("CREATE TRIGGER x AFTER UPDATE OF gone, t ON t BEGIN DELETE FROM log; END", {"log"}),
        ("CREATE RULE r AS ON UPDATE TO gone DO ALSO UPDATE node SET x = 1", {"node"}),
        ("INSERT INTO log VALUES (1) ON CONFLICT (x) DO UPDATE SET gone = 1", {"log"}),
        ("SELECT 1 FROM log FOR UPDATE OF gone; DELETE FROM t USING gone", {"t"}),
    ],
)
def test_the_tables_a_triggers_code_writes(code: str, written: set[str]) -> None:
    from sqlalchemy_writethrough.databases import _written

    found: Any = _written(code)
    assert written <= found
    assert not {"gone", "only", "node.set", "address", "t", "set", "on", "of", "log"} & (
        found - written
    )


class SwStamped(Base, CachedModel):
    """Its trigger stamps the row written, and only it (SQLite's way; an AFTER trigger on
    PostgreSQL), or, for the "other rows" variant, its parent too."""

    __tablename__ = "sw_stamped"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    parent_id: Mapped[int | None]
    name: Mapped[str] = mapped_column(String(20))
    folded: Mapped[str | None] = mapped_column(String(20))


#: the WHERE of the trigger's UPDATE: the row written alone, or it and its parent
_STAMPS = {
    "own-row": "id = NEW.id",
    "own-row-and": "name IS NOT NULL AND sw_stamped.id = NEW.id",
    "other-rows": "id = NEW.id OR id = NEW.parent_id",
}


def _create_stamp(engine: Engine, where: str, table: str = "sw_stamped") -> None:
    """``table``'s trigger: after a write of its name, ``UPDATE table SET folded = ...
    WHERE where``."""
    stamp = f"UPDATE {table} SET folded = lower(NEW.name) WHERE {where}"
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql(
                f"CREATE OR REPLACE FUNCTION {table}_fn() RETURNS trigger AS $$ BEGIN "
                f"IF pg_trigger_depth() = 1 THEN {stamp}; END IF; RETURN NULL; END $$ "
                "LANGUAGE plpgsql"
            )
            conn.exec_driver_sql(f"DROP TRIGGER IF EXISTS {table}_tg ON {table}")
            conn.exec_driver_sql(
                f"CREATE TRIGGER {table}_tg AFTER INSERT OR UPDATE OF name ON {table} "
                f"FOR EACH ROW EXECUTE FUNCTION {table}_fn()"
            )
        else:
            conn.exec_driver_sql(f"DROP TRIGGER IF EXISTS {table}_tg")
            conn.exec_driver_sql(
                f"CREATE TRIGGER {table}_tg AFTER UPDATE OF name ON {table} BEGIN {stamp}; END"
            )


@pytest.mark.parametrize("kind", list(_STAMPS))
def test_a_trigger_that_updates_only_the_row_written_keeps_the_others_cached(
    engine: Engine, redis_url: str, prefix: str, kind: str
) -> None:
    """``UPDATE t SET ... WHERE id = NEW.id`` (the key, maybe qualified, and more conditions
    joined by ``AND``) rewrites the row written, as any trigger of these databases is taken
    to: its commits invalidate that row,
    and the model's other rows stay served (they were all invalidated at every write). Any
    other WHERE may reach other rows: the model is invalidated whole."""
    reset_schema(engine, Base.metadata)
    _create_stamp(engine, _STAMPS[kind])
    with cache_on(engine, redis_url, prefix) as (cache, made):
        with made() as session:
            session.add_all([SwStamped(id=1, name="Root"), SwStamped(id=2, name="A")])
            session.commit()
        with made() as session:
            session.get_one(SwStamped, 2).parent_id = 1
            session.commit()
        for pk in (1, 2):  # cached now
            with made() as session:
                session.get_one(SwStamped, pk)
        with made() as session:
            session.get_one(SwStamped, 2).name = "Bee"
            session.commit()
        with Session(engine) as plain:
            fresh = [(r.name, r.folded) for r in (plain.get_one(SwStamped, pk) for pk in (1, 2))]
        with made() as session, capture_sql(engine) as sql:
            cached = [(r.name, r.folded) for r in (session.get_one(SwStamped, pk) for pk in (1, 2))]
        assert cached == fresh
        # the written row is read again; its parent too when the model went whole
        assert len(sql) == (2 if kind == "other-rows" else 1), sql
        reasons = cache.models(engine)[SwStamped].commits_invalidate_because
        assert "sw_stamped" in reasons
        assert ("writes its own table" in reasons) is (kind == "other-rows")


class SwPair(Base, CachedModel):
    """A composite primary key: its trigger stamps the row written by both columns, or, for
    the "id only" variant, every tenant's row of that id."""

    __tablename__ = "sw_pair"
    tenant: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(20))
    folded: Mapped[str | None] = mapped_column(String(20))


_PAIR_STAMPS = {
    "whole key": "sw_pair.tenant = NEW.tenant AND id = NEW.id",
    "id only": "id = NEW.id",
}


@pytest.mark.parametrize("kind", list(_PAIR_STAMPS))
def test_a_composite_key_trigger_that_updates_only_the_row_written_keeps_the_others_cached(
    engine: Engine, redis_url: str, prefix: str, kind: str
) -> None:
    """The same with a composite primary key: an update picking the row by every column of
    the key rewrites that row alone (before, a composite key was never "the row written":
    the model was invalidated whole at every write); by a part of it, it may reach other
    rows (here: the other tenant's row of that id), and the model is invalidated whole."""
    reset_schema(engine, Base.metadata)
    _create_stamp(engine, _PAIR_STAMPS[kind], "sw_pair")
    keys = [(1, 7), (2, 7)]
    with cache_on(engine, redis_url, prefix) as (cache, made):
        with made() as session:
            session.add_all([SwPair(tenant=t, id=i, name=f"T{t}") for t, i in keys])
            session.commit()
        for key in keys:  # cached now
            with made() as session:
                session.get_one(SwPair, key)
        with made() as session:
            session.get_one(SwPair, keys[0]).name = "Bee"
            session.commit()
        with Session(engine) as plain:
            fresh = [(r.name, r.folded) for r in (plain.get_one(SwPair, k) for k in keys)]
        with made() as session, capture_sql(engine) as sql:
            cached = [(r.name, r.folded) for r in (session.get_one(SwPair, k) for k in keys)]
        assert cached == fresh
        assert len(sql) == (1 if kind == "whole key" else 2), sql
        reasons = cache.models(engine)[SwPair].commits_invalidate_because
        assert ("writes its own table" in reasons) is (kind == "id only")


@pytest.mark.parametrize(
    ("code", "rows"),
    [
        ("BEGIN UPDATE t SET e = lower(NEW.e) WHERE id = NEW.id; END", {("t", ("id",))}),
        ('UPDATE "T" SET e = 1 WHERE NEW."Id" = "Id"', {("t", ("id",))}),
        ("UPDATE s.t SET e = 1 WHERE rowid = NEW.rowid", {("s.t", ("rowid",))}),
        ("UPDATE t SET e = 1 WHERE id = NEW.id OR id = NEW.parent_id", set()),
        ("UPDATE t SET e = 1 WHERE id = NEW.id AND e IS NULL", {("t", ("id",))}),
        ("UPDATE t SET e = 1 WHERE e IS NULL AND t.id = NEW.id", {("t", ("id",))}),
        ("UPDATE s.t SET e = 1 WHERE NEW.id = s.t.id AND e > 0", {("s.t", ("id",))}),
        ("UPDATE t SET e = 1 WHERE id = NEW.id AND (e IS NULL OR e = 0)", {("t", ("id",))}),
        ("UPDATE t SET e = 1 WHERE u.id = NEW.id", set()),
        ("UPDATE t SET e = 1 WHERE a = NEW.a AND t.b = NEW.b AND e > 0", {("t", ("a", "b"))}),
        ("UPDATE t SET a = 2 WHERE a = NEW.a AND b = NEW.b", set()),
        ("UPDATE t SET e = 1 WHERE id = NEW.id AND e = 0 OR e = 1", set()),
        ("UPDATE t SET e = 1 WHERE id = NEW.id AND e = 'a;' OR e = 'b'", set()),
        ("UPDATE t SET e = 1 WHERE id = NEW.id AND e <> 'a''s'", {("t", ("id",))}),
        ("UPDATE t SET e = 1 WHERE e IN (SELECT e FROM u WHERE x AND id = NEW.id AND y)", set()),
        ("UPDATE t SET e = 1 WHERE NOT (x AND id = NEW.id)", set()),
        ("UPDATE t SET e = 1 WHERE e BETWEEN 1 AND 2 AND id = NEW.id", set()),
        ("UPDATE t SET e = 1 WHERE id = NEW.id AND CASE WHEN a THEN 1 END = 1 OR b", set()),
        (
            "BEGIN UPDATE t SET e = 1 WHERE id = NEW.id AND CASE WHEN a THEN 1 END = 1; END",
            {("t", ("id",))},
        ),
        ("UPDATE t SET e = 1 WHERE id = NEW.parent_id", set()),
        ("UPDATE t SET e = 1 WHERE id = NEW.id + 500000", set()),
        ("UPDATE t SET id = NEW.id + 1 WHERE id = NEW.id", set()),
        ("UPDATE t SET e = 1, t.id = 2 WHERE id = NEW.id", set()),
        ("UPDATE t SET e = (SELECT max(e) FROM u WHERE u.id = 1) WHERE id = NEW.id", set()),
    ],
)
def test_an_update_of_only_the_row_written(
    code: str, rows: set[tuple[str, tuple[str, ...]]]
) -> None:
    """Only ``UPDATE t SET ... WHERE key = NEW.key`` (either way round, the key bare or
    qualified by the table's name), other conditions joined by ``AND`` allowed, the key not
    set, is read as a write of the row written alone; anything else (an ``OR``, the equality
    inside parentheses or a subquery, another table's key) is a write of the table."""
    from sqlalchemy_writethrough.databases import _row_updates, _statements

    text, found = _row_updates(_statements(code))
    assert {(table, tuple(sorted(columns))) for table, columns in found} == rows
    assert ("update" in text) is not bool(rows)  # taken out of what the table is written by
