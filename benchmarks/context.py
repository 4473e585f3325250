"""Run settings, and the shared environment every benchmark row uses.

Everything runs in one process against one engine, one Redis client and one data set:

* ``engine``: ``create_engine(database_url)`` with its default pool (psycopg 3), where
  ``database_url`` is ``postgresql_url`` with the run's own schema (``bench_<8 hex>``) as
  ``search_path``: the ``bench_*`` tables live there, so two runs (say, the smoke test and a
  full run) never drop each other's tables; the schema is dropped at the end;
* ``plain``: a ``sessionmaker`` without the cache, on an engine of its own (``plain_engine``,
  the same URL) that no cache ever watches: plain SQLAlchemy, whose connections skip
  SQLAlchemy's event dispatch as they would in a process without the library (an engine the
  cache watches runs its connections' events, the cache's statement listener among them);
* ``cached``: a ``sessionmaker(engine)`` with ``WriteThroughCache.install``;
* ``commit_cached``: the same for the commit rows, through a second ``WriteThroughCache`` on the
  same prefix whose client counts Redis round trips (kept off the read rows, so that the read
  rows and the floor use the very same uncounted client);
* ``read_pks``: the rows the single-row and lazy-load rows read, ``batches``: the id lists the
  100-row rows read (all warm in every cache); ``commit_pks``: a disjoint range of rows the
  commit rows change.
"""

from __future__ import annotations

import os
import random
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from sqlalchemy import create_engine
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import sessionmaker

from sqlalchemy_writethrough import WriteThroughCache

from .data import ITEM_ROWS
from .redis_count import RoundTripCounter, counting_redis

DEFAULT_POSTGRESQL_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"

#: Commit sizes (changed rows per transaction).
COMMIT_SIZES = (1, 10, 100, 1000)
#: Rows per batch in the 100-row benchmark.
BATCH_SIZE = 100
#: How many distinct 100-id lists the batch rows cycle through (each warm in the query caches).
BATCH_LISTS = 20
#: Socket timeout of the benchmark's Redis clients (the value WriteThroughCache uses for a URL).
REDIS_SOCKET_TIMEOUT = 0.5


