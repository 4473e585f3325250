"""PostgreSQL tables whose rows live, or are rewritten, somewhere the model does not name:

- a partitioned table whose partition has a trigger of its own (the trigger is on the
  partition, not on the table the model maps): the flush writes the parent, the row lands in
  the partition and its ``BEFORE`` trigger rewrites it;
- a table with an inheriting child table that has such a trigger: an ORM ``UPDATE`` of the
  parent reaches the child's rows, and fires the child's trigger;
- a rule (``CREATE RULE ... ON INSERT ... DO ALSO UPDATE``) that rewrites the row just written;
- a partition that is a foreign table: the parent's rows change in another database.

Before: the cache asked only for the mapped table's own triggers and relation kind, so the
values the flush sent were written through and served (the first three), and the parent was
served (the last). Now the cache asks the catalog for partitions' and children's triggers,
rules and foreign tables too, and names the reason.

What is observed: what a get returns against a load without the cache, the SQL a get emits,
and the reason ``cache.models(engine)`` gives.
"""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from sqlalchemy import String
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from sqlalchemy_writethrough import CachedModel

from _cache_helpers import cache_on
from _servers import capture_sql, reset_schema

pytestmark = pytest.mark.databases("postgresql")


class Base(DeclarativeBase):
    pass


class PtParted(Base, CachedModel):
    """Partitioned by key; the partition for keys below 100 has a trigger that folds email."""

    __tablename__ = "pt_parted"
    __table_args__ = {"postgresql_partition_by": "RANGE (id)"}
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    email: Mapped[str] = mapped_column(String(60))


class PtInherited(Base, CachedModel):
    """A plain table with a child table (``INHERITS``) whose trigger folds email."""

    __tablename__ = "pt_inherited"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    email: Mapped[str] = mapped_column(String(60))


class PtRuled(Base, CachedModel):
    """A rule fills ``folded`` after each insert: the flush sent None."""

    __tablename__ = "pt_ruled"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    email: Mapped[str] = mapped_column(String(60))
    folded: Mapped[str | None] = mapped_column(String(60))


class PtRemote(Base, CachedModel):
    """Partitioned; one partition is a foreign table (postgres_fdw), so the table can have no
    unique index: its key is the mapper's."""

    __tablename__ = "pt_remote"
    __table_args__ = {"postgresql_partition_by": "RANGE (id)"}
    id: Mapped[int] = mapped_column(autoincrement=False)
    email: Mapped[str] = mapped_column(String(60))
    __mapper_args__ = {"primary_key": [id]}


class PtRemoteParent(Base, CachedModel):
    """A plain table; a foreign table inherits it."""

    __tablename__ = "pt_remote_parent"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    email: Mapped[str] = mapped_column(String(60))


_FOLD = (
    "CREATE OR REPLACE FUNCTION pt_fold() RETURNS trigger AS $$ "
    "BEGIN NEW.email := lower(NEW.email); RETURN NEW; END $$ LANGUAGE plpgsql"
)


@pytest.fixture
def engine_with_children(engine: Engine) -> Engine:
    """``engine``, its tables made afresh with their partitions, children, triggers and rule
    (a drop of the parents drops their partitions; a child is dropped with CASCADE)."""
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE IF EXISTS pt_inherited CASCADE")
    reset_schema(engine, Base.metadata)
    with engine.begin() as conn:
        conn.exec_driver_sql(_FOLD)
        conn.exec_driver_sql(
            "CREATE TABLE IF NOT EXISTS pt_parted_low PARTITION OF pt_parted "
            "FOR VALUES FROM (0) TO (100)"
        )
        conn.exec_driver_sql(
            "CREATE TABLE IF NOT EXISTS pt_parted_high PARTITION OF pt_parted "
            "FOR VALUES FROM (100) TO (MAXVALUE)"
        )
        conn.exec_driver_sql("DROP TRIGGER IF EXISTS pt_parted_low_tg ON pt_parted_low")
        conn.exec_driver_sql("DROP TRIGGER IF EXISTS pt_parted_low_note ON pt_parted_low")
        conn.exec_driver_sql(
            "CREATE TRIGGER pt_parted_low_tg BEFORE INSERT OR UPDATE ON pt_parted_low "
            "FOR EACH ROW EXECUTE FUNCTION pt_fold()"
        )
        conn.exec_driver_sql("CREATE TABLE pt_inherited_child () INHERITS (pt_inherited)")
        conn.exec_driver_sql(
            "CREATE TRIGGER pt_inherited_child_tg BEFORE INSERT OR UPDATE ON pt_inherited_child "
            "FOR EACH ROW EXECUTE FUNCTION pt_fold()"
        )
        conn.exec_driver_sql(
            "CREATE OR REPLACE RULE pt_ruled_fold AS ON INSERT TO pt_ruled DO ALSO "
            "UPDATE pt_ruled SET folded = lower(NEW.email) WHERE id = NEW.id"
        )
    return engine


