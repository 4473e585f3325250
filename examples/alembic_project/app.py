"""The example application: a cached product model, and two commands.

python app.py seed        insert three products (needs revision 0001)
python app.py show 1      print product 1 and whether Redis served it
"""

from __future__ import annotations

import os
import sys

from sqlalchemy import Integer, String, create_engine, event
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from sqlalchemy_writethrough import CachedModel, WriteThroughCache

HERE = os.path.dirname(os.path.abspath(__file__))
DATABASE_URL = os.environ.get("DATABASE_URL", f"sqlite:///{HERE}/example.db")
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
PREFIX = os.environ.get("WRITETHROUGH_PREFIX", "alembic-example")


class Base(DeclarativeBase):
    pass


class Product(Base, CachedModel):
    __tablename__ = "alembic_demo_product"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    price_cents: Mapped[int] = mapped_column(Integer)


engine = create_engine(DATABASE_URL)
cache = WriteThroughCache(REDIS_URL, prefix=PREFIX)
Session = sessionmaker(engine)
cache.install(Session)


def seed() -> None:
    with Session() as session:
        session.add_all(
            [
                Product(id=1, name="Teapot", price_cents=1500),
                Product(id=2, name="Kettle", price_cents=3200),
                Product(id=3, name="Mug", price_cents=450),
            ]
        )
        session.commit()


def show(product_id: int) -> None:
    statements: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda *args: statements.append(args[2]))
    with Session() as session:
        product = session.get(Product, product_id)
    source = "database" if statements else "Redis"
    if product is None:
        print(f"product {product_id}: not found ({source})")
    else:
        print(f"product {product.id}: {product.name} {product.price_cents} cents (from {source})")


if __name__ == "__main__":
    if sys.argv[1:] == ["seed"]:
        seed()
    elif len(sys.argv) == 3 and sys.argv[1] == "show":
        show(int(sys.argv[2]))
    else:
        sys.exit(__doc__)
