"""What ``cache.stats()`` says, per model and in total, after real reads and writes; the same
counters summed over processes through Redis; and the exporters, read the way Prometheus and
an OpenTelemetry pipeline read them.

Latencies are only counted here (how many were measured, that percentiles exist and are
ordered), never compared with a time.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import redis.asyncio
import redis.connection
from _flavours import async_url
from sqlalchemy import String, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from sqlalchemy_writethrough import CachedModel, ConfigurationError, WriteThroughCache
from sqlalchemy_writethrough.shared import read_shared
from sqlalchemy_writethrough.stats import BOUNDS, Counters, Latency, recommend
from sqlalchemy_writethrough.testing import assert_no_sql, assert_served_from_cache

from _servers import delete_prefix, new_prefix, reset_schema


class Base(DeclarativeBase):
    pass


class StItem(Base, CachedModel):
    __tablename__ = "st_item"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(40))


class StLog(Base, CachedModel):
    __tablename__ = "st_log"
    __writethrough__ = {"strategy": "invalidate"}
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    text: Mapped[str] = mapped_column(String(40))


@pytest.fixture
def factory(engine: Engine) -> sessionmaker[Session]:
    reset_schema(engine, Base.metadata)
    with Session(engine) as s:
        s.add_all([StItem(id=i, name=f"item {i}") for i in range(1, 6)])
        s.add_all([StLog(id=i, text=f"log {i}") for i in range(1, 3)])
        s.commit()
    return sessionmaker(engine)


@pytest.fixture
def cache(
    redis_url: str, prefix: str, factory: sessionmaker[Session]
) -> Iterator[WriteThroughCache]:
    made = WriteThroughCache(redis_url, prefix=prefix, stats_interval=None)
    made.install(factory)
    yield made
    made.uninstall(factory)


# -- the histogram and the rule, on their own ------------------------------------------------


def test_percentiles_come_from_fixed_buckets_within_one_bucket() -> None:
    counters = Counters()
    for _ in range(90):
        counters.observe("read", 0.001)
    for _ in range(10):
        counters.observe("read", 0.1)
    latency = counters.snapshot().read_latency
    assert latency.count == 100 and latency.total == pytest.approx(90 * 0.001 + 10 * 0.1)
    step = 10**0.1  # one bucket
    assert 0.001 / step <= latency.p50 <= 0.001 * step  # type: ignore[operator]
    assert 0.1 / step <= latency.p95 <= 0.1 * step  # type: ignore[operator]
    assert latency.p50 <= latency.p95 <= latency.p99  # type: ignore[operator]
    assert Latency().p99 is None
    assert len(latency.buckets) == len(BOUNDS) + 1


def test_the_decision_rule() -> None:
    assert recommend(5, 5).strategy == "not enough data"
    assert recommend(1000, 0).strategy == "write-through"
    assert recommend(1100, 100).strategy == "write-through"
    assert recommend(500, 100).strategy == "invalidate"
    assert recommend(50, 100).strategy == "do not cache"
    assert "read:write 5.0:1" in recommend(500, 100).reason


# -- a real cache ----------------------------------------------------------------------------


def test_reads_and_writes_are_counted_per_model(
    cache: WriteThroughCache, factory: sessionmaker[Session], engine: Engine
) -> None:
    for i in range(1, 4):
        with factory() as s:  # a transaction's first read is fresh enough to fill anywhere
            s.get(StItem, i)  # 3 misses, 3 fills
    with factory() as s, assert_served_from_cache(cache, hits=3), assert_no_sql(engine):
        for i in range(1, 4):
            s.get(StItem, i)
    with factory() as s:
        s.get(StItem, 1).name = "changed"  # a hit, then a write
        s.get(StLog, 1).text = "changed"  # a miss, then a write left as a miss
        s.commit()
    with factory() as s:
        s.get(StItem, 2).name = "rolled back"
        s.flush()
        s.rollback()

    stats = cache.stats()
    item = stats.models["StItem"]
    assert (item.hits, item.misses, item.fills) == (5, 3, 3)
    assert (item.writes, item.publishes, item.restores) == (1, 1, 1)
    assert item.hit_rate == pytest.approx(5 / 8)
    assert item.read_write_ratio == pytest.approx(8 / 1)
    log = stats.models["StLog"]
    assert (log.hits, log.misses, log.writes, log.publishes) == (0, 1, 1, 0)
    assert log.invalidations_by_reason == {"strategy": 1}
    assert (stats.hits, stats.misses) == (5, 4)
    assert (stats.commits, stats.rollbacks, stats.commit_failures) == (1, 1, 0)
    assert stats.rollback_frequency == 0.5
    assert stats.database_write_success_rate == 1.0
    assert stats.cache_write_success_rate == 1.0
    assert stats.read_latency.count == 9  # every read that asked Redis
    assert stats.commit_latency.count == 1 and stats.commit_cache_latency.count == 1
    assert stats.recommendations()["StItem"].strategy == "not enough data"

    cache.stats(reset=True)
    assert cache.stats().models == {} and cache.stats().read_latency.count == 0


def test_invalidations_are_counted_by_reason(
    cache: WriteThroughCache, factory: sessionmaker[Session]
) -> None:
    with factory() as s:
        s.execute(update(StItem).where(StItem.id == 1).values(name="by statement"))
        s.commit()
    cache.invalidate(StItem, 2)
    cache.invalidate(StItem)
    by_reason = cache.stats().models["StItem"].invalidations_by_reason
    assert by_reason == {"statement": 1, "manual": 1, "model": 1}
    assert cache.stats().invalidations_by_reason == by_reason


def test_a_read_that_finds_a_writers_lock_is_counted(
    cache: WriteThroughCache, factory: sessionmaker[Session], db_name: str
) -> None:
    if db_name == "sqlite":
        pytest.skip("SQLite lets one writer hold the file: the reader would wait on it")
    with factory() as writer:
        writer.get(StItem, 1).name = "in flight"
        writer.flush()  # locked in Redis, not committed
        with factory() as reader:
            assert reader.get(StItem, 1).name == "item 1"
        writer.rollback()
    assert cache.stats().models["StItem"].locked_reads == 1


def test_a_commit_the_database_refuses_is_counted(
    cache: WriteThroughCache, factory: sessionmaker[Session]
) -> None:
    with factory() as s:
        s.get(StItem, 1).name = "fine"
        s.add(StItem(id=2, name="duplicate key"))
        with pytest.raises(IntegrityError):
            s.commit()
    stats = cache.stats()
    assert (stats.commits, stats.commit_failures, stats.rollbacks) == (0, 1, 1)
    assert stats.database_write_success_rate == 0.0


def test_redis_errors_by_kind_breaker_openings_and_state(
    factory: sessionmaker[Session], prefix: str
) -> None:
    cache = WriteThroughCache(
        "redis://127.0.0.1:1/0", prefix=prefix, stats_interval=None, breaker_cooldown=60
    )
    cache.install(factory)
    try:
        with factory() as s:
            for i in range(1, 6):
                assert s.get(StItem, i) is not None
        stats = cache.stats()
        assert stats.errors_by_kind.get("ConnectionError", 0) >= 3
        assert stats.errors_by_kind.get("breaker", 0) >= 1
        assert stats.errors == sum(stats.errors_by_kind.values())
        assert stats.breaker_openings == 1 and stats.breaker_open is True
    finally:
        cache.uninstall(factory)
        cache._backend.breaker.stop()


# -- every process, through Redis -------------------------------------------------------------


def test_shared_stats_add_up_every_process(
    redis_url: str, prefix: str, factory: sessionmaker[Session], engine: Engine
) -> None:
    other_factory = sessionmaker(engine)
    one = WriteThroughCache(redis_url, prefix=prefix, stats_interval=3600)
    two = WriteThroughCache(redis_url, prefix=prefix, stats_interval=3600)
    one.install(factory)
    two.install(other_factory)
    try:
        for maker in (factory, other_factory, factory):
            with maker() as s:
                s.get(StItem, 1)
        assert one.send_stats() and two.send_stats()
        assert one.send_stats()  # nothing new: nothing counted twice
        shared = two.shared_stats()
        assert (shared.hits, shared.misses) == (2, 1)
        assert shared.models["StItem"].hits == 2
        assert shared.read_latency.count == 3
        assert two.shared_stats() == shared
    finally:
        one.uninstall(factory)
        two.uninstall(other_factory)


#: a short-lived process: a sync cache, an async-only cache (a redis.asyncio client, used in
#: a loop that has ended by the exit) and a cache whose Redis is gone; none closes its cache
SHORT_LIVED = textwrap.dedent(
    """
    import asyncio, os, sys
    import redis.asyncio
    from sqlalchemy import String, create_engine
    from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
    from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker
    from sqlalchemy_writethrough import CachedModel, ConfigurationError, WriteThroughCache

    class Base(DeclarativeBase):
        pass

    class StItem(Base, CachedModel):
        __tablename__ = "st_item"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        name: Mapped[str] = mapped_column(String(40))

    sync_prefix, async_prefix, gone_prefix = sys.argv[1:4]
    Session = sessionmaker(create_engine(os.environ["WT_DB_URL"]))
    WriteThroughCache(os.environ["WT_REDIS_URL"], prefix=sync_prefix, stats_interval=3600).install(
        Session
    )
    for _ in range(3):
        with Session() as s:
            s.get(StItem, 1)

    Gone = sessionmaker(create_engine(os.environ["WT_DB_URL"]))
    WriteThroughCache("redis://127.0.0.1:1/0", prefix=gone_prefix, stats_interval=3600).install(
        Gone
    )
    with Gone() as s:
        s.get(StItem, 1)  # one failure: the breaker is still closed at the exit

    client = redis.asyncio.Redis.from_url(os.environ["WT_REDIS_URL"], socket_timeout=5)
    acache = WriteThroughCache(client, prefix=async_prefix, stats_interval=3600)

    async def reads():
        engine = create_async_engine(os.environ["WT_ASYNC_DB_URL"])
        maker = async_sessionmaker(engine)
        acache.install(maker)
        for _ in range(2):
            async with maker() as s:
                await s.get(StItem, 2)
        await engine.dispose()
        # (redis-py 5.0 prints a traceback at exit for a client left open after its loop
        # ended, cache or no cache; closed, it reconnects for the cache's last send)
        await client.aclose()

    asyncio.run(reads())
    """
)


@pytest.mark.databases("sqlite")
def test_a_short_lived_process_sends_its_counts_when_it_exits(
    factory: sessionmaker[Session], engine: Engine, redis_url: str, redis_client: redis.Redis
) -> None:
    """Nothing closes the caches and the interval never comes: the atexit hook sends what
    each cache counted (an async-only one on a loop of its own, its own having ended), and
    a Redis that is gone neither fails the exit nor keeps the others from sending."""
    prefixes = [new_prefix() for _ in range(3)]
    url = engine.url.render_as_string(hide_password=False)
    env = {
        **os.environ,
        "WT_DB_URL": url,
        "WT_ASYNC_DB_URL": async_url(url),
        "WT_REDIS_URL": redis_url,
    }
    try:
        done = subprocess.run(
            [sys.executable, "-c", SHORT_LIVED, *prefixes],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        assert "Traceback" not in done.stderr
        sync_prefix, async_prefix, _ = prefixes
        sent = redis_client.hgetall(f"{sync_prefix}:stats")
        assert (sent[b"c|StItem|misses"], sent[b"c|StItem|hits"]) == (b"1", b"2")
        sent = redis_client.hgetall(f"{async_prefix}:stats")
        assert (sent[b"c|StItem|misses"], sent[b"c|StItem|hits"]) == (b"1", b"1")
        for prefix in (sync_prefix, async_prefix):
            assert len(redis_client.hgetall(f"{prefix}:stats:processes")) == 1
            # its last send says it exited: listed so, not as a live process
            assert [p.get("exited") for p in read_shared(redis_client, prefix)[1]] == [True]
    finally:
        for prefix in prefixes:
            delete_prefix(redis_client, prefix)  # the stats, the epoch, the registry


@pytest.mark.databases("sqlite")
def test_close_sends_what_is_left_once(
    factory: sessionmaker[Session], prefix: str, redis_url: str
) -> None:
    cache = WriteThroughCache(redis_url, prefix=prefix, stats_interval=3600)
    cache.install(factory)
    try:
        for i in (1, 2):
            with factory() as s:
                s.get(StItem, i)
        cache.close()
        cache.close()  # nothing twice
    finally:
        cache.uninstall(factory)
    reader = WriteThroughCache(redis_url, prefix=prefix, stats_interval=None)
    shared = reader.shared_stats()
    assert (shared.misses, shared.fills) == (2, 2)
    reader.redis.close()


@pytest.mark.databases("sqlite")
def test_close_with_a_stalled_redis_gives_up_after_the_socket_timeout(
    factory: sessionmaker[Session], prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A Redis that accepts connections and never answers: close() tries the last send once,
    gives up when the socket timeout passes, and neither raises nor hangs."""
    stalled = socket.socket()
    stalled.bind(("127.0.0.1", 0))
    stalled.listen(16)  # connections complete in the backlog; nothing ever reads them
    port = stalled.getsockname()[1]
    try:
        cache = WriteThroughCache(
            f"redis://127.0.0.1:{port}/0",
            prefix=prefix,
            stats_interval=3600,
            socket_timeout=0.2,
            breaker_threshold=100,  # closed at the end: the send is tried
        )
        cache.install(factory)
        with factory() as s:
            assert s.get(StItem, 1) is not None  # from the database, Redis timing out
        assert not cache.stats().breaker_open and cache.stats().misses + cache.stats().errors
        with caplog.at_level(logging.WARNING, logger="sqlalchemy_writethrough"):
            cache.close()
        assert any("could not send the stats" in r.getMessage() for r in caplog.records)
        cache.uninstall(factory)
    finally:
        stalled.close()


