"""Testing your own code with the cache: a pytest plugin, and assertions that work without it.

Installing the package registers this module as a pytest plugin (entry point ``pytest11``,
name ``writethrough``; ``-p no:writethrough`` turns it off). It adds fixtures only, all
named ``writethrough_*``, and changes nothing unless a test asks for one:

``writethrough_redis_url`` (session)
    ``$REDIS_URL``; else a Redis on ``127.0.0.1:6379`` if one answers; else a throwaway Redis
    container (testcontainers) when a Docker engine is reachable; else the test is skipped.
``writethrough_prefix``
    A key prefix of the test's own (``wt-test-<hex>``): tests running side by side (xdist)
    never see each other's entries; its keys are deleted after the test.
``writethrough_cache``
    A factory: ``writethrough_cache(Session, ttl=60)`` builds a ``WriteThroughCache`` on the
    test's prefix, installs it on ``Session``, and uninstalls it after the test.

Assertions (context managers, usable in any test runner)::

    with assert_served_from_cache(cache):
        session.get(Product, 1)          # fails unless served by Redis, with no miss

    with assert_no_sql(engine):          # an Engine, Connection or Session
        session.get(Product, 1)          # fails if any SQL reaches the database
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session

from .cache import InstallTarget, WriteThroughCache

__all__ = ["assert_no_sql", "assert_served_from_cache"]

_LOCAL_REDIS = "redis://127.0.0.1:6379/0"


# -- assertions ----------------------------------------------------------------------------


class _Served:
    """What the block did, for the caller's own checks after it."""

    hits = 0
    misses = 0
    bypasses = 0


@contextlib.contextmanager
def assert_served_from_cache(
    cache: WriteThroughCache, *, hits: int | None = None
) -> Iterator[_Served]:
    """Fail unless the primary-key loads in the block were served by Redis: at least one hit
    (exactly ``hits`` when given), and no miss or bypass (a load sent to the database).

    Counts are this process's, so a test that runs loads on other threads at the same time
    should not use it."""
    before = cache.stats()
    served = _Served()
    yield served
    after = cache.stats()
    served.hits = after.hits - before.hits
    served.misses = after.misses - before.misses
    served.bypasses = after.bypasses - before.bypasses
    problems = []
    if served.misses:
        problems.append(f"{served.misses} load(s) missed the cache")
    if served.bypasses:
        problems.append(f"{served.bypasses} load(s) bypassed the cache")
    if hits is None and not served.hits:
        problems.append("no load was served from the cache")
    elif hits is not None and served.hits != hits:
        problems.append(f"{served.hits} load(s) served from the cache, expected {hits}")
    if problems:
        raise AssertionError("not served from the cache: " + "; ".join(problems))


@contextlib.contextmanager
def assert_no_sql(target: Engine | Connection | Session) -> Iterator[list[str]]:
    """Fail if any SQL statement reaches the database through ``target`` in the block (a
    Session: through any engine it is bound to). Yields the list of statements seen."""
    engines = _engines_of(target)
    seen: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        seen.append(statement)

    for engine in engines:
        event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        for engine in engines:
            event.remove(engine, "before_cursor_execute", record)
    if seen:
        listing = "\n  ".join(seen[:10])
        raise AssertionError(f"{len(seen)} SQL statement(s) were sent:\n  {listing}")


def _engines_of(target: Engine | Connection | Session) -> list[Engine]:
    if isinstance(target, Engine):
        return [target]
    if isinstance(target, Connection):
        return [target.engine]
    if isinstance(target, Session):
        bind = target.get_bind()  # a session bound per model: pass its engines one by one
        return [bind.engine if isinstance(bind, Connection) else bind]
    raise TypeError(f"assert_no_sql takes an Engine, Connection or Session, not {target!r}")


# -- fixtures ------------------------------------------------------------------------------


def _answers(url: str) -> bool:
    client = redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def _docker_reachable() -> bool:
    try:
        import docker  # type: ignore[import-not-found,import-untyped,unused-ignore]

        client = docker.from_env()
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:
        return False


@pytest.fixture(scope="session")
def writethrough_redis_url() -> Iterator[str]:
    """A Redis for the tests: $REDIS_URL, a local one, or a testcontainers Redis."""
    url = os.environ.get("REDIS_URL")
    if url:
        yield url
        return
    if _answers(_LOCAL_REDIS):
        yield _LOCAL_REDIS
        return
    if not _docker_reachable():
        pytest.skip(
            "no Redis: set REDIS_URL, start one on 127.0.0.1:6379, or make Docker reachable "
            "(with testcontainers installed) for a throwaway container"
        )
    try:
        from testcontainers.redis import RedisContainer  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        pytest.skip("no Redis, and testcontainers is not installed (pip install testcontainers)")
    with RedisContainer() as container:
        host = container.get_container_host_ip()
        port = container.get_exposed_port(6379)
        yield f"redis://{host}:{port}/0"


@pytest.fixture
def writethrough_prefix(writethrough_redis_url: str) -> Iterator[str]:
    """A key prefix of this test's own; its keys are deleted afterwards."""
    prefix = f"wt-test-{uuid.uuid4().hex[:12]}"
    yield prefix
    client = redis.Redis.from_url(writethrough_redis_url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        for i in range(0, len(keys), 500):
            client.unlink(*keys[i : i + 500])
    finally:
        client.close()


@pytest.fixture
def writethrough_cache(
    writethrough_redis_url: str, writethrough_prefix: str
) -> Iterator[Callable[..., WriteThroughCache]]:
    """A factory of caches on the test's prefix: ``writethrough_cache(Session, **options)``
    installs one on ``Session`` (a sessionmaker, scoped_session or Session subclass), and
    removes it after the test."""
    made: list[tuple[WriteThroughCache, Any]] = []

    def make(target: InstallTarget | None = None, **options: Any) -> WriteThroughCache:
        options.setdefault("stats_interval", None)
        cache = WriteThroughCache(writethrough_redis_url, prefix=writethrough_prefix, **options)
        if target is not None:
            cache.install(target)
        made.append((cache, target))
        return cache

    yield make
    for cache, target in made:
        if target is not None:
            cache.uninstall(target)
        cache.close()