def _served(made: sessionmaker[Session], engine: Engine, model: type, key: int) -> list[str]:
    """What a get through the cache returns (after a fill, if it missed), checked against a
    load without it."""
    with made() as session:
        session.get(model, key)
    with made() as session, Session(engine) as plain:
        cached, fresh = session.get(model, key), plain.get(model, key)
        assert cached is not None and fresh is not None
        values = [getattr(cached, c.key) for c in sa.inspect(model).column_attrs]
        assert values == [getattr(fresh, c.key) for c in sa.inspect(model).column_attrs]
        return values


def test_a_partitions_trigger_is_read_as_it_stored(
    engine_with_children: Engine, redis_url: str, prefix: str
) -> None:
    engine = engine_with_children
    with cache_on(engine, redis_url, prefix) as (cache, made):
        with made() as session:
            session.add_all([PtParted(id=1, email="Ann"), PtParted(id=100, email="Bob")])
            session.commit()
        assert _served(made, engine, PtParted, 1) == [1, "ann"]  # the trigger's
        assert _served(made, engine, PtParted, 100) == [100, "Bob"]  # no trigger there
        with made() as session:
            session.get(PtParted, 1).email = "CAROL"
            session.commit()
        assert _served(made, engine, PtParted, 1) == [1, "carol"]
        reason = cache.models(engine)[PtParted].commits_invalidate_because
        assert reason.endswith(
            "a trigger or rule of a partition or child table of public.pt_parted may change "
            "the rows a flush writes"
        )


def test_an_inheriting_childs_trigger_is_read_as_it_stored(
    engine_with_children: Engine, redis_url: str, prefix: str
) -> None:
    """The row lives in the child (another program inserted it there); the ORM's UPDATE of
    the parent reaches it and the child's trigger rewrites it."""
    engine = engine_with_children
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO pt_inherited_child (id, email) VALUES (1, 'ann')")
    with cache_on(engine, redis_url, prefix) as (cache, made):
        assert _served(made, engine, PtInherited, 1) == [1, "ann"]
        with made() as session:
            session.get(PtInherited, 1).email = "BOB"
            session.commit()
        assert _served(made, engine, PtInherited, 1) == [1, "bob"]
        assert "public.pt_inherited" in cache.models(engine)[PtInherited].commits_invalidate_because


def test_a_rule_that_rewrites_the_row_is_read_as_it_stored(
    engine_with_children: Engine, redis_url: str, prefix: str
) -> None:
    engine = engine_with_children
    with cache_on(engine, redis_url, prefix) as (cache, made):
        with made() as session:
            session.add(PtRuled(id=1, email="Ann"))
            session.commit()
        assert _served(made, engine, PtRuled, 1) == [1, "Ann", "ann"]  # before: folded None
        reason = cache.models(engine)[PtRuled].commits_invalidate_because
        assert "a rule of public.pt_ruled may change the rows a flush writes" in reason
        # its UPDATE may reach other rows for all the cache can tell
        assert "a trigger or rule of public.pt_ruled writes its own table" in reason