@dataclass
class Settings:
    postgresql_url: str = field(
        default_factory=lambda: os.environ.get(
            "BENCH_POSTGRESQL_URL", os.environ.get("POSTGRESQL_URL", DEFAULT_POSTGRESQL_URL)
        )
    )
    redis_url: str = field(
        default_factory=lambda: os.environ.get(
            "BENCH_REDIS_URL", os.environ.get("REDIS_URL", DEFAULT_REDIS_URL)
        )
    )
    iterations: int = 2000
    """measured rounds of the single-row group; the other groups scale from it"""
    warmup: int | None = None
    """warm-up rounds of the single-row group (default: a tenth of ``iterations``)"""
    quick: bool = False
    peers: bool = True
    only: frozenset[str] = frozenset()
    """group keys to run (empty: all)"""
    keep_tables: bool = False
    baseline: Path | None = None
    """a directory holding another version's sqlalchemy_writethrough (see .baseline)"""
    seed: int = 1234
    rows: int = ITEM_ROWS

    def group_iterations(self, group: str) -> tuple[int, int]:
        """(measured rounds, warm-up rounds) of a group."""
        n = self.iterations
        warm = self.warmup if self.warmup is not None else max(2, n // 10)
        factors = {
            "pk": 1.0,
            "batch": 0.2,
            "chain": 0.5,
            "commit1": 0.1,
            "commit10": 0.1,
            "commit100": 0.025,
            "commit1000": 0.01,
            "readback": 0.5,
        }
        f = factors.get(group, 1.0)
        floor = 3 if self.quick else 10
        return max(floor, round(n * f)), max(1, round(warm * f))

    def wants(self, group: str) -> bool:
        return not self.only or group in self.only


@dataclass
class Env:
    settings: Settings
    database_url: str
    """``postgresql_url`` with ``search_path`` set to ``schema`` (what every engine uses)"""
    schema: str
    engine: Engine
    #: the plain rows' engine (see the module's docstring)
    plain_engine: Engine
    redis: redis.Redis
    prefix: str
    cache: WriteThroughCache
    plain: sessionmaker[Any]
    cached: sessionmaker[Any]
    commit_cache: WriteThroughCache
    commit_cached: sessionmaker[Any]
    commit_counter: RoundTripCounter
    commit_redis: redis.Redis
    #: ``publish="background"``: a third cache on the same prefix, for the one-row commit row
    background_cache: WriteThroughCache
    commit_background: sessionmaker[Any]
    read_pks: list[int]
    batches: list[list[int]]
    commit_pks: list[int]
    #: the baseline version's cache (--baseline) and its sessionmakers, or None
    baseline_cache: Any = None
    baseline_cached: sessionmaker[Any] | None = None
    baseline_name: str = ""
    #: the baseline version's package: its own ``from_cache()`` (ours is not its option class)
    baseline_module: Any = None
    #: the baseline version's ``near_cache=True`` cache and sessionmaker (when it has one)
    baseline_near_cache: Any = None
    baseline_near_cached: sessionmaker[Any] | None = None
    floor_keys: dict[int, str] = field(default_factory=dict)
    #: the bytes of those entries (the commit floor sends copies of them)
    floor_entries: dict[int, bytes] = field(default_factory=dict)
    #: ``near_cache=True``: a fourth cache on the same prefix, for the near-cache get row
    near_cache: WriteThroughCache | None = None
    near_cached: sessionmaker[Any] | None = None

    def read_pk(self, i: int) -> int:
        return self.read_pks[i % len(self.read_pks)]

    def batch(self, i: int) -> list[int]:
        return self.batches[i % len(self.batches)]

    def commit_ids(self, i: int, size: int) -> list[int]:
        pool = self.commit_pks
        start = (i * size) % len(pool)
        ids = pool[start : start + size]
        if len(ids) < size:
            ids += pool[: size - len(ids)]
        return ids

    def close(self) -> None:
        if self.baseline_cache is not None and self.baseline_cached is not None:
            self.baseline_cache.uninstall(self.baseline_cached)
        if self.baseline_near_cache is not None:
            self.baseline_near_cache.close()
        self.background_cache.close()  # its pending publishes first
        if self.near_cache is not None:
            self.near_cache.close()
        self.redis.close()
        self.commit_redis.close()
        self.engine.dispose()
        self.plain_engine.dispose()


#: what a cache given a client (not a URL) needs to keep a connection per thread, as one
#: built from a URL does by default (``keep_connections``)
KEEP: dict[str, Any] = {"keep_connections": True}


def keeps(module: Any) -> dict[str, Any]:
    """:data:`KEEP` for a version of the library that has ``keep_connections`` (one from
    before it kept connections on any pool, or never)."""
    import inspect

    params = inspect.signature(module.WriteThroughCache.__init__).parameters
    return KEEP if "keep_connections" in params else {}


def with_search_path(url: str, schema: str) -> str:
    """``url`` whose connections use ``schema`` as search_path (a libpq ``options`` setting)."""
    parsed = make_url(url)
    setting = f"-csearch_path={schema}"
    existing = parsed.query.get("options")
    if isinstance(existing, str) and existing:
        setting = f"{existing} {setting}"
    return parsed.update_query_dict({"options": setting}).render_as_string(hide_password=False)


def build_env(settings: Settings) -> Env:
    """Engine, clients, caches, sessionmakers and the key sets (no data is created here)."""
    run_id = uuid.uuid4().hex[:8]
    schema = f"bench_{run_id}"
    database_url = with_search_path(settings.postgresql_url, schema)
    engine = create_engine(database_url)
    client = redis.Redis.from_url(
        settings.redis_url,
        socket_timeout=REDIS_SOCKET_TIMEOUT,
        socket_connect_timeout=REDIS_SOCKET_TIMEOUT,
    )
    prefix = f"bench-{run_id}"
    # no shared stats: a send after the run's clean-up would leave its prefix's stats behind;
    # threads keep their connection, as a cache built from a URL (the README's) does: this
    # client is shared with the floor, which a user's cache from a URL would not be
    cache = WriteThroughCache(client, prefix=prefix, stats_interval=None, **KEEP)
    plain_engine = create_engine(database_url)
    plain = sessionmaker(plain_engine)
    cached = sessionmaker(engine)
    cache.install(cached)

    commit_client, counter = counting_redis(
        settings.redis_url,
        socket_timeout=REDIS_SOCKET_TIMEOUT,
        socket_connect_timeout=REDIS_SOCKET_TIMEOUT,
    )
    commit_cache = WriteThroughCache(commit_client, prefix=prefix, stats_interval=None, **KEEP)
    commit_cached = sessionmaker(engine)
    commit_cache.install(commit_cached)
    background_cache = WriteThroughCache(
        settings.redis_url,
        prefix=prefix,
        stats_interval=None,
        publish="background",
        socket_timeout=REDIS_SOCKET_TIMEOUT,
        socket_connect_timeout=REDIS_SOCKET_TIMEOUT,
    )
    commit_background = sessionmaker(engine)
    background_cache.install(commit_background)
    near_cache = WriteThroughCache(
        settings.redis_url,
        prefix=prefix,
        stats_interval=None,
        near_cache=True,
        socket_timeout=REDIS_SOCKET_TIMEOUT,
        socket_connect_timeout=REDIS_SOCKET_TIMEOUT,
    )
    near_cached = sessionmaker(engine)
    near_cache.install(near_cached)

    baseline_cache: Any = None
    baseline_cached: sessionmaker[Any] | None = None
    baseline_near_cache: Any = None
    baseline_near_cached: sessionmaker[Any] | None = None
    baseline_name = ""
    module: Any = None
    if settings.baseline is not None:
        from . import baseline
        from .models import Base

        module = baseline.load(settings.baseline)
        baseline_name = baseline.describe(settings.baseline)
        # its own prefix: the two versions may store entries differently; the same options as
        # ours (no shared stats: a send costs its rows time ours do not pay, and one after the
        # run's clean-up would leave keys behind)
        try:
            baseline_cache = module.WriteThroughCache(
                client, prefix=f"{prefix}-baseline", stats_interval=None, **keeps(module)
            )
        except TypeError:  # a version from before stats_interval
            baseline_cache = module.WriteThroughCache(client, prefix=f"{prefix}-baseline")
        baseline_cache.register_all(Base)  # its mixin is not ours: name the models
        baseline_cached = sessionmaker(engine)
        baseline_cache.install(baseline_cached)
        try:  # a version with a near cache: one on the baseline's prefix, for its get.near row
            baseline_near_cache = module.WriteThroughCache(
                settings.redis_url,
                prefix=f"{prefix}-baseline",
                stats_interval=None,
                near_cache=True,
                socket_timeout=REDIS_SOCKET_TIMEOUT,
                socket_connect_timeout=REDIS_SOCKET_TIMEOUT,
            )
        except TypeError:
            baseline_near_cache = None
        if baseline_near_cache is not None:
            baseline_near_cache.register_all(Base)
            baseline_near_cached = sessionmaker(engine)
            baseline_near_cache.install(baseline_near_cached)

    rng = random.Random(settings.seed)
    rows = settings.rows
    commit_pool = min(1000, rows // 10)
    read_space = list(range(1, rows - commit_pool + 1))
    # Only the rows the rounds will read are warmed (the single-row group reads the most).
    pk_rounds = sum(settings.group_iterations("pk"))
    read_pks = rng.sample(read_space, min(1000, pk_rounds, len(read_space)))
    pool = read_pks if len(read_pks) >= BATCH_SIZE else rng.sample(read_space, BATCH_SIZE)
    batch_rounds = sum(settings.group_iterations("batch"))
    batches = [rng.sample(pool, BATCH_SIZE) for _ in range(min(BATCH_LISTS, batch_rounds))]
    commit_pks = list(range(rows - commit_pool + 1, rows + 1))
    return Env(
        settings=settings,
        database_url=database_url,
        schema=schema,
        engine=engine,
        plain_engine=plain_engine,
        redis=client,
        prefix=prefix,
        cache=cache,
        plain=plain,
        cached=cached,
        commit_cache=commit_cache,
        commit_cached=commit_cached,
        commit_counter=counter,
        commit_redis=commit_client,
        background_cache=background_cache,
        commit_background=commit_background,
        near_cache=near_cache,
        near_cached=near_cached,
        read_pks=read_pks,
        batches=batches,
        commit_pks=commit_pks,
        baseline_cache=baseline_cache,
        baseline_cached=baseline_cached,
        baseline_name=baseline_name,
        baseline_module=module,
        baseline_near_cache=baseline_near_cache,
        baseline_near_cached=baseline_near_cached,
    )
