"""The benchmark's schema: one 8-column model and a 3-hop many-to-one chain, all cached.

``bench_item`` is the row every single-row, 100-row and commit benchmark reads or writes:
8 columns of mixed types (int primary key, short string, text, ``Numeric(10,2)``, bool,
``DateTime``, int, and a many-to-one foreign key to ``bench_category``). The lazy-load chain
is ``item.category.section.department``: three many-to-one hops over three small cached models.

Every table name starts with ``bench_`` so nothing else in the shared test database is touched.
The peers (``benchmarks/peers/``) map their own classes onto these same tables.
"""

from __future__ import annotations

import datetime as dt
import decimal

from sqlalchemy import (
    Boolean,
    DateTime,
    ForeignKey,
    Integer,
    Numeric,
    String,
    Text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from sqlalchemy_writethrough import CachedModel

TABLE_PREFIX = "bench_"
ITEM_TABLE = f"{TABLE_PREFIX}item"
CATEGORY_TABLE = f"{TABLE_PREFIX}category"
SECTION_TABLE = f"{TABLE_PREFIX}section"
DEPARTMENT_TABLE = f"{TABLE_PREFIX}department"


class Base(DeclarativeBase):
    pass


class Department(Base, CachedModel):
    __tablename__ = DEPARTMENT_TABLE

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(50))


class Section(Base, CachedModel):
    __tablename__ = SECTION_TABLE

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(50))
    department_id: Mapped[int] = mapped_column(ForeignKey(f"{DEPARTMENT_TABLE}.id"))
    department: Mapped[Department] = relationship(lazy="select")


class Category(Base, CachedModel):
    __tablename__ = CATEGORY_TABLE

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(50))
    section_id: Mapped[int] = mapped_column(ForeignKey(f"{SECTION_TABLE}.id"))
    section: Mapped[Section] = relationship(lazy="select")


class Item(Base, CachedModel):
    """The benchmarked row: 8 columns of mixed types and a many-to-one relationship."""

    __tablename__ = ITEM_TABLE

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(100))
    description: Mapped[str] = mapped_column(Text)
    price: Mapped[decimal.Decimal] = mapped_column(Numeric(10, 2))
    active: Mapped[bool] = mapped_column(Boolean)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime)
    quantity: Mapped[int] = mapped_column(Integer)
    category_id: Mapped[int] = mapped_column(ForeignKey(f"{CATEGORY_TABLE}.id"))
    category: Mapped[Category] = relationship(lazy="select")


#: The item's column attributes in table order (what a "bare" row is made of).
ITEM_COLUMNS = (
    "id",
    "name",
    "description",
    "price",
    "active",
    "created_at",
    "quantity",
    "category_id",
)
