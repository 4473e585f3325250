"""How long ``sqlalchemy-writethrough verify`` takes on a large model (docs/operations.md).

    python -m benchmarks.verify_scale --rows 1000000

Creates a table of ``--rows`` rows in a PostgreSQL schema of its own, starts a throwaway
``redis-server`` (never the shared one: a million entries take a few hundred MB), warms every
row through the cache (``admin.warm``, the fill protocol), then times ``admin.verify`` over
every entry and over a sample. Everything it made is dropped at the end. Bounded: it stops
with what it has after ``--max-seconds``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid

from sqlalchemy import String, create_engine, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from sqlalchemy_writethrough import CachedModel, WriteThroughCache, admin
from stress.redis_server import RedisServer


class Base(DeclarativeBase):
    pass


class VsItem(Base, CachedModel):
    __tablename__ = "vs_item"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(40))
    price: Mapped[int]
    stock: Mapped[int]


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.verify_scale")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--sample", type=int, default=10_000)
    parser.add_argument(
        "--postgresql-url",
        default=os.environ.get(
            "POSTGRESQL_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
        ),
    )
    args = parser.parse_args()
    schema = f"vs_{uuid.uuid4().hex[:8]}"
    engine = create_engine(
        args.postgresql_url, execution_options={"schema_translate_map": {None: schema}}
    )
    server = RedisServer()
    server.start()
    try:
        with engine.begin() as conn:
            conn.execute(text(f"CREATE SCHEMA {schema}"))
        Base.metadata.create_all(engine)
        t0 = time.perf_counter()
        with engine.begin() as conn:
            conn.execute(
                text(
                    f"INSERT INTO {schema}.vs_item (id, name, price, stock) "
                    "SELECT i, 'item ' || i, i % 1000, i % 7 FROM generate_series(1, :n) AS i"
                ),
                {"n": args.rows},
            )
        print(f"{args.rows:,} rows inserted in {time.perf_counter() - t0:.1f} s", flush=True)
        cache = WriteThroughCache(server.url, prefix="vs", stats_interval=None, socket_timeout=5)
        factory = sessionmaker(engine)
        cache.install(factory)
        layout = admin.find_model(cache, "VsItem")
        warmed = admin.warm(cache, factory, layout, batch_size=args.batch_size)
        print(
            f"warm: {warmed.rows:,} rows, {warmed.filled:,} filled in {warmed.seconds:.1f} s "
            f"({warmed.rate:,.0f} rows/s)",
            flush=True,
        )
        checked = admin.verify(cache, factory, layout, batch_size=args.batch_size)
        print(
            f"verify --all: {checked.checked:,} entries in {checked.seconds:.1f} s "
            f"({checked.checked / checked.seconds:,.0f}/s), {len(checked.mismatches)} mismatches",
            flush=True,
        )
        sampled = admin.verify(cache, factory, layout, sample=args.sample)
        print(
            f"verify --sample {args.sample}: {sampled.checked:,} entries in "
            f"{sampled.seconds:.1f} s",
            flush=True,
        )
        info = server.admin(timeout=5).info("memory")
        print(f"Redis used_memory: {info['used_memory_human']}", flush=True)
        with open("/proc/loadavg") as f:
            print(f"load average: {f.read().split()[:3]}")
        return 0
    finally:
        server.stop()
        with engine.begin() as conn:
            conn.execute(text(f"DROP SCHEMA IF EXISTS {schema} CASCADE"))
        engine.dispose()


if __name__ == "__main__":
    sys.exit(main())
