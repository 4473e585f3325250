"""The models the stress workers read and write.

Every row carries ``counter``, written only as ``next_value(previous)``: the upper bits are a
sequence number one above the previous committed value's, the low 24 bits a random tag. So the
committed values of one row are strictly increasing in commit order, and every value ever
written (committed, rolled back or lost with a killed worker) is, with overwhelming probability,
unique: a reader that sees a value can be matched to the one write that produced it.
"""

from __future__ import annotations

import random

from sqlalchemy import BigInteger, ForeignKey, MetaData
from sqlalchemy.engine import Engine
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
