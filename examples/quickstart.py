"""Quickstart: a cached catalogue in a SQLite file, with Redis as the write-through cache.

Run it from the repository root:

    python examples/quickstart.py

It uses the Redis at $REDIS_URL, or a local one on 127.0.0.1:6379, or starts a throwaway
`redis-server` if one is installed. Every step prints the SQL it sent and what the cache did
(from ``cache.stats()``), so you can see which loads Redis served. Point $REDIS_URL at a Redis
that does not answer to watch the cache step aside: every load then goes to the database and
nothing fails. $DATABASE_URL picks another database; $WRITETHROUGH_PREFIX another key prefix.
"""

from __future__ import annotations

import dataclasses
import decimal
import logging
import os
import sys
import tempfile
from pathlib import Path

from sqlalchemy import ForeignKey, Numeric, String, create_engine, event, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, sessionmaker

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sqlalchemy_writethrough import CachedModel, WriteThroughCache, from_cache

from _redis import redis_url_or_start, why_not_answering


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


def describe(change: dict[str, int]) -> str:
    """What the cache did in one step, in words, from the change of its counters."""
    said = []
    if change["hits"]:
        said.append(f"{change['hits']} load(s) served from Redis")
    if change["misses"]:
        filled = f", {change['fills']} written to Redis" if change["fills"] else ""
        said.append(f"{change['misses']} miss(es) loaded from the database{filled}")
    if change["publishes"]:
        said.append(f"{change['publishes']} committed row(s) written to Redis")
    if change["restores"]:
        said.append(f"{change['restores']} previous value(s) put back by the rollback")
    if change["invalidations"]:
        said.append(f"{change['invalidations']} entr(ies) left as a miss")
    if change["errors"]:
        said.append(
            f"{change['errors']} Redis call(s) failed or skipped: the database served "
            "everything, nothing was cached"
        )
    return "; ".join(said) or "nothing"


def main() -> None:
    # the cache's warnings (Redis failing, the breaker opening) among the example's own lines
    logging.basicConfig(level=logging.WARNING, format="    log   %(message)s", stream=sys.stdout)
    database = os.environ.get(
        "DATABASE_URL", f"sqlite:///{Path(tempfile.gettempdir()) / 'writethrough-quickstart.db'}"
    )
    engine = create_engine(database)
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)

    redis_url = redis_url_or_start()
    print(f"database {engine.url.render_as_string(hide_password=True)}\nredis    {redis_url}")
    problem = why_not_answering(redis_url)
    if problem:
        print(
            f"\nRedis at {redis_url} does not answer ({problem}).\nThe example goes on "
            "without it: the cache steps aside, every load goes to the database, and no "
            "operation fails. Watch the lines below say so."
        )
    cache = WriteThroughCache(
        redis_url, prefix=os.environ.get("WRITETHROUGH_PREFIX", "quickstart"), ttl=3600
    )
    Session = sessionmaker(engine)
    cache.install(Session)
    if not problem:
        cache.clear()  # start from an empty cache, whatever an earlier run left
    print()

    sent: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda *args: sent.append(args[2]))
    before = cache.stats()
    seen: list[str] = []

    def step(title: str) -> None:
        """Print what the step just run sent to the database and what the cache did."""
        nonlocal before
        now = cache.stats()
        change = {  # the event counters (not the latencies, rates or per-model figures)
            f.name: getattr(now, f.name) - getattr(before, f.name)
            for f in dataclasses.fields(now)
            if type(getattr(now, f.name)) is int
        }
        print(title)
        for statement in sent:
            line = " ".join(statement.split())
            print(f"    SQL   {line[:88] + '...' if len(line) > 91 else line}")
        if not sent:
            print("    SQL   none")
        print(f"    cache {describe(change)}")
        for line in seen:
            print(f"    got   {line}")
        sent.clear()
        seen.clear()
        before = now

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
    step("1. insert two rows and commit")

    with Session() as session:
        product = session.get(Product, 42)
        assert product is not None
        seen.append(f"{product.name}: {product.price} in {product.category.name}")
    step("2. session.get() and the many-to-one lazy load")

    with Session() as session:
        product = session.execute(
            select(Product).where(Product.id == 42).options(from_cache())
        ).scalar_one()
        product.price = decimal.Decimal("29.90")
        session.commit()
    step("3. select() with from_cache(), then an UPDATE and commit")

    with Session() as session:
        product = session.get(Product, 42)
        assert product is not None and product.price == decimal.Decimal("29.90")
        product.price = decimal.Decimal("1.00")
        session.flush()
        session.rollback()
    step("4. an update flushed, then rolled back")

    with Session() as session:
        product = session.get(Product, 42)
        assert product is not None and product.price == decimal.Decimal("29.90")
        seen.append(f"{product.price} (the committed price, not the rolled-back 1.00)")
    step("5. session.get() after the rollback")

    stats = cache.stats()  # a typed snapshot: see `sqlalchemy-writethrough stats` for all of it
    print(
        f"\nin all: {stats.hits} hits, {stats.misses} misses, {stats.publishes} rows written "
        f"through, {stats.restores} restored, {stats.errors} Redis errors"
    )


if __name__ == "__main__":
    main()