@pytest.mark.databases("sqlite")
def test_an_async_only_cache_sends_from_its_event_loop(
    factory: sessionmaker[Session],
    engine: Engine,
    prefix: str,
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A cache given only a redis.asyncio client: the background thread schedules each send
    as a task on the loop the client's connections use, and never opens a sync connection;
    aclose() awaits the last one."""
    from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

    sync_connections: list[object] = []
    # redis-py 5.0 has no connect_check_health: there connect() is where every connection starts
    name = "connect_check_health"
    if not hasattr(redis.connection.AbstractConnection, name):
        name = "connect"
    real = getattr(redis.connection.AbstractConnection, name)

    port = redis.Redis.from_url(redis_url).connection_pool.connection_kwargs.get("port")
    ours = ("MainThread", "writethrough-stats")

    def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
        # only this test's: earlier tests' breaker probes may still be connecting elsewhere
        if getattr(self, "port", None) == port and threading.current_thread().name in ours:
            sync_connections.append(self)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(redis.connection.AbstractConnection, name, counted)
    key = f"{prefix}:stats".encode()

    async def main() -> tuple[bytes | None, bytes | None, bytes | None]:
        client = redis.asyncio.Redis.from_url(redis_url, socket_timeout=5)
        cache = WriteThroughCache(client, prefix=prefix, stats_interval=0.1)
        async_engine = create_async_engine(async_url(engine.url.render_as_string(False)))
        maker = async_sessionmaker(async_engine)
        cache.install(maker)
        try:
            async with maker() as s:
                await s.get(StItem, 1)
            deadline = time.monotonic() + 60
            while (sent := await client.hget(key, "c|StItem|fills")) is None:
                assert time.monotonic() < deadline, "the counts never arrived"
                await asyncio.sleep(0.02)  # the loop runs on while the send happens
            async with maker() as s:
                await s.get(StItem, 1)
            with pytest.raises(ConfigurationError, match=r"await cache\.aclose"):
                cache.close()  # it would block the loop
            await cache.aclose()
            hits = await client.hget(key, "c|StItem|hits")
            return sent, hits, await client.hget(key, "c|StItem|misses")
        finally:
            await async_engine.dispose()
            await client.aclose()

    fills, hits, misses = asyncio.run(main())
    assert (fills, hits, misses) == (b"1", b"1", b"1")
    assert sync_connections == []


def test_counts_a_failed_send_kept_are_sent_later(
    factory: sessionmaker[Session], prefix: str, redis_url: str
) -> None:
    cache = WriteThroughCache(redis_url, prefix=prefix, stats_interval=3600)
    cache.install(factory)
    try:
        with factory() as s:
            s.get(StItem, 1)
        real = cache._shared_stats._client  # type: ignore[union-attr]
        nowhere = redis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
        cache._shared_stats._client = lambda: nowhere  # type: ignore[union-attr]
        assert cache.send_stats() is False
        cache._shared_stats._client = real  # type: ignore[union-attr]
        with factory() as s:
            s.get(StItem, 1)
        assert cache.send_stats()
        shared = cache.shared_stats()
        assert (shared.hits, shared.misses) == (1, 1)
    finally:
        cache.uninstall(factory)


# -- exporters -------------------------------------------------------------------------------


def _traffic(factory: sessionmaker[Session]) -> None:
    with factory() as s:
        s.get(StItem, 1)
    with factory() as s:
        s.get(StItem, 1).name = "changed"
        s.commit()


def test_prometheus_collector_is_scraped(
    cache: WriteThroughCache, factory: sessionmaker[Session]
) -> None:
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from sqlalchemy_writethrough.prometheus import WriteThroughCollector

    _traffic(factory)
    registry = CollectorRegistry()
    registry.register(WriteThroughCollector(cache))
    scraped = generate_latest(registry).decode()
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(scraped):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value

    def value(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted({"prefix": cache.prefix, **labels}.items())))]

    assert value("writethrough_hits_total", model="StItem") == 1
    assert value("writethrough_misses_total", model="StItem") == 1
    assert value("writethrough_publishes_total", model="StItem") == 1
    assert value("writethrough_commits_total") == 1
    assert value("writethrough_breaker_open") == 0
    assert value("writethrough_read_seconds_count") == 2
    assert value("writethrough_read_seconds_bucket", le="+Inf") == 2
    assert value("writethrough_commit_seconds_count") == 1
    bounds = [
        float(k[1][0][1])
        for k in samples
        if k[0] == "writethrough_read_seconds_bucket" and k[1][0][1] != "+Inf"
    ]
    assert min(bounds) == pytest.approx(1e-5) and max(bounds) == pytest.approx(10.0)


def test_opentelemetry_metrics_and_spans_are_read(
    cache: WriteThroughCache, factory: sessionmaker[Session]
) -> None:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from sqlalchemy_writethrough.otel import instrument

    reader = InMemoryMetricReader()
    meters = MeterProvider(metric_readers=[reader])
    exporter = InMemorySpanExporter()
    tracers = TracerProvider()
    tracers.add_span_processor(SimpleSpanProcessor(exporter))
    instrument(cache, meter_provider=meters, tracer_provider=tracers)
    _traffic(factory)

    points: dict[str, list[Any]] = {}
    data = reader.get_metrics_data()
    assert data is not None
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                points.setdefault(metric.name, []).extend(metric.data.data_points)

    def by_model(name: str) -> dict[str, Any]:
        return {p.attributes["writethrough.model"]: p.value for p in points[name]}

    assert by_model("writethrough.hits") == {"StItem": 1}
    assert by_model("writethrough.misses") == {"StItem": 1}
    assert by_model("writethrough.publishes") == {"StItem": 1}
    assert [p.value for p in points["writethrough.commits"]] == [1]
    quantiles = {p.attributes["quantile"] for p in points["writethrough.read.duration"]}
    assert quantiles == {0.5, 0.95, 0.99}

    spans = exporter.get_finished_spans()
    names = [s.name for s in spans]
    assert names.count("writethrough.read") == 2
    assert names.count("writethrough.fill") == 1
    assert names.count("writethrough.lock") >= 1
    assert names.count("writethrough.publish") == 1
    reads = [s for s in spans if s.name == "writethrough.read"]
    assert sorted(s.attributes["writethrough.result"] for s in reads) == ["hit", "miss"]
    assert all(s.attributes["writethrough.model"] == "StItem" for s in spans)
    meters.shutdown()
    tracers.shutdown()


@pytest.mark.parametrize("first", [True, False], ids=["instrumented-first", "instrumented-after"])
def test_redis_instrumentation_sees_the_commands_only_when_installed_first(
    first: bool, redis_url: str, prefix: str, factory: sessionmaker[Session]
) -> None:
    """docs/usage.md: redis-py's instrumentation wraps ``execute_command``; the cache decides
    at construction whether to use it. The library's own spans are there either way."""
    from opentelemetry.instrumentation.redis import RedisInstrumentor
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from sqlalchemy_writethrough.otel import instrument

    exporter = InMemorySpanExporter()
    tracers = TracerProvider()
    tracers.add_span_processor(SimpleSpanProcessor(exporter))
    instrumentor = RedisInstrumentor()
    cache = None
    try:
        if first:
            instrumentor.instrument(tracer_provider=tracers)
        cache = WriteThroughCache(redis_url, prefix=prefix, stats_interval=None)
        cache.install(factory)
        instrument(cache, tracer_provider=tracers)
        if not first:
            instrumentor.instrument(tracer_provider=tracers)
        _traffic(factory)
    finally:
        instrumentor.uninstrument()
        if cache is not None:
            cache.uninstall(factory)
    names = {s.name for s in exporter.get_finished_spans()}
    assert {"writethrough.read", "writethrough.fill", "writethrough.publish"} <= names
    if first:
        assert {"MGET", "EVALSHA"} <= names
    else:
        assert not {"MGET", "EVALSHA"} & names
    tracers.shutdown()
