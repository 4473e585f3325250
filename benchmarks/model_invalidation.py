"""Whole-model invalidation at scale: ``cache.invalidate(Model)`` with a million cached rows.

    python -m benchmarks.model_invalidation --rows 1000000

Fills Redis with ``--rows`` real entries of a cached model (rows in a SQLite file, entries in
the cache's own format), then times ``cache.invalidate(Model)``, counts its Redis round trips
and commands, and reads a random sample of rows through a session to check that every one is a
miss served from the database with the right value. Uses the Redis at $REDIS_URL or
127.0.0.1:6379 and deletes its keys afterwards.
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
from pathlib import Path

import redis
from sqlalchemy import Integer, String, create_engine, event, insert, inspect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from sqlalchemy_writethrough import CachedModel, WriteThroughCache
from sqlalchemy_writethrough.protocol import Fetch


class Base(DeclarativeBase):
    pass


class Item(Base, CachedModel):
    __tablename__ = "bench_invalidation_item"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(40))
    qty: Mapped[int] = mapped_column(Integer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--sample", type=int, default=1000)
    args = parser.parse_args()
    url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    prefix = f"bench-inv-{os.getpid()}"
    client = redis.Redis.from_url(url, socket_timeout=30)
    cache = WriteThroughCache(client, prefix=prefix, stats_interval=None)
    with tempfile.TemporaryDirectory() as tmp:
        engine = create_engine(f"sqlite:///{Path(tmp) / 'items.db'}")
        Base.metadata.create_all(engine)
        try:
            run(engine, cache, client, args.rows, args.sample)
        finally:
            engine.dispose()
            for batch in _batches(client.scan_iter(match=f"{prefix}:*", count=10_000), 10_000):
                client.unlink(*batch)


def run(engine, cache, client, rows: int, sample: int) -> None:  # type: ignore[no-untyped-def]
    started = time.perf_counter()
    with engine.begin() as conn:
        for start in range(0, rows, 50_000):
            batch = [
                {"id": i, "name": f"item {i}", "qty": i % 97}
                for i in range(start, min(rows, start + 50_000))
            ]
            conn.execute(insert(Item), batch)
    print(f"{rows:,} rows in SQLite in {time.perf_counter() - started:.1f} s")

    layout = cache._layout_for(inspect(Item))
    keys = cache._keys(layout, engine)
    dialect = engine.dialect
    generations = {}
    for gen_key in keys.generation_keys():  # create each bucket's generation
        reply = cache._backend.fetch(f"{gen_key}:probe", gen_key, "", 1000)
        assert reply is not None and reply[0] is Fetch.MISS
        generations[gen_key] = client.get(gen_key)
    started = time.perf_counter()
    pipe = client.pipeline(transaction=False)
    for i in range(rows):
        values = {"id": i, "name": f"item {i}", "qty": i % 97}
        key, gen_key = keys.pair([i])
        payload = layout.encode_loaded(values, dialect)
        pipe.set(key, b"V" + generations[gen_key] + b":" + payload, px=3_600_000)
        if i % 10_000 == 9_999:
            pipe.execute()
    pipe.execute()
    print(f"{rows:,} entries written to Redis in {time.perf_counter() - started:.1f} s")

    factory = sessionmaker(engine)
    cache.install(factory)
    picks = random.sample(range(rows), min(sample, rows))
    with factory() as session:
        assert all(session.get(Item, i) is not None for i in picks[:50])
    assert cache.stats().hits == min(50, len(picks)), "entries are served before"

    before = client.info("commandstats")
    started = time.perf_counter_ns()
    assert cache.invalidate(Item)
    elapsed_ms = (time.perf_counter_ns() - started) / 1e6
    after = client.info("commandstats")
    evalsha = after.get("cmdstat_evalsha", {}).get("calls", 0) - before.get(
        "cmdstat_evalsha", {}
    ).get("calls", 0)
    print(
        f"cache.invalidate(Item) over {rows:,} cached rows: {elapsed_ms:.2f} ms, "
        f"{evalsha} script call(s), {len(keys.generation_keys())} keys written"
    )

    statements: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
    hits_before = cache.stats().hits
    with factory() as session:
        for i in picks:
            item = session.get(Item, i)
            assert item is not None and item.name == f"item {i}"
    assert cache.stats().hits == hits_before, "no invalidated entry is served"
    print(f"{len(picks):,} random reads afterwards: {len(statements):,} SQL, 0 served from Redis")


def _batches(iterable, size):  # type: ignore[no-untyped-def]
    batch = []
    for item in iterable:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


if __name__ == "__main__":
    main()
