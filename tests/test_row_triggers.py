"""A trigger that changes the row being written (``BEFORE INSERT OR UPDATE``), as
docs/write-paths.md says to declare it:

- a column the trigger fills, which the flush does not send, declared as SQLAlchemy asks
  (``server_default=FetchedValue()``, ``server_onupdate=FetchedValue()``): the flush expires it,
  so the commit leaves a miss and the next get loads what the trigger stored; with
  ``eager_defaults=True`` the flush reads it back and it is written through;
- a value the flush sends and the trigger changes (``NEW.email = lower(NEW.email)``): nothing
  tells the ORM, so the model is given ``strategy="invalidate"``.

What is observed: what a get returns, against a load without the cache.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import FetchedValue, String
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from sqlalchemy_writethrough import CachedModel, WriteThroughCache

from _servers import capture_sql, reset_schema

pytestmark = pytest.mark.databases("postgresql", "mariadb")


class Base(DeclarativeBase):
    pass


class TgStamped(Base, CachedModel):
    __tablename__ = "tg_stamped"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    email: Mapped[str] = mapped_column(String(60))
    # what the trigger writes: lower(email)
    folded: Mapped[str] = mapped_column(
        String(60), server_default=FetchedValue(), server_onupdate=FetchedValue()
    )


class TgEagerStamped(Base, CachedModel):
    __tablename__ = "tg_eager_stamped"
    __mapper_args__ = {"eager_defaults": True}
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    email: Mapped[str] = mapped_column(String(60))
    folded: Mapped[str] = mapped_column(
        String(60), server_default=FetchedValue(), server_onupdate=FetchedValue()
    )


class TgNormalised(Base, CachedModel):
    __tablename__ = "tg_normalised"
    __writethrough__ = {"strategy": "invalidate"}  # the trigger rewrites what the flush sent
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    email: Mapped[str] = mapped_column(String(60))
    folded: Mapped[str | None] = mapped_column(String(60))


TRIGGERS = {  # table -> what the trigger sets
    "tg_stamped": ("folded", "lower(NEW.email)"),
    "tg_eager_stamped": ("folded", "lower(NEW.email)"),
    "tg_normalised": ("email", "lower(NEW.email)"),
}


def _create_triggers(engine: Engine) -> None:
    with engine.begin() as conn:
        for table, (column, value) in TRIGGERS.items():
            if conn.dialect.name == "postgresql":
                conn.exec_driver_sql(
                    f"CREATE OR REPLACE FUNCTION {table}_fn() RETURNS trigger AS $$ "
                    f"BEGIN NEW.{column} := {value}; RETURN NEW; END $$ LANGUAGE plpgsql"
                )
                conn.exec_driver_sql(f"DROP TRIGGER IF EXISTS {table}_tg ON {table}")
                conn.exec_driver_sql(
                    f"CREATE TRIGGER {table}_tg BEFORE INSERT OR UPDATE ON {table} "
                    f"FOR EACH ROW EXECUTE FUNCTION {table}_fn()"
                )
            else:
                for when in ("INSERT", "UPDATE"):
                    name = f"{table}_{when.lower()}"
                    conn.exec_driver_sql(f"DROP TRIGGER IF EXISTS {name}")
                    conn.exec_driver_sql(
                        f"CREATE TRIGGER {name} BEFORE {when} ON {table} "
                        f"FOR EACH ROW SET NEW.{column} = {value}"
                    )


@pytest.fixture
def factory(engine: Engine, redis_url: str, prefix: str) -> Iterator[sessionmaker[Session]]:
    reset_schema(engine, Base.metadata)
    _create_triggers(engine)
    cache = WriteThroughCache(redis_url, prefix=prefix, stats_interval=None)
    made = sessionmaker(engine)
    cache.install(made)
    yield made
    cache.uninstall(made)
    cache.redis.close()


def _values(factory: sessionmaker[Session], model: type) -> tuple[tuple[str, str | None], int]:
    with factory() as session, capture_sql(session.get_bind()) as statements:
        row = session.get(model, 1)
        assert row is not None
        return (row.email, row.folded), len(statements)


@pytest.mark.parametrize("model", [TgStamped, TgEagerStamped, TgNormalised])
def test_a_declared_row_trigger_is_read_as_it_stored(
    factory: sessionmaker[Session], engine: Engine, model: type
) -> None:
    with factory() as session:
        session.add(model(id=1, email="Ann@Example.COM"))
        session.commit()
    first, _ = _values(factory, model)
    assert _values(factory, model) == (first, 0)  # filled or written through: a hit now
    with factory() as session:
        row = session.get(model, 1)
        assert row is not None
        row.email = "Bob@Example.COM"
        session.commit()
    values, statements = _values(factory, model)
    with Session(engine) as plain:
        fresh = plain.get(model, 1)
        assert fresh is not None
        assert values == (fresh.email, fresh.folded)
    assert "bob@example.com" in values
    if model is TgEagerStamped:
        assert statements == 0  # the flush read the trigger's value back: written through
