"""The models the stress workers read and write.

Every row carries ``counter``, written only as ``next_value(previous)``: the upper bits are a
sequence number one above the previous committed value's, the low 24 bits a random tag. So the
committed values of one row are strictly increasing in commit order, and every value ever
written (committed, rolled back or lost with a killed worker) is, with overwhelming probability,
unique: a reader that sees a value can be matched to the one write that produced it.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable
from typing import Any

from sqlalchemy import CHAR, BigInteger, ForeignKey, MetaData, String, TypeDecorator, Uuid
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Dialect, Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from sqlalchemy_writethrough import CachedModel

TAG_BITS = 24
#: the rank of "deleted": above every sequence number a run can reach
DELETED_RANK = 1 << 62

PARENT_TABLE = "stress_parent"
ITEM_TABLE = "stress_item"


class Base(DeclarativeBase):
    pass


class StParent(Base, CachedModel):
    __tablename__ = PARENT_TABLE

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    counter: Mapped[int] = mapped_column(BigInteger)


class StItem(Base, CachedModel):
    __tablename__ = ITEM_TABLE

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    counter: Mapped[int] = mapped_column(BigInteger)
    parent_id: Mapped[int] = mapped_column(ForeignKey(f"{PARENT_TABLE}.id"))
    parent: Mapped[StParent] = relationship(lazy="select")


MODELS: dict[str, type[StParent] | type[StItem]] = {PARENT_TABLE: StParent, ITEM_TABLE: StItem}

# -- the second model version (``--model-versions 2``: a rolling deploy) ----------------------
#
# The next release of the application maps the same tables with one more column, ``note``
# (nullable: the migration that added it ran first, so the tables have it while version A's
# processes still run). Distinct classes on their own declarative base (their own registry and
# metadata), so both versions can live in one process; their rows' keys differ (a model's
# digest covers its columns), so the two versions use two keyspaces of one prefix.

#: the column only version B maps; version A never reads or writes it, and the checker's reads
#: never need it (they compare ``counter``)
EXTRA_COLUMN = "note"


class BaseB(DeclarativeBase):
    pass


class StParentB(BaseB, CachedModel):
    __tablename__ = PARENT_TABLE

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    counter: Mapped[int] = mapped_column(BigInteger)
    note: Mapped[str | None] = mapped_column(String(64), nullable=True)


class StItemB(BaseB, CachedModel):
    __tablename__ = ITEM_TABLE

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    counter: Mapped[int] = mapped_column(BigInteger)
    parent_id: Mapped[int] = mapped_column(ForeignKey(f"{PARENT_TABLE}.id"))
    parent: Mapped[StParentB] = relationship(lazy="select")
    note: Mapped[str | None] = mapped_column(String(64), nullable=True)


MODELS_B: dict[str, type[StParentB] | type[StItemB]] = {
    PARENT_TABLE: StParentB,
    ITEM_TABLE: StItemB,
}
#: the models of each version, by its name in the histories (``mv``) and the worker's config
VERSIONS: dict[str, dict[str, Any]] = {"A": dict(MODELS), "B": dict(MODELS_B)}


# -- UUID primary keys (``--key-type uuid``) ---------------------------------------------------
#
# The same logical rows, keyed by ``Uuid`` columns (and a ``Uuid`` foreign key): with asyncpg,
# rows loaded by a query hold asyncpg's own UUID class (a ``uuid.UUID`` subclass) in their
# identity, which the write path once failed to take as a key of a Uuid column (stale reads).
# The harness keeps every id an int (histories, checker, hot lists); only the ORM boundary maps
# them, with the fixed bijection ``uuid.UUID(int=n)`` / ``u.int`` (:data:`KEY_TYPES`), which
# keeps their order (PostgreSQL compares uuids bytewise, big-endian), so id ranges still work.


class BaseU(DeclarativeBase):
    pass


class StParentU(BaseU, CachedModel):
    __tablename__ = PARENT_TABLE

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    counter: Mapped[int] = mapped_column(BigInteger)


class StItemU(BaseU, CachedModel):
    __tablename__ = ITEM_TABLE

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    counter: Mapped[int] = mapped_column(BigInteger)
    parent_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey(f"{PARENT_TABLE}.id"))
    parent: Mapped[StParentU] = relationship(lazy="select")


MODELS_U: dict[str, type[StParentU] | type[StItemU]] = {
    PARENT_TABLE: StParentU,
    ITEM_TABLE: StItemU,
}


# -- TypeDecorator primary keys (``--key-type guid``) ------------------------------------------
#
# The same rows keyed by the "backend-agnostic GUID" recipe (fastapi-users' key type): on
# PostgreSQL a ``UUID`` column bound as text, loaded as UUIDs (asyncpg's own class with
# asyncpg). The cache keys such a model by the values its type gives back unchanged.


class GUID(TypeDecorator[uuid.UUID]):
    impl = CHAR
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> Any:
        if dialect.name == "postgresql":
            return dialect.type_descriptor(postgresql.UUID())
        return dialect.type_descriptor(CHAR(36))

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        if value is None:
            return None
        return str(value if isinstance(value, uuid.UUID) else uuid.UUID(value))

    def process_result_value(self, value: Any, dialect: Dialect) -> Any:
        if value is None or isinstance(value, uuid.UUID):
            return value
        return uuid.UUID(value)


class BaseG(DeclarativeBase):
    pass


class StParentG(BaseG, CachedModel):
    __tablename__ = PARENT_TABLE

    id: Mapped[uuid.UUID] = mapped_column(GUID, primary_key=True)
    counter: Mapped[int] = mapped_column(BigInteger)


class StItemG(BaseG, CachedModel):
    __tablename__ = ITEM_TABLE

    id: Mapped[uuid.UUID] = mapped_column(GUID, primary_key=True)
    counter: Mapped[int] = mapped_column(BigInteger)
    parent_id: Mapped[uuid.UUID] = mapped_column(GUID, ForeignKey(f"{PARENT_TABLE}.id"))
    parent: Mapped[StParentG] = relationship(lazy="select")


MODELS_G: dict[str, type[StParentG] | type[StItemG]] = {
    PARENT_TABLE: StParentG,
    ITEM_TABLE: StItemG,
}


def _uuid_of(n: int) -> uuid.UUID:
    return uuid.UUID(int=n)


def _int_of_uuid(u: Any) -> int:
    return int(u.int)  # asyncpg's UUID class has .int too


def _same(n: Any) -> Any:
    return n


#: per key type: (its models by table, int id -> key, key -> int id)
KEY_TYPES: dict[str, tuple[dict[str, Any], Callable[[int], Any], Callable[[Any], int]]] = {
    "int": (dict(MODELS), _same, _same),
    "uuid": (dict(MODELS_U), _uuid_of, _int_of_uuid),
    "guid": (dict(MODELS_G), _uuid_of, _int_of_uuid),
}


def key_part_id(part: str, key_type: str = "int") -> int | None:
    """The int id of a key's primary-key part (``encode_pk_part``: an int's digits, a UUID's
    32 hex digits), None when it is not one of this key type."""
    if key_type != "int":  # a UUID's 32 hex digits
        if len(part) != 32:
            return None
        try:
            return int(part, 16)
        except ValueError:
            return None
    return int(part) if part.isdigit() else None


def metadata_of(model_versions: int, key_type: str = "int") -> MetaData:
    """The metadata the stress tables are created from: with a second model version, its
    (the tables with the extra column, which version A does not map); with UUID keys, the
    tables with Uuid keys."""
    if key_type == "uuid":
        return BaseU.metadata
    if key_type == "guid":
        return BaseG.metadata
    return BaseB.metadata if model_versions > 1 else Base.metadata


def rank(value: int) -> int:
    """The sequence number of a counter value (its place in the row's history)."""
    return value >> TAG_BITS


def next_value(previous: int, rng: random.Random) -> int:
    return ((rank(previous) + 1) << TAG_BITS) | rng.getrandbits(TAG_BITS)


def first_value(rng: random.Random) -> int:
    return (1 << TAG_BITS) | rng.getrandbits(TAG_BITS)


def reset_schema(engine: Engine, metadata: MetaData = Base.metadata) -> None:
    """Drop (leftovers of an earlier run included) and create the stress tables."""
    tables = list(reversed(metadata.sorted_tables))
    preparer = engine.dialect.identifier_preparer
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            for table in tables:
                conn.exec_driver_sql(f"DROP TABLE IF EXISTS {preparer.format_table(table)} CASCADE")
        elif conn.dialect.name in ("mysql", "mariadb"):
            conn.exec_driver_sql("SET FOREIGN_KEY_CHECKS = 0")
            try:
                for table in tables:
                    conn.exec_driver_sql(f"DROP TABLE IF EXISTS {preparer.format_table(table)}")
            finally:
                conn.exec_driver_sql("SET FOREIGN_KEY_CHECKS = 1")
        metadata.drop_all(conn, checkfirst=True)
        metadata.create_all(conn)


def create_tenant_schemas(
    engine: Engine, schemas: list[str], metadata: MetaData = Base.metadata
) -> None:
    """One schema per tenant holding the stress tables (on MariaDB, a schema is a database,
    beside the run's)."""
    preparer = engine.dialect.identifier_preparer
    with engine.begin() as conn:
        for schema in schemas:
            conn.exec_driver_sql(f"CREATE SCHEMA {preparer.quote_schema(schema)}")
            metadata.create_all(conn.execution_options(schema_translate_map={None: schema}))


def drop_tenant_schemas(engine: Engine, schemas: list[str]) -> None:
    """Drop the tenants' schemas and everything in them (those that exist)."""
    preparer = engine.dialect.identifier_preparer
    # MariaDB's DROP SCHEMA (a database) drops its tables and takes no CASCADE
    cascade = " CASCADE" if engine.dialect.name == "postgresql" else ""
    with engine.begin() as conn:
        for schema in schemas:
            conn.exec_driver_sql(f"DROP SCHEMA IF EXISTS {preparer.quote_schema(schema)}{cascade}")


# -- a trigger that rewrites the rows (``--rewriting-trigger``) ---------------------------------
#
# A ``BEFORE INSERT OR UPDATE`` row trigger on both stress tables flips the low bit of every
# ``counter`` written (:func:`stored_value`): the database stores another value than the flush
# sent, as a trigger stamping ``updated_at`` or normalising a column does. The rank (the upper
# bits) is kept, so a writer's ``next_value`` of what it read stays exact; the checker maps every
# write of the histories through :func:`stored_value`, so a read of the value the flush sent
# (a cache writing through what it was given) matches no write and fails the run.

#: the trigger's (and PostgreSQL's trigger function's) name
REWRITE_NAME = "stress_rewrite_counter"


def stored_value(written: int) -> int:
    """What the rewriting trigger stores for a ``counter`` written as ``written``."""
    return written ^ 1


def create_rewriting_triggers(
    engine: Engine, metadata: MetaData = Base.metadata, schema: str | None = None
) -> None:
    """Put the rewriting trigger on every stress table of ``metadata`` (in ``schema``, or the
    engine's default one). Created before the seed rows, which it rewrites too."""
    preparer = engine.dialect.identifier_preparer
    with engine.begin() as conn:
        owner = f"{preparer.quote_schema(schema)}." if schema else ""
        if conn.dialect.name == "postgresql":
            function = f"{owner}{REWRITE_NAME}"
            conn.exec_driver_sql(
                f"CREATE OR REPLACE FUNCTION {function}() RETURNS trigger AS $$ BEGIN "
                "IF TG_OP = 'INSERT' OR NEW.counter IS DISTINCT FROM OLD.counter THEN "
                "NEW.counter := NEW.counter # 1; END IF; RETURN NEW; END $$ LANGUAGE plpgsql"
            )
            for table in metadata.sorted_tables:
                conn.exec_driver_sql(
                    f"CREATE TRIGGER {REWRITE_NAME} BEFORE INSERT OR UPDATE ON "
                    f"{owner}{preparer.quote(table.name)} FOR EACH ROW EXECUTE FUNCTION "
                    f"{function}()"
                )
        elif conn.dialect.name in ("mysql", "mariadb"):
            for table in metadata.sorted_tables:
                name = f"{owner}{preparer.quote(table.name)}"
                conn.exec_driver_sql(
                    f"CREATE TRIGGER {owner}{REWRITE_NAME}_{table.name}_i BEFORE INSERT ON "
                    f"{name} FOR EACH ROW SET NEW.counter = NEW.counter ^ 1"
                )
                conn.exec_driver_sql(
                    f"CREATE TRIGGER {owner}{REWRITE_NAME}_{table.name}_u BEFORE UPDATE ON "
                    f"{name} FOR EACH ROW SET NEW.counter = "
                    "IF(NEW.counter <> OLD.counter, NEW.counter ^ 1, NEW.counter)"
                )
        else:
            raise ValueError(f"no rewriting trigger for {conn.dialect.name}")


# -- a trigger that writes other rows of its own table (``--sibling-trigger``) -----------------
#
# An ``AFTER INSERT OR UPDATE OF counter`` row trigger on the item table copies every hot
# item's ``counter`` into that item's *shadow*: another row of the same table, id
# :data:`SHADOW_OFFSET` above, which no worker writes and every worker reads. The flush (or the
# statement) writes the hot item; the shadow changes behind the ORM's back. The cache must find
# the trigger in the catalog and invalidate the item model whole at every write; the checker
# adds to every write of a hot item the same write of its shadow (:func:`shadow_of`), so a
# read of a shadow's entry left behind is ``stale``. PostgreSQL only: MySQL and MariaDB refuse a
# trigger that writes its own table.

#: the trigger's (and its function's) name
SIBLING_NAME = "stress_shadow_counter"
#: ``--sibling-trigger other``: the shadows are rows of another cached table, with the hot
#: items' ids (:class:`StShadow`): the trigger writes a table its own is not
SHADOW_TABLE = "stress_shadow"
#: a shadow's id is its hot item's plus this: above every hot and baseline id, below every
#: id a worker inserts (:func:`stress.worker.extra_id`)
SHADOW_OFFSET = 500_000
#: the ids the trigger copies (the hot items; the baseline's are 101 and up)
SHADOWED_BELOW = 100


class StShadow(Base, CachedModel):
    """A hot item's shadow in a table of its own (``--sibling-trigger other``)."""

    __tablename__ = SHADOW_TABLE

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    counter: Mapped[int] = mapped_column(BigInteger)


def shadow_of(table: str, id_: int) -> tuple[str, int] | None:
    """The shadow row (table, id) the sibling trigger writes when row ``id_`` of ``table``
    is written: in the item table itself."""
    if table == ITEM_TABLE and 0 < id_ < SHADOWED_BELOW:
        return ITEM_TABLE, id_ + SHADOW_OFFSET
    return None


def shadow_elsewhere(table: str, id_: int) -> tuple[str, int] | None:
    """The same, with ``--sibling-trigger other``: the row of :class:`StShadow` of that id."""
    if table == ITEM_TABLE and 0 < id_ < SHADOWED_BELOW:
        return SHADOW_TABLE, id_
    return None


#: ``--sibling-trigger``'s modes: where the shadows are
SHADOWS: dict[str, Callable[[str, int], tuple[str, int] | None]] = {
    "own": shadow_of,
    "other": shadow_elsewhere,
}


def create_sibling_trigger(engine: Engine, mode: str = "own") -> None:
    """Put the sibling trigger on the item table (PostgreSQL), writing the shadows where
    ``mode`` keeps them (:data:`SHADOWS`). Created after the seed rows, shadows included
    (:func:`stress.runner.seed_rows`)."""
    target = (
        f"{ITEM_TABLE} SET counter = NEW.counter WHERE id = NEW.id + {SHADOW_OFFSET}"
        if mode == "own"
        else f"{SHADOW_TABLE} SET counter = NEW.counter WHERE id = NEW.id"
    )
    with engine.begin() as conn:
        if conn.dialect.name != "postgresql":
            raise ValueError(f"no sibling trigger for {conn.dialect.name}")
        conn.exec_driver_sql(
            f"CREATE OR REPLACE FUNCTION {SIBLING_NAME}() RETURNS trigger AS $$ BEGIN "
            f"UPDATE {target}; RETURN NULL; END $$ LANGUAGE plpgsql"
        )
        conn.exec_driver_sql(
            f"CREATE TRIGGER {SIBLING_NAME} AFTER INSERT OR UPDATE OF counter ON {ITEM_TABLE} "
            f"FOR EACH ROW WHEN (NEW.id > 0 AND NEW.id < {SHADOWED_BELOW}) "
            f"EXECUTE FUNCTION {SIBLING_NAME}()"
        )
