"""This library's asyncio flavour: ``AsyncSession`` on asyncpg with a ``redis.asyncio`` client.

Not a peer: the rows measure our own cache when installed on an ``async_sessionmaker``, against
the asyncio floor (``await`` a ``redis.asyncio`` GET of the same bytes, plus msgpack decoding)
and against the same ``await session.get`` on asyncpg without a cache. They ride on the peers'
mechanism (one event loop driven by the interleaved rounds, each operation timed inside its
coroutine) so that they run in the same rounds as every other row; ``--no-peers`` skips them.

The cache here shares the run's prefix with the sync one: the database is named by server, not
by driver, so the async sessions read the entries the sync warm-up wrote.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from time import perf_counter_ns
from typing import Any

import msgpack
import redis.asyncio
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

from sqlalchemy_writethrough import WriteThroughCache
from sqlalchemy_writethrough.protocol import payload_of

from ..harness import Variant
from ..models import Item
from . import PeerRows

NAME = "ours (asyncio)"


def _asyncpg(url: str) -> tuple[str, dict[str, Any]]:
    """The benchmark database through asyncpg: libpq's ``options=-csearch_path=...`` becomes
    asyncpg's ``server_settings``."""
    parsed = make_url(url)
    options = str(parsed.query.get("options") or "")
    settings = {}
    for part in options.split():
        if part.startswith("-csearch_path="):
            settings["search_path"] = part.split("=", 1)[1]
    query = {k: v for k, v in parsed.query.items() if k != "options"}
    async_url = parsed.set(drivername="postgresql+asyncpg", query=query)
    return async_url.render_as_string(hide_password=False), {"server_settings": settings}


def build(env: Any) -> PeerRows:
    loop = asyncio.new_event_loop()

    def run(coro: Coroutine[Any, Any, Any]) -> Any:
        return loop.run_until_complete(coro)

    url, connect_args = _asyncpg(env.database_url)
    engine = create_async_engine(url, connect_args=connect_args)
    client = redis.asyncio.Redis.from_url(env.settings.redis_url, socket_timeout=0.5)
    cache = WriteThroughCache(env.settings.redis_url, prefix=env.prefix)
    cached = async_sessionmaker(engine)
    # plain SQLAlchemy on an engine no cache watches (benchmarks/context.py says why)
    plain_engine = create_async_engine(url, connect_args=connect_args)
    plain = async_sessionmaker(plain_engine)
    cache.install(cached)
    # --baseline: the other version's cache on its own async_sessionmaker, reading the entries
    # the sync warm-up wrote under its prefix
    baseline_cache: Any = None
    baseline_cached: Any = None
    if env.baseline_cache is not None:
        from ..baseline import load
        from ..models import Base

        module = load(env.settings.baseline)
        baseline_cache = module.WriteThroughCache(
            env.settings.redis_url, prefix=f"{env.prefix}-baseline"
        )
        baseline_cache.register_all(Base)
        baseline_cached = async_sessionmaker(engine)
        baseline_cache.install(baseline_cached)

    def timed(read: Callable[[int], Coroutine[Any, Any, Any]]) -> Callable[[int], int]:
        async def once(pk: int) -> int:
            t0 = perf_counter_ns()
            await read(pk)
            return perf_counter_ns() - t0

        return lambda i: int(run(once(env.read_pk(i))))

    async def floor(pk: int) -> Any:
        raw = await client.get(env.floor_keys[pk])
        return msgpack.unpackb(payload_of(raw)[1:], raw=False)

    async def get_cached(pk: int) -> Any:
        async with cached() as s:
            return await s.get(Item, pk)

    async def get_plain(pk: int) -> Any:
        async with plain() as s:
            return await s.get(Item, pk)

    async def get_baseline(pk: int) -> Any:
        async with baseline_cached() as s:
            return await s.get(Item, pk)

    async def warm() -> None:
        for pk in env.read_pks:
            await get_cached(pk)
            if baseline_cached is not None:
                await get_baseline(pk)
            await get_plain(pk)
            await floor(pk)

    run(warm())

    def served_from_redis() -> str | None:
        before = cache.stats()
        run(get_cached(env.read_pk(0)))
        after = cache.stats()
        if after.hits != before.hits + 1:
            return "await session.get was not served from Redis"
        return None

    rows = {
        "pk": [
            Variant(
                "pk.async.floor",
                "asyncio floor: await redis.asyncio GET + msgpack.unpackb",
                NAME,
                timed(floor),
                note="the same bytes as the sync floor's key, through redis.asyncio",
            ),
            Variant(
                "pk.async.cached",
                "await session.get, our cache (warm), AsyncSession + redis.asyncio",
                NAME,
                timed(get_cached),
                note="new AsyncSession per operation, asyncpg",
                check=served_from_redis,
            ),
            Variant(
                "pk.async.postgresql",
                "await session.get, asyncpg, no cache",
                NAME,
                timed(get_plain),
                note="new AsyncSession per operation",
            ),
        ]
    }
    if baseline_cached is not None:
        rows["pk"].append(
            Variant(
                "pk.async.baseline",
                f"await session.get, our cache (warm), baseline ({env.baseline_name})",
                "baseline",
                timed(get_baseline),
                note="the same operation through the --baseline version of the library",
            )
        )

    def close() -> None:
        try:
            if baseline_cache is not None:
                run(baseline_cache.aclose())
            run(cache.aclose())
            run(client.aclose())
            run(engine.dispose())
            run(plain_engine.dispose())
        finally:
            loop.close()

    return PeerRows(
        name=NAME,
        rows=rows,
        capabilities=[
            "this library's asyncio flavour (not a peer): the cache installed on an "
            "async_sessionmaker, asyncpg and redis.asyncio, each operation timed inside its "
            "coroutine",
        ],
        close=close,
    )