@pytest.mark.parametrize("model", [PtRemote, PtRemoteParent])
def test_a_table_with_a_foreign_partition_is_not_served(
    engine_with_children: Engine, redis_url: str, prefix: str, model: type
) -> None:
    """The foreign table reads a table of this same database over postgres_fdw (any other
    database would do): the rows of the parent can change with no commit of ours, so its
    loads read the database, even those of the keys that live in the parent itself or in a
    local partition."""
    engine = engine_with_children
    url = engine.url
    parent = model.__tablename__  # type: ignore[attr-defined]
    attach = (
        f"PARTITION OF {parent} FOR VALUES FROM (100) TO (MAXVALUE)"
        if model is PtRemote
        else f"(id integer, email varchar(60)) INHERITS ({parent})"
    )
    with engine.begin() as conn:
        if (
            conn.exec_driver_sql(
                "SELECT 1 FROM pg_available_extensions WHERE name = 'postgres_fdw'"
            ).first()
            is None
        ):
            pytest.skip("this PostgreSQL has no postgres_fdw")
        conn.exec_driver_sql("CREATE EXTENSION IF NOT EXISTS postgres_fdw")
        conn.exec_driver_sql("DROP SERVER IF EXISTS pt_loopback CASCADE")
        conn.exec_driver_sql(
            "CREATE SERVER pt_loopback FOREIGN DATA WRAPPER postgres_fdw OPTIONS "
            f"(host '{url.host or '127.0.0.1'}', port '{url.port or 5432}', "
            f"dbname '{url.database}')"
        )
        conn.exec_driver_sql(
            "CREATE USER MAPPING FOR CURRENT_USER SERVER pt_loopback "
            f"OPTIONS (user '{url.username or 'postgres'}')"
        )
        if model is PtRemote:
            conn.exec_driver_sql(
                "CREATE TABLE IF NOT EXISTS pt_remote_low PARTITION OF pt_remote "
                "FOR VALUES FROM (0) TO (100)"
            )
        conn.exec_driver_sql("DROP TABLE IF EXISTS pt_elsewhere")
        conn.exec_driver_sql("CREATE TABLE pt_elsewhere (id integer, email varchar(60))")
        conn.exec_driver_sql(
            f"CREATE FOREIGN TABLE pt_remote_foreign {attach} SERVER pt_loopback "
            "OPTIONS (table_name 'pt_elsewhere')"
        )
    try:
        with cache_on(engine, redis_url, prefix) as (cache, made):
            with made() as session:
                session.add(model(id=1, email="Ann"))
                session.commit()
            for _ in range(2):
                with made() as session, capture_sql(engine) as statements:
                    assert session.get(model, 1).email == "Ann"
                assert len(statements) == 1  # from the database, every time
            reason = cache.models(engine)[model].not_served_because
            assert f"a partition or child table of public.{parent} is a foreign table" in reason
    finally:
        with engine.begin() as conn:
            conn.exec_driver_sql("DROP SERVER IF EXISTS pt_loopback CASCADE")
            conn.exec_driver_sql("DROP TABLE IF EXISTS pt_elsewhere")


def test_a_partitions_trigger_that_writes_another_model_is_named_under_the_partitioned_table(
    engine_with_children: Engine, redis_url: str, prefix: str
) -> None:
    """A trigger on one partition that writes another cached model's table is reported under
    the name of the table the model maps (the partitioned one): each write of it invalidates
    the other model, through the partitioned table the flush writes."""
    engine = engine_with_children
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE OR REPLACE FUNCTION pt_note() RETURNS trigger AS $$ BEGIN "
            "UPDATE pt_ruled SET folded = NEW.email WHERE id = NEW.id; RETURN NEW; END $$ "
            "LANGUAGE plpgsql"
        )
        conn.exec_driver_sql(
            "CREATE TRIGGER pt_parted_low_note AFTER INSERT ON pt_parted_low "
            "FOR EACH ROW EXECUTE FUNCTION pt_note()"
        )
    with cache_on(engine, redis_url, prefix) as (cache, _):
        report = cache.models(engine)
        assert report[PtRuled].invalidated_by_writes_to == ("public.pt_parted",)
        assert report[PtRuled].written_by_triggers_of == ()  # acted on, not warned of
        assert report[PtParted].invalidated_by_writes_to == ()  # its own (and its partition's)
