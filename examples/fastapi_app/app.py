"""A FastAPI app whose products are served from the write-through cache, with asyncio.

Run it from the repository root (see README.md next to this file)::

    uvicorn --app-dir examples/fastapi_app app:app

The cache is built and installed in the app's lifespan, inside the event loop that serves the
requests: the ``redis.asyncio`` client it builds from the URL is bound to that loop
(docs/asyncio.md). The database is a SQLite file through aiosqlite unless ``DATABASE_URL``
says otherwise; Redis is ``$REDIS_URL`` or the local one. ``tests/test_examples.py`` drives
this app through FastAPI's test client.

The command-line tool reaches the same cache through :func:`cli_session`, since it runs no
lifespan (from this directory: ``sqlalchemy-writethrough --app 'app:cli_session()' stats``).

No ``from __future__ import annotations`` here: FastAPI reads the endpoints' annotations at
runtime, and ``SessionDep``, local to ``create_app``, could not be resolved from a string.
"""

import dataclasses
import decimal
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException
from pydantic import BaseModel
from sqlalchemy import Numeric, String
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from sqlalchemy_writethrough import CachedModel, WriteThroughCache


class Base(DeclarativeBase):
    pass


class Product(Base, CachedModel):
    __tablename__ = "fastapi_product"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    price: Mapped[decimal.Decimal] = mapped_column(Numeric(10, 2))

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "price": str(self.price)}


class NewProduct(BaseModel):
    id: int
    name: str
    price: decimal.Decimal


class ProductChange(BaseModel):
    name: str | None = None
    price: decimal.Decimal | None = None


def make_session(database_url: str | None = None) -> async_sessionmaker[AsyncSession]:
    """The app's session factory, on an engine of its own."""
    engine = create_async_engine(
        database_url or os.environ.get("DATABASE_URL", "sqlite+aiosqlite:///fastapi-example.db")
    )
    # expire_on_commit=False: after a commit the endpoint returns the object it holds,
    # instead of reloading it (an await the response serialisation cannot make).
    return async_sessionmaker(engine, expire_on_commit=False)


def make_cache(redis_url: str | None = None, prefix: str | None = None) -> WriteThroughCache:
    return WriteThroughCache(
        redis_url or os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
        prefix=prefix or os.environ.get("WRITETHROUGH_PREFIX", "fastapi-example"),
        ttl=3600,
    )


def cli_session() -> async_sessionmaker[AsyncSession]:
    """The session factory and its cache as the app builds them, for the command-line tool,
    which runs no lifespan::

        sqlalchemy-writethrough --app 'app:cli_session()' stats
    """
    Session = make_session()
    make_cache().install(Session)
    return Session


def create_app(
    database_url: str | None = None, redis_url: str | None = None, prefix: str | None = None
) -> FastAPI:
    """The app factory: an async engine and session factory now, the cache in the lifespan."""
    Session = make_session(database_url)
    engine = Session.kw["bind"]

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Inside the application's event loop: the redis.asyncio client is bound to it.
        cache = make_cache(redis_url, prefix)
        cache.install(Session)
        app.state.cache = cache
        async with engine.begin() as connection:
            await connection.run_sync(Base.metadata.create_all)
        try:
            yield
        finally:
            cache.uninstall(Session)
            await cache.aclose()  # the clients it built from the URL
            await engine.dispose()

    app = FastAPI(lifespan=lifespan)
    app.state.engine = engine

    async def session() -> AsyncIterator[AsyncSession]:
        # Leaving the block closes the session: anything not committed is rolled back, and
        # the cache puts back the entries the transaction had locked.
        async with Session() as s:
            yield s

    SessionDep = Annotated[AsyncSession, Depends(session)]

    async def product_or_404(s: AsyncSession, product_id: int) -> Product:
        product = await s.get(Product, product_id)  # Redis first, no SQL on a hit
        if product is None:
            raise HTTPException(404, "no such product")
        return product

    @app.post("/products", status_code=201)
    async def create_product(data: NewProduct, s: SessionDep) -> dict[str, Any]:
        product = Product(id=data.id, name=data.name, price=data.price)
        s.add(product)
        await s.commit()  # INSERT, COMMIT, then the row is in Redis
        return product.as_json()

    @app.get("/products/{product_id}")
    async def read_product(product_id: int, s: SessionDep) -> dict[str, Any]:
        return (await product_or_404(s, product_id)).as_json()

    @app.put("/products/{product_id}")
    async def update_product(product_id: int, data: ProductChange, s: SessionDep) -> dict[str, Any]:
        product = await product_or_404(s, product_id)
        if data.name is not None:
            product.name = data.name
        if data.price is not None:
            product.price = data.price
        await s.flush()  # the UPDATE is sent (and the entry locked) before the check
        if product.price <= 0:
            # Nothing is committed. Roll back now rather than leave it to the session's
            # close, so that Redis holds the previous entry again before the client hears 400.
            await s.rollback()
            raise HTTPException(400, "the price must be positive")
        await s.commit()  # COMMIT, then Redis holds the new row
        return product.as_json()

    @app.get("/cache")
    async def cache_stats() -> dict[str, Any]:
        return dataclasses.asdict(app.state.cache.stats())

    return app


app = create_app()
