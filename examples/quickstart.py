"""Quickstart: a cached catalogue in a SQLite file, with Redis as the write-through cache.

Run it from the repository root:

    python examples/quickstart.py

It uses the Redis at $REDIS_URL, or a local one on 127.0.0.1:6379, or starts a throwaway
`redis-server` if one is installed. Every step prints the SQL it sent, so you can see which
loads the cache served.
"""

from __future__ import annotations

import decimal
import os
import sys
import tempfile
from pathlib import Path

from sqlalchemy import ForeignKey, Numeric, String, create_engine, event, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, sessionmaker

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sqlalchemy_writethrough import CachedModel, WriteThroughCache, from_cache

from _redis import redis_url_or_start


class Base(DeclarativeBase):
    pass


class Category(Base, CachedModel):
    __tablename__ = "category"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))


class Product(Base, CachedModel):
    __tablename__ = "product"
    __writethrough__ = {"ttl": 600}  # per-model options override the cache's

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    price: Mapped[decimal.Decimal] = mapped_column(Numeric(10, 2))
    category_id: Mapped[int] = mapped_column(ForeignKey("category.id"))
    category: Mapped[Category] = relationship()


def main() -> None:
    database = os.environ.get(
        "DATABASE_URL", f"sqlite:///{Path(tempfile.gettempdir()) / 'writethrough-quickstart.db'}"
    )
    engine = create_engine(database)
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)

    sent: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda *args: sent.append(args[2]))

    def step(title: str) -> None:
        print(f"  -> {len(sent)} SQL statement(s): {title}")
        sent.clear()

    redis_url = redis_url_or_start()
    cache = WriteThroughCache(redis_url, prefix="quickstart", ttl=3600)
    Session = sessionmaker(engine)
    cache.install(Session)
    cache.invalidate(Product)  # start from an empty cache, whatever an earlier run left
    cache.invalidate(Category)
    print(f"database {database}\nredis    {redis_url}\n")

    with Session() as session:
        books = Category(id=1, name="Books")
        session.add_all(
            [
                books,
                Product(
                    id=42, name="SQL Antipatterns", price=decimal.Decimal("31.50"), category=books
                ),
            ]
        )
        session.commit()
    step("insert and commit: the new rows are now in Redis too")

    with Session() as session:
        product = session.get(Product, 42)
        assert product is not None
        print(f"  {product.name}: {product.price} in {product.category.name}")
    step("session.get() and the many-to-one lazy load, both served from Redis")

    with Session() as session:
        product = session.execute(
            select(Product).where(Product.id == 42).options(from_cache())
        ).scalar_one()
        product.price = decimal.Decimal("29.90")
        session.commit()
    step("select() with from_cache() from Redis, then an UPDATE and commit")

    with Session() as session:
        product = session.get(Product, 42)
        assert product is not None and product.price == decimal.Decimal("29.90")
        product.price = decimal.Decimal("1.00")
        session.flush()
        session.rollback()
    step("an update flushed and rolled back")

    with Session() as session:
        product = session.get(Product, 42)
        assert product is not None
        print(f"  after the rollback Redis still serves {product.price}")
    step("session.get() after the rollback: the previous value, from Redis")

    print(f"\n{cache.stats()}")


if __name__ == "__main__":
    main()
