"""A Flask + Flask-SQLAlchemy app whose products are served from the write-through cache.

Run it from the repository root (after ``pip install . flask flask-sqlalchemy``)::

    flask --app examples/flask_app/app.py run

    curl -X POST localhost:5000/products -H 'content-type: application/json' \\
         -d '{"id": 1, "name": "Teapot", "price": "19.90"}'
    curl localhost:5000/products/1          # served from Redis: no SELECT
    curl -X PATCH localhost:5000/products/1 -H 'content-type: application/json' \\
         -d '{"price": "17.50"}'
    curl localhost:5000/cache               # what the cache did

The whole integration is ``cache.install(db.session)``: Flask-SQLAlchemy's scoped session gets
the cache's listeners, and every request's session uses it. The database is a SQLite file in
the app's instance folder unless ``$DATABASE_URL`` (or the ``SQLALCHEMY_DATABASE_URI`` given to
``create_app``) says otherwise; Redis is ``$REDIS_URL`` or the local one.
``tests/test_examples.py`` drives this app through Flask's test client, and the command-line
tool through :func:`cli_session` (from this directory: ``sqlalchemy-writethrough --app
'app:cli_session()' stats``).
"""

from __future__ import annotations

import dataclasses
import decimal
import os
from typing import Any

from flask import Flask, abort, request
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import Numeric, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from sqlalchemy_writethrough import CachedModel, WriteThroughCache


class Base(DeclarativeBase):
    pass


db = SQLAlchemy(model_class=Base)


class Product(db.Model, CachedModel):
    __tablename__ = "flask_product"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    price: Mapped[decimal.Decimal] = mapped_column(Numeric(10, 2))

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "price": str(self.price)}


def create_app(config: dict[str, Any] | None = None) -> Flask:
    """The app factory: Flask-SQLAlchemy, then the cache on its session."""
    app = Flask(__name__)
    app.config.from_mapping(
        SQLALCHEMY_DATABASE_URI=os.environ.get("DATABASE_URL", "sqlite:///flask-example.db"),
        REDIS_URL=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
        WRITETHROUGH_PREFIX=os.environ.get("WRITETHROUGH_PREFIX", "flask-example"),
    )
    app.config.from_mapping(config or {})
    db.init_app(app)

    cache = WriteThroughCache(
        app.config["REDIS_URL"], prefix=app.config["WRITETHROUGH_PREFIX"], ttl=3600
    )
    cache.install(db.session)  # the scoped_session every request uses
    app.extensions["writethrough"] = cache

    with app.app_context():
        db.create_all()

    @app.post("/products")
    def create_product() -> tuple[dict[str, Any], int]:
        data = request.get_json()
        product = Product(id=data["id"], name=data["name"], price=decimal.Decimal(data["price"]))
        db.session.add(product)
        db.session.commit()  # INSERT, COMMIT, then the row is in Redis
        return product.as_json(), 201

    @app.get("/products/<int:product_id>")
    def get_product(product_id: int) -> dict[str, Any]:
        product = db.session.get(Product, product_id)  # Redis first, no SQL on a hit
        if product is None:
            abort(404)
        return product.as_json()

    @app.patch("/products/<int:product_id>")
    def update_product(product_id: int) -> dict[str, Any]:
        product = db.get_or_404(Product, product_id)  # a session.get() too: served from Redis
        data = request.get_json()
        if "name" in data:
            product.name = data["name"]
        if "price" in data:
            product.price = decimal.Decimal(data["price"])
        db.session.flush()  # the UPDATE is sent (and the entry locked) before the check
        if product.price <= 0:
            # Nothing is committed: Flask-SQLAlchemy closes the session at the end of the
            # request, the transaction rolls back, and Redis gets the previous entry back.
            abort(400, description="the price must be positive")
        db.session.commit()
        return product.as_json()

    @app.get("/cache")
    def cache_stats() -> dict[str, Any]:
        return dataclasses.asdict(cache.stats())

    return app


def cli_session() -> WriteThroughCache:
    """The app's cache, installed on ``db.session``, for the command-line tool: the app built
    by its factory, with an application context pushed for the tool's whole run (as ``flask
    shell`` has one), since Flask-SQLAlchemy's session needs one::

        sqlalchemy-writethrough --app 'app:cli_session()' stats
    """
    app = create_app()
    app.app_context().push()
    cache: WriteThroughCache = app.extensions["writethrough"]
    return cache


if __name__ == "__main__":
    create_app().run()
